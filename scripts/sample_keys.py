#!/usr/bin/env python3
"""Create the sample API keys of sample.js, without mongosh:

    uv run scripts/sample_keys.py

Uses MONGODB_URI, or the embedded database (starting it if the proxy is not running).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from pymongo import MongoClient

from _cli import database_uri

SAMPLE_KEYS = [  # the same keys as sample.js
    {"token": "token1", "user_id": "user1", "date_expiry": None},
    {"token": "token2", "user_id": "user2", "date_expiry": None},
    {"token": "token-expired", "user_id": "user3",
     "date_expiry": datetime(2020, 1, 1, tzinfo=UTC)},
]


def main() -> None:
    with database_uri() as uri, MongoClient(uri) as client:
        for key in SAMPLE_KEYS:
            secret = hashlib.sha256(key["token"].encode()).hexdigest()
            client.cgc.api_keys.update_one(
                {"secret": secret},
                {"$set": {"secret": secret, "access_level": "COMPLETION",
                          "user_id": key["user_id"], "date_expiry": key["date_expiry"]}},
                upsert=True,
            )
            print(f"{key['token']} -> {key['user_id']}")


if __name__ == "__main__":
    main()

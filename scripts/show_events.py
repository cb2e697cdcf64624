#!/usr/bin/env python3
"""Print the latest completion events from billing.events_completion.

    uv run scripts/show_events.py [-n 20] [--user USER_ID]
"""

from __future__ import annotations

import argparse

from pymongo import DESCENDING, MongoClient

from _cli import database_uri

COLUMNS = ("date_created", "user_id", "model", "prompt_n", "completion_n", "status",
           "usage_estimated", "backend")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="how many events (newest first)")
    parser.add_argument("--user", help="only this user_id")
    args = parser.parse_args()
    query = {"user_id": args.user} if args.user else {}
    with database_uri() as uri, MongoClient(uri, tz_aware=True) as client:
        events = list(client.billing.events_completion.find(query)
                      .sort("date_created", DESCENDING).limit(args.n))
    rows = [[str(e.get(c, ""))[:32] for c in COLUMNS] for e in events]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(COLUMNS)]
    for row in [list(COLUMNS), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    if not rows:
        print("(no events yet)")


if __name__ == "__main__":
    main()

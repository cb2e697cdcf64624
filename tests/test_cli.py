"""The CLI against MongoDB over the wire, and the keys it makes used through the proxy."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import openai

from conftest import ROOT, Proxy, wait_for_events, wait_for_usage
from llm_billing.keyauth import key_query, token_hash


def cli(mongo_uri: str, *args: str, check: bool = True) -> str:
    env = {**os.environ, "MONGODB_URI": mongo_uri}
    result = subprocess.run([sys.executable, str(ROOT / "scripts/billing.py"), *args],
                            env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_keys_users_and_report(mongo_uri: str, db, proxy: Proxy):
    user = f"cli-{uuid.uuid4().hex[:8]}"
    assert "created" in cli(mongo_uri, "users", "create", user, "--plan", "starter")
    out = cli(mongo_uri, "keys", "create", "--user", user, "--name", "laptop")
    token = re.search(r"token:\s+(\S+)", out).group(1)
    key_id = re.search(r"key id:\s+(\S+)", out).group(1)
    stored = db.cgc.api_keys.find_one({"user_id": user})
    assert stored["secret"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in str(stored)
    listing = cli(mongo_uri, "keys", "list", "--user", user)
    assert key_id in listing and "active" in listing and token not in listing

    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=token, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=8,
                                   messages=[{"role": "user", "content": "hi"}])
    [event] = wait_for_events(db, user, 1)
    wait_for_usage(db, user, event["tokens_billed"])
    rows = list(csv.DictReader(io.StringIO(cli(mongo_uri, "report", "--user", user, "--csv"))))
    assert len(rows) == 1
    assert rows[0]["plan"] == "starter" and int(rows[0]["tokens"]) == event["tokens_billed"]
    assert int(rows[0]["prompt_tokens"]) == event["prompt_n"]
    assert rows[0]["usage_cost"] == str(event["cost"].to_decimal())
    assert user in cli(mongo_uri, "report", "--user", user)

    assert "plan pro" in cli(mongo_uri, "users", "set-plan", user, "pro")
    assert "pro" in cli(mongo_uri, "users", "list")
    assert "unknown plan" in cli(mongo_uri, "users", "set-plan", user, "gold", check=False)

    cli(mongo_uri, "keys", "revoke", key_id)
    assert "expired/revoked" in cli(mongo_uri, "keys", "list", "--user", user)
    # the proxy's own lookup (seed 002's query) no longer finds it
    assert db.cgc.api_keys.find_one(key_query(token_hash(token), datetime.now(UTC))) is None

"""Tokens per minute across workers (issue 12, goal 4): two real mitmdump processes on one
database, one Free user (1,000 TPM), concurrent load against both."""

from __future__ import annotations

import asyncio
import time

from test_e2e_limits import CONTENT, _storm

from conftest import ApiKey, set_plan, start_proxy, stop_proxy, wait_for_events, write_config
from fake_upstream import FakeUpstream
from llm_billing.core.estimate import prompt_tokens

FREE_TPM = 1_000


def test_two_workers_share_one_tokens_per_minute(tmp_path, mongo_uri: str,
                                                 upstream: FakeUpstream, key: ApiKey, db,
                                                 capsys):
    """40 concurrent streams of up to 100 output tokens (each uses all of it), spread over
    both workers: together they admit what one bucket holds — 1,000 tokens, plus what
    it refilled during the burst, plus the one reservation that may straddle the limit.
    (Each worker admitting on its own bucket admits twice that.) A request is admitted
    for its reservation: the prompt as estimated plus its output limit; what the
    provider then bills beyond the estimate is charged to the bucket afterwards."""
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_proxy(tmp_path / "a", mongo_uri, config)
    second = start_proxy(tmp_path / "b", mongo_uri, config)
    try:
        set_plan(db, key.user_id, "free")  # 1,000 tokens a minute, 10,000 a month
        started = time.monotonic()
        admitted, refused = asyncio.run(_storm([first.url, second.url], key, 40, 100,
                                               CONTENT))
        elapsed = time.monotonic() - started
    finally:
        stop_proxy(first)
        stop_proxy(second)
    events = wait_for_events(db, key.user_id, admitted)
    assert len(events) == admitted and refused > 0
    assert all(e["completion_n"] == 100 for e in events)  # each used its whole output
    reservation = prompt_tokens({"messages": [{"role": "user", "content": CONTENT}]}) + 100
    tokens = admitted * reservation
    refill = elapsed * FREE_TPM / 60
    with capsys.disabled():
        print(f"\n40 concurrent over two workers, Free (1,000 TPM): {admitted} admitted "
              f"({tokens} tokens reserved, {sum(e['tokens_billed'] for e in events)} "
              f"billed), {refused} refused in {elapsed:.1f} s (refill {refill:.0f} tokens)")
    assert tokens <= FREE_TPM + refill + reservation
    assert tokens >= FREE_TPM / 2  # both workers' leases together: most of the bucket

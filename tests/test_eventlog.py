"""The event writer against MongoDB over the wire: retried batches never bill twice, an
unavailable database delays events but loses none, and inserts stay fast as data grows."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient

from conftest import (
    ApiKey,
    free_port,
    openai_client,
    start_proxy,
    stop_proxy,
    wait_for_events,
    write_config,
)
from fake_upstream import FakeUpstream
from llm_billing.eventlog import COMPLETIONS, DEAD_LETTER_FILE, INTENT, EventLog
from llm_billing.storage.embedded_db import start_embedded_db
from llm_billing.storage.journal import Journal, encode


class FixedDatabase:
    """The one method EventLog uses of the Database addon."""

    def __init__(self, uri: str) -> None:
        self._client = AsyncMongoClient(uri, serverSelectionTimeoutMS=300, tz_aware=True)

    async def client(self) -> AsyncMongoClient:
        return self._client


def event(user_id: str) -> dict:
    return {"_id": ObjectId(), "date_created": datetime.now(UTC), "user_id": user_id,
            "api_key_id": ObjectId(), "model": "m", "prompt_n": 3, "completion_n": 4}


def test_retried_batch_does_not_bill_twice(mongo_uri: str, db):
    user = f"user-{uuid.uuid4().hex}"
    batch = [event(user) for _ in range(5)]

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        await log.write(batch[:3])  # the first attempt stored some...
        await log.write(batch)  # ...and the retry sends the whole batch again
        return log.written

    assert asyncio.run(go()) == 5
    stored = list(db.billing.events_completion.find({"user_id": user}))
    assert sorted(d["_id"] for d in stored) == sorted(d["_id"] for d in batch)


def test_events_wait_for_an_unavailable_database(tmp_path):
    port = free_port()
    user = f"user-{uuid.uuid4().hex}"
    batch = [event(user) for _ in range(3)]
    uri = f"mongodb://127.0.0.1:{port}/?directConnection=true"

    async def go():
        log = EventLog(FixedDatabase(uri))
        writing = asyncio.create_task(log.write(batch))
        await asyncio.sleep(1.0)  # several failed attempts
        assert not writing.done()
        _, process = await asyncio.to_thread(start_embedded_db, tmp_path, port)
        try:
            await asyncio.wait_for(writing, 30)
            client = AsyncMongoClient(uri)
            return await client.billing.events_completion.count_documents({"user_id": user})
        finally:
            process.terminate()

    assert asyncio.run(go()) == 3


def test_embedded_insert_rate_stays_flat(tmp_path):
    """mongoeco 4.11 alone slows from ~300 to ~45 inserts/s by 1,000 documents; ours must
    not slow down as the collection grows (bench/ measures it at 100k)."""
    uri, process = start_embedded_db(tmp_path, free_port())

    async def rate(collection, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await collection.insert_one(event("rate"))
        return n / (time.perf_counter() - start)

    async def go():
        collection = AsyncMongoClient(uri).billing.events_completion
        early = await rate(collection, 150)
        for _ in range(6):
            await collection.insert_many([event("bulk") for _ in range(500)])
        late = await rate(collection, 150)
        return early, late

    try:
        early, late = asyncio.run(go())
    finally:
        process.terminate()
    assert late > early * 0.6, (early, late)


@contextlib.contextmanager
def addon_context(log: EventLog, data_dir: Path):
    """``log`` loaded in mitmproxy with its data directory at ``data_dir``."""
    from mitmproxy.test import taddons

    from llm_billing.storage.database import Database

    options_owner = Database()  # declares billing_data_dir
    with taddons.context(log, options_owner) as tctx:
        tctx.configure(options_owner, billing_data_dir=str(data_dir))
        yield


def gone_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()


def orphan_segment(journal_dir: Path, events: list[tuple[str, dict]], number: int = 1) -> Path:
    """A journal segment left by a proxy process that is gone."""
    journal_dir.mkdir(exist_ok=True)
    path = journal_dir / f"events-{gone_pid()}-0123456789ab-{number:06d}.jsonl"
    path.write_text("".join(encode(c, d) + "\n" for c, d in events))
    return path


def test_an_unencodable_event_is_set_aside_and_writing_goes_on(mongo_uri: str, db, tmp_path):
    user = f"user-{uuid.uuid4().hex}"
    bad = {**event(user), "timings": {1, 2}}  # a set: BSON cannot encode it

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        with addon_context(log, tmp_path):
            await log.write([bad])
            await log.write([event(user)])

    asyncio.run(go())
    assert db.billing.events_completion.count_documents({"user_id": user}) == 1
    assert user in (tmp_path / DEAD_LETTER_FILE).read_text()


def test_journal_replay_prefers_real_events_over_provisional_ones(mongo_uri: str, db,
                                                                  tmp_path):
    user = f"user-{uuid.uuid4().hex}"
    finished, unfinished = event(user), event(user)
    provisional = {**finished, "prompt_n": 1, "completion_n": 0, "usage_estimated": True}
    cut_off = {**unfinished, "prompt_n": 2, "completion_n": 0, "usage_estimated": True}
    journal_dir = tmp_path / "journal"
    orphan_segment(journal_dir, [(INTENT, provisional), (INTENT, cut_off),
                                 (COMPLETIONS, finished)])

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        with addon_context(log, tmp_path):
            log.journal = Journal(journal_dir)
            await log._replay_journals()

    asyncio.run(go())
    stored = {d["_id"]: d for d in db.billing.events_completion.find({"user_id": user})}
    assert stored[finished["_id"]]["completion_n"] == finished["completion_n"]  # the real one
    assert stored[unfinished["_id"]]["usage_estimated"] is True  # only its estimate survived
    assert len(stored) == 2 and not list(journal_dir.iterdir())


def test_one_unstorable_event_does_not_take_its_batch_with_it(mongo_uri: str, db, tmp_path):
    """An int beyond int64 made the driver refuse the whole batch: every event in it went
    to the dead-letter file, other users' included."""
    users = [f"user-{uuid.uuid4().hex}" for _ in range(3)]
    batch = [event(users[i % 3]) for i in range(300)]
    bad = batch[150]
    bad["usage"] = {"prompt_tokens": 10**30}

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        with addon_context(log, tmp_path):
            await log.write(batch)
        return log.written

    assert asyncio.run(go()) == 299
    stored = {d["_id"] for d in db.billing.events_completion.find({"user_id": {"$in": users}})}
    assert stored == {d["_id"] for d in batch} - {bad["_id"]}
    [line] = (tmp_path / DEAD_LETTER_FILE).read_text().splitlines()
    assert str(bad["_id"]) in line and "1000000000000000000000000000000" in line


def test_a_batch_the_driver_refuses_is_bisected_to_the_one_event(mongo_uri: str, db,
                                                                 tmp_path, monkeypatch):
    """Should the per-event check miss a kind of document the driver refuses."""
    import llm_billing.eventlog

    monkeypatch.setattr(llm_billing.eventlog, "unstorable", lambda doc: None)
    user = f"user-{uuid.uuid4().hex}"
    batch = [event(user) for _ in range(50)]
    batch[17]["prompt_n"] = 10**30

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        with addon_context(log, tmp_path):
            await log.write(batch)

    asyncio.run(go())
    assert db.billing.events_completion.count_documents({"user_id": user}) == 49
    assert len((tmp_path / DEAD_LETTER_FILE).read_text().splitlines()) == 1


def test_replay_does_not_bill_a_request_that_failed_in_another_segment(mongo_uri: str, db,
                                                                      tmp_path):
    """A request's provisional event and its failure event landed in different segments;
    the failure's was stored and deleted, the other kept for another request's sake. After
    a crash, replay billed the provisional event of a request that had failed."""
    user = f"user-{uuid.uuid4().hex}"
    failed, completed, unfinished = event(user), event(user), event(user)
    db.billing.events_failed.insert_one({**failed, "status": 500})
    db.billing.events_completion.insert_one(completed)
    journal_dir = tmp_path / "journal"
    orphan_segment(journal_dir, [(INTENT, {**e, "usage_estimated": True, "completion_n": 0})
                                 for e in (failed, completed, unfinished)])

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        with addon_context(log, tmp_path):
            log.journal = Journal(journal_dir)
            await log._replay_journals()

    asyncio.run(go())
    stored = {d["_id"]: d for d in db.billing.events_completion.find({"user_id": user})}
    assert failed["_id"] not in stored
    assert stored[completed["_id"]]["completion_n"] == completed["completion_n"]
    assert stored[unfinished["_id"]]["usage_estimated"] is True
    assert len(stored) == 2 and not list(journal_dir.iterdir())


def test_replay_skips_malformed_events_and_the_writer_goes_on(mongo_uri: str, db, tmp_path):
    """An event without an ``_id`` in a replayed journal stopped the writer task for good:
    nothing was stored after it."""
    user = f"user-{uuid.uuid4().hex}"
    journaled, new = event(user), event(user)
    no_id = {k: v for k, v in event(user).items() if k != "_id"}
    orphan_segment(tmp_path / "journal", [
        (INTENT, no_id), (COMPLETIONS, no_id), (INTENT, {**event(user), "_id": {"a": 1}}),
        ("events_other", event(user)), (COMPLETIONS, journaled)])

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        with addon_context(log, tmp_path):
            log.journal = Journal(tmp_path / "journal")
            writer = asyncio.create_task(log._run())
            log.submit(COMPLETIONS, new)
            try:
                for _ in range(200):
                    if log.written >= 2 or writer.done():
                        break
                    await asyncio.sleep(0.02)
            finally:
                writer.cancel()

    asyncio.run(go())
    stored = {d["_id"] for d in db.billing.events_completion.find({"user_id": user})}
    assert stored == {journaled["_id"], new["_id"]}


def test_a_failing_replay_leaves_its_files_and_the_writer_goes_on(mongo_uri: str, db,
                                                                  tmp_path, monkeypatch):
    user = f"user-{uuid.uuid4().hex}"
    segment = orphan_segment(tmp_path / "journal", [(COMPLETIONS, event(user))])

    def broken(path):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Journal, "read", staticmethod(broken))

    async def go():
        log = EventLog(FixedDatabase(mongo_uri))
        with addon_context(log, tmp_path):
            log.journal = Journal(tmp_path / "journal")
            writer = asyncio.create_task(log._run())
            log.submit(COMPLETIONS, event(user))
            try:
                for _ in range(200):
                    if log.written or writer.done():
                        break
                    await asyncio.sleep(0.02)
            finally:
                writer.cancel()

    asyncio.run(go())
    assert db.billing.events_completion.count_documents({"user_id": user}) == 1
    assert segment.exists()  # replayed at the next start


def test_a_failed_request_is_not_billed_after_a_crash(tmp_path: Path, mongo_uri: str,
                                                      upstream: FakeUpstream, db, key: ApiKey,
                                                      test_id: str):
    """End to end, two events per segment: request B hangs upstream, A fails (500), C
    succeeds. Segment 1 [intent B, intent A] stays for B; segment 2 [failure A, intent C]
    is stored and deleted. mitmdump is SIGKILLed; the next one must not bill A."""
    config = write_config(tmp_path / "config.toml", upstream.url, "http://127.0.0.1:9")
    args = ("--set", "event_journal_segment_events=2")
    journal_dir = tmp_path / "data" / "journal"
    proxy = start_proxy(tmp_path, mongo_uri, config, *args)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
            "stream": True}
    try:
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {key.token}",
                                   "X-Test-Id": test_id, "X-Fake-Scenario": "gated"}) as b:
            chunks = b.iter_raw()  # kept: a collected generator closes the connection
            next(chunks)  # B is upstream, its intent journaled
            client = openai_client(proxy, key.token)
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="gpt-4o-mini", messages=body["messages"],
                                               extra_headers={"X-Fake-Scenario": "status-500"})
            client.chat.completions.create(model="gpt-4o-mini", messages=body["messages"])
            wait_for_events(db, key.user_id, 1)
            deadline = time.monotonic() + 15
            while any(journal_dir.glob("*-000002.jsonl")):
                assert time.monotonic() < deadline, "segment 2 was not deleted"
                time.sleep(0.02)
            assert [p.name[-12:] for p in sorted(journal_dir.iterdir())] == [
                "000001.jsonl", "000003.jsonl"]
            proxy.process.kill()
            proxy.process.wait(10)
    except httpx.HTTPError:
        pass  # B's connection died with the proxy
    finally:
        upstream.release(test_id)
        if proxy.process.poll() is None:
            proxy.process.kill()
    [failed] = db.billing.events_failed.find({"user_id": key.user_id})
    proxy = start_proxy(tmp_path, mongo_uri, config, *args)
    try:
        deadline = time.monotonic() + 15
        while any(journal_dir.iterdir()):  # replayed, then deleted
            assert time.monotonic() < deadline, "journal not replayed"
            time.sleep(0.02)
    finally:
        stop_proxy(proxy)
    events = list(db.billing.events_completion.find({"user_id": key.user_id}))
    assert failed["_id"] not in {e["_id"] for e in events}  # A: not billed
    assert sorted(e["usage_estimated"] for e in events) == [False, True]  # C, and B estimated

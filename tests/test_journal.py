"""The event journal: files live exactly as long as some of their events are unstored."""

from __future__ import annotations

import base64
import bisect
import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import bson
from bson import Decimal128, ObjectId

from llm_billing.storage.journal import Journal, encode, readable


def test_segments_are_deleted_once_every_event_is_stored(tmp_path):
    journal = Journal(tmp_path, segment_events=2)
    a = journal.append("events_completion", {"_id": ObjectId(), "n": 1})
    b = journal.append("events_completion", {"_id": ObjectId(), "n": 2})  # closes segment 1
    c = journal.append("events_failed", {"_id": ObjectId(), "n": 3})
    assert len(list(tmp_path.glob("*.jsonl"))) == 2
    journal.stored(a)
    journal.stored(b)
    assert [p.name for p in tmp_path.glob("*.jsonl")] == [c.path.name]
    journal.stored(c)
    journal.close()
    assert not list(tmp_path.glob("*.jsonl"))


def test_orphans_are_segments_of_gone_processes_and_read_back(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    previous = Journal(tmp_path)
    doc = {"_id": ObjectId(), "prompt_n": 3}
    previous.append("events_completion", doc)
    previous.close()  # not stored: the file stays
    [left] = tmp_path.glob("events-*.jsonl")
    dead = tmp_path / f"events-{gone}-deadbeef0000-000001.jsonl"
    dead.write_text(left.read_text() + 'eyJjIjoi')  # a line cut short by a crash
    alive = tmp_path / f"events-{os.getppid()}-0123456789ab-000001.jsonl"
    alive.write_text("")
    current = Journal(tmp_path)
    orphans = list(current.orphans())
    assert alive not in orphans  # another live process's journal is left alone
    assert dead in orphans and len(orphans) == 2  # ours from before (same pid, new token)
    assert current.read(dead) == [("events_completion", doc)]  # the cut line is skipped


COLLECTIONS = ("intent", "events_completion", "events_failed")
TEXT = "abcJ{} \n\"\\é€😀"  # the format's own characters, and multi-byte ones


def random_record(rng: random.Random, i: int) -> tuple[str, dict]:
    """An event of random size and content; one in eight cannot be BSON (JSON path)."""
    doc = {
        "_id": ObjectId(),
        "date_created": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(
            milliseconds=rng.randrange(10**11)),  # BSON keeps milliseconds
        "user_id": "".join(rng.choices(TEXT, k=rng.randrange(300))),
        "model": rng.choice(["m", "gpt-4o-mini", "meta-llama/Llama-3.1-70B"]),
        "prompt_n": rng.randrange(2**31), "completion_n": rng.randrange(2**63),
        "usage_estimated": rng.random() < 0.5, "error": rng.choice([None, "cut"]),
        "cost": Decimal128(f"{rng.randrange(10**9)}E-9"),
        "timings": [rng.random() for _ in range(rng.randrange(4))],
    }
    if i % 8 == 3:
        doc["usage"] = {"prompt_tokens": 10**30}  # beyond int64
    elif i % 8 == 7:
        doc["model"] += "\udcff"  # a lone surrogate: not UTF-8
    return rng.choice(COLLECTIONS), doc


def bson_length(record: tuple[str, dict]) -> int | None:
    try:
        return len(bson.encode({"c": record[0], "d": record[1]}))
    except (OverflowError, ValueError):
        return None


def test_every_record_comes_back_exactly(tmp_path):
    """Untagged base64 BSON started with ``J`` whenever its length % 256 was 36 to 39 and was
    then misread as JSON and dropped."""
    rng = random.Random(9)
    records = [random_record(rng, i) for i in range(10_000)]
    lengths = [bson_length(r) for r in records]
    assert {n % 256 for n in lengths if n is not None} == set(range(256))
    assert lengths.count(None) == 2500  # these take the JSON path
    journal = Journal(tmp_path, segment_events=len(records) + 1)
    for collection, doc in records:
        journal.append(collection, doc)
    journal.close()
    [path] = tmp_path.glob("events-*.jsonl")
    assert Journal.read(path) == records


def untagged_line(collection: str, doc: dict) -> str:
    """A line as the previous version wrote it."""
    try:
        return base64.b64encode(bson.encode({"c": collection, "d": doc})).decode()
    except (OverflowError, ValueError):
        return "J" + readable(collection, doc)


def test_lines_of_the_previous_version_are_read(tmp_path):
    rng = random.Random(8)
    records = [random_record(rng, i) for i in range(2_000)]
    records = [r for r in records if "\udcff" not in r[1]["model"]]  # it failed on those
    path = tmp_path / "events-1-0123456789ab-000001.jsonl"
    path.write_text("".join(untagged_line(c, d) + "\n" for c, d in records))
    assert {n % 256 for n in map(bson_length, records) if n} >= {36, 37, 38, 39}
    assert Journal.read(path) == records


def journal_bytes(records: list[tuple[str, dict]]) -> tuple[bytes, list[int]]:
    """The file's bytes and where each line starts."""
    lines = [(encode(c, d) + "\n").encode() for c, d in records]
    starts = [sum(map(len, lines[:i])) for i in range(len(lines))]
    return b"".join(lines), starts


def test_a_torn_last_line_is_skipped(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "events.jsonl"
    for i in (2, 3):  # the last line BSON, then JSON
        records = [random_record(rng, j) for j in range(i + 1)]
        text, starts = journal_bytes(records)
        for cut in range(starts[-1], len(text) + 1):
            path.write_bytes(text[:cut])
            whole = cut >= len(text) - 1  # only its newline missing
            assert Journal.read(path) == records[: len(records) - (not whole)], cut


def test_a_damaged_byte_costs_its_line_and_nothing_else(tmp_path):
    """A CRC-32 detects every single-byte error: a damaged line is skipped, never misread."""
    rng = random.Random(6)
    records = [random_record(rng, i) for i in range(16)]
    text, starts = journal_bytes(records)
    path = tmp_path / "events.jsonl"
    for _ in range(1_000):
        position = rng.randrange(len(text))
        damaged = bytearray(text)
        damaged[position] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(damaged))
        line = bisect.bisect_right(starts, position) - 1
        lost = {line, line + 1} if text[position] == ord("\n") else {line}  # lines merged
        expected = [r for i, r in enumerate(records) if i not in lost]
        assert Journal.read(path) == expected, (position, text[position], damaged[position])


def test_lines_that_are_no_event_are_skipped(tmp_path):
    doc = {"_id": ObjectId()}
    not_events = [
        encode("events_completion", doc).replace("B ", "X ", 1),
        *(untagged_line("c", doc)[:n] for n in (1, 8)),
        base64.b64encode(bson.encode({"c": 1, "d": {}})).decode(),
        base64.b64encode(bson.encode({"c": "x", "d": [1]})).decode(),
        'J{"collection": "x"}',
        "J[1]",
        "B",
        "",
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([*not_events, encode("events_completion", doc)]))
    assert Journal.read(path) == [("events_completion", doc)]

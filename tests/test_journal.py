"""The event journal: files live exactly as long as some of their events are unstored."""

from __future__ import annotations

import os
import subprocess
import sys

from bson import ObjectId

from llm_billing.storage.journal import Journal


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

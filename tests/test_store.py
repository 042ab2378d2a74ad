"""The state store: what a crash of the daemon's process keeps."""

from __future__ import annotations

import subprocess
import sys

from fsrvpd.store import SETS, StateStore


def test_an_unsynced_write_survives_a_crash_of_the_process(tmp_path):
    """Writes nothing on storage depends on skip the wait for the disk, not the write-ahead log:
    a process killed right after such a write leaves it for the next start to read."""
    writer = ("import os, sys\n"
              "from fsrvpd.store import SETS, StateStore\n"
              "store = StateStore(sys.argv[1])\n"
              "store.save({SETS: [{'set_id': 'synced'}]})\n"
              "store.save({SETS: [{'set_id': 'assembling'}]}, settings={'timer': 1}, synced=False)\n"
              "os.kill(os.getpid(), 9)\n")
    crashed = subprocess.run([sys.executable, "-c", writer, str(tmp_path)])
    assert crashed.returncode == -9
    store = StateStore(str(tmp_path))
    assert sorted(body["set_id"] for body in store.load(SETS)) == ["assembling", "synced"]
    assert store.load_setting("timer") == 1
    store.save({SETS: [{"set_id": "after"}]})  # back to synced writes after an unsynced one
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert len(store.load(SETS)) == 3

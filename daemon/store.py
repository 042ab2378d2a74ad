"""Durable state: every shadow copy set, written before the daemon answers or acts.

The state machine's sets serialise to plain dictionaries; each is stored as one JSON row in
SQLite (WAL, synchronous=FULL), so a set is always either fully its old or fully its new self
after a crash.  The daemon writes a set *before* it touches storage (intent) and again after
(outcome), so a restart can find everything a crash interrupted.  Copies kept by retention
(retention.py) are rows of their own.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading

SCHEMA = """
CREATE TABLE IF NOT EXISTS shadow_copy_sets (
    set_id TEXT PRIMARY KEY,
    body   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS retained_copies (
    copy_id TEXT PRIMARY KEY,
    body    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class StateStore:
    """A small SQLite file in the state directory, readable only by root."""

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "state.sqlite3")
        old_umask = os.umask(0o077)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def save(self, sets: list[dict] = (), deleted: list[str] = (), settings: dict | None = None,
             retained: list[dict] = (), unretained: list[str] = ()) -> None:
        """Write changed sets and retained copies, drop deleted ones and update settings in one transaction."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO shadow_copy_sets (set_id, body) VALUES (?, ?)",
                                 [(body["set_id"], json.dumps(body, sort_keys=True)) for body in sets])
            self._db.executemany("DELETE FROM shadow_copy_sets WHERE set_id = ?", [(set_id,) for set_id in deleted])
            self._db.executemany("INSERT OR REPLACE INTO retained_copies (copy_id, body) VALUES (?, ?)",
                                 [(body["copy_id"], json.dumps(body, sort_keys=True)) for body in retained])
            self._db.executemany("DELETE FROM retained_copies WHERE copy_id = ?", [(copy_id,) for copy_id in unretained])
            self._db.executemany("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                                 [(key, json.dumps(value)) for key, value in (settings or {}).items()])

    def load_sets(self) -> list[dict]:
        return self._bodies("shadow_copy_sets")

    def load_retained(self) -> list[dict]:
        return self._bodies("retained_copies")

    def _bodies(self, table: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute(f"SELECT body FROM {table}").fetchall()
        return [json.loads(body) for (body,) in rows]

    def load_setting(self, key: str, default=None):
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def close(self) -> None:
        with self._lock:
            self._db.close()

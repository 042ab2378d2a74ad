"""Durable state: every shadow copy set, written before the daemon answers or acts.

The state machine's sets serialise to plain dictionaries; each is stored as one JSON row in
SQLite (WAL), so a set is always either fully its old or fully its new self after a crash.  The
daemon writes a set *before* it touches storage (intent) and again after (outcome), so a restart
can find everything a crash interrupted.  Those writes wait for the disk (synchronous=FULL); the
others (a set being assembled, the sequence timer restarted) are left in the write-ahead log
unsynced: a crash of the process keeps them, a power loss may take the last of them -- never one
that storage depends on, as the log is replayed in order and the next synced write syncs them
too.  Copies kept by retention (retention.py) are rows of their own, and so is every copy that
left the state until its storage is confirmed gone: what is on storage with a set GUID this
daemon never recorded belongs to someone else (another fsrvpd instance) and is never touched.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from types import MappingProxyType
from typing import Mapping

EMPTY: Mapping = MappingProxyType({})

# Tables of JSON bodies, each keyed by one GUID field of its bodies.
SETS = "shadow_copy_sets"  # the state machine's sets
RETAINED = "retained_copies"  # copies kept by retention (retention.py)
REMOVING = "copies_being_removed"  # copies that left the state, until their storage is confirmed gone
KEYS = {SETS: "set_id", RETAINED: "copy_id", REMOVING: "copy_id"}

SCHEMA = "".join(f"CREATE TABLE IF NOT EXISTS {table} ({key} TEXT PRIMARY KEY, body TEXT NOT NULL);\n"
                 for table, key in KEYS.items()) + \
    "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);\n"


class StateStore:
    """A small SQLite file in the state directory, readable only by root."""

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)  # also when an admin created it wider: it names every set and share
        self.path = os.path.join(state_dir, "state.sqlite3")
        old_umask = os.umask(0o077)  # the database and its -wal and -shm files, created below
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        finally:
            os.umask(old_umask)
        self._lock = threading.Lock()
        self._synced = True

    def save(self, write: Mapping[str, list[dict]] = EMPTY, delete: Mapping[str, list[str]] = EMPTY,
             settings: Mapping[str, object] = EMPTY, synced: bool = True) -> None:
        """In one transaction: write bodies into their tables, delete rows by key, update settings;
        `synced=False` does not wait for the disk (see the module docstring)."""
        with self._lock:
            if synced != self._synced:
                self._db.execute(f"PRAGMA synchronous={'FULL' if synced else 'NORMAL'}")
                self._synced = synced
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for table, bodies in write.items():
                    self._db.executemany(f"INSERT OR REPLACE INTO {table} ({KEYS[table]}, body) VALUES (?, ?)",
                                         [(body[KEYS[table]], json.dumps(body, sort_keys=True)) for body in bodies])
                for table, keys in delete.items():
                    self._db.executemany(f"DELETE FROM {table} WHERE {KEYS[table]} = ?", [(key,) for key in keys])
                self._db.executemany("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                                     [(key, json.dumps(value)) for key, value in settings.items()])

    def load(self, table: str) -> list[dict]:
        """Every body of one of the tables (SETS, RETAINED, REMOVING)."""
        if table not in KEYS:
            raise ValueError(f"no table {table!r}")
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

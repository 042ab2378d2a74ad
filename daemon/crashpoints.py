"""Crash points, for tests only: make the daemon die by SIGKILL at an exact step of its work.

A crash between two effects (the snapshots are taken, the state does not say so yet) cannot be
hit reliably by killing the process from outside.  So the service calls `crash_point(name)`
between every pair of effects, and a daemon started with

    FSRVPD_CRASH_AT=<name>      or      FSRVPD_CRASH_AT=<name>:<n>   (the n-th time it is reached)

kills itself there with SIGKILL: no clean-up, no flushed buffers but the log line before it, as
a power cut or the OOM killer would.  The kill-matrix test (tests/test_crash_safety.py) and
bench/kill_matrix.py restart it and check what start-up reconciliation repaired.  Nobody sets the
variable in production; unset, a crash point costs one comparison.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("fsrvpd.crashpoints")

ENVIRONMENT_VARIABLE = "FSRVPD_CRASH_AT"

# Every crash point, named <operation>.<what has just been done>; tests check the list is complete.
POINTS = (
    "set_context.persisted",      # the context (and a retry's discarded sets) recorded; storage not yet cleaned
    "start.persisted",
    "add.persisted",
    "prepare.persisted",
    "commit.intent",              # CreationInProgress recorded, no snapshot yet
    "commit.snapshotted",         # snapshots taken, the state does not say so yet
    "commit.persisted",           # Committed recorded, the client not answered yet
    "expose.intent",              # every copy's share name recorded, no clone yet
    "expose.cloned",              # a clone made, its path not recorded, its share not published yet
    "expose.published",           # share published, the set not Exposed in the state yet
    "expose.persisted",
    "recovery.intent",            # Recovered recorded, the copies still writable on storage
    "recovery.read_only",         # a copy read-only on storage, not recorded yet
    "abort.intent",               # the set deleted from the state, its storage still there
    "delete.intent",              # the copy deleted from the state, its share and storage still there
    "delete.unpublished",         # its share gone, its storage still there
    "prune.intent",               # a retained copy deleted from the state, its storage still there
    "expire.intent",              # the sequence timer's deletions recorded, storage still there
    "reap.intent",                # the exposure TTL's deletions recorded, storage still there
    "answered.commit",            # a Commit answered, zfs-fuse's extra snapshots of `snapshot -r` not destroyed yet
    "answered.cleanup",           # a DeleteShareMapping answered, its copy's storage not removed yet (service._do_after_answer)
    "reconcile.repair",           # start-up reconciliation half-way through its repairs
    "reload.shares_synced",       # SIGHUP: base shares of the new configuration published, settings not applied
)


def _armed() -> tuple[str | None, int]:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "")
    name, _, count = value.partition(":")
    if not name:
        return None, 0
    if name not in POINTS or (count and not count.isdigit()):
        raise SystemExit(f"{ENVIRONMENT_VARIABLE}={value!r}: not one of {', '.join(POINTS)} (optionally :<n>)")
    return name, int(count or 1)


_point, _remaining = _armed()


def crash_point(name: str) -> None:
    """Die here if this is the armed point (and its n-th visit)."""
    global _remaining
    if name != _point:
        return
    _remaining -= 1
    if _remaining == 0:
        log.critical("crash point %s reached: killing fsrvpd (%s is set, for tests)", name, ENVIRONMENT_VARIABLE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

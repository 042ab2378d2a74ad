"""Where log records go, and the FSRVP fields they carry.

Under systemd, when standard error is the journal stream named by $JOURNAL_STREAM, records go to
journald through systemd-python's JournalHandler, each with structured fields an admin can
filter on (`journalctl FSRVP_SET_ID=...`): the set, share, client address, principal, operation
and HRESULT of the call it belongs to.  Anywhere else they are plain lines on standard error.

The fields of a call are set once where the call is decoded (`call_fields`) and ride along in a
context variable, so asyncio tasks and the worker threads of `asyncio.to_thread` inherit them and
no log call inside the service has to pass them on.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Iterator

SET_ID, SHARE, CLIENT, PRINCIPAL, OPERATION, HRESULT = (
    "FSRVP_SET_ID", "FSRVP_SHARE", "FSRVP_CLIENT", "FSRVP_PRINCIPAL", "FSRVP_OPERATION", "FSRVP_HRESULT")
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_call_fields: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("fsrvpd_call_fields", default={})


@contextlib.contextmanager
def call_fields(**fields: object) -> Iterator[None]:
    """Attach these journal fields (None values left out) to every record logged inside the block."""
    token = _call_fields.set({**_call_fields.get(), **{k: str(v) for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _call_fields.reset(token)


def set_fields(scs) -> dict[str, str]:
    """The fields naming a shadow copy set, for `extra=` on records logged outside a call (timers, sweeps)."""
    return {SET_ID: str(scs.set_id), CLIENT: scs.client_address, PRINCIPAL: scs.principal,
            SHARE: ",".join(copy.share for copy in scs.copies)}


class _CallFieldsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _call_fields.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class RecentProblems(logging.Handler):
    """The last warnings, errors and failed calls with their fields, for `fsrvpctl status`: "why
    did that backup fail?" answered without reading the journal."""

    def __init__(self, size: int = 20):
        super().__init__(logging.INFO)
        self.entries: collections.deque[dict] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        fields = {key: str(value) for key, value in vars(record).items() if key.startswith("FSRVP_")}
        failed_call = fields.get(HRESULT, "0x00000000") != "0x00000000"
        if record.levelno < logging.WARNING and not failed_call:
            return
        if failed_call and self.entries and self.entries[-1]["fields"] == fields:
            return  # the same call's outcome again (its reason came first)
        self.entries.append({"at": record.created, "level": record.levelname, "message": record.getMessage(),
                             "fields": fields})


recent_problems = RecentProblems()


def under_journald() -> bool:
    """systemd's documented test: $JOURNAL_STREAM names the device and inode of our standard error."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{status.st_dev}:{status.st_ino}"


def setup(level: str) -> str:
    """Send the daemon's records to journald or standard error; returns which ("journal", "stderr")."""
    handler: logging.Handler | None = None
    if under_journald():
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            print("fsrvpd: systemd-python is not installed; logging to standard error without fields",
                  file=sys.stderr)
        else:
            handler = JournalHandler(SYSLOG_IDENTIFIER="fsrvpd")
    destination = "journal" if handler is not None else "stderr"
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    for attached in (handler, recent_problems):
        attached.addFilter(_CallFieldsFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler, recent_problems]
    root.setLevel(level.upper())
    return destination

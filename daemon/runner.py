"""The one door to the storage tools.

Every `zfs`, `lvm`, `btrfs` or `mount` command fsrvpd runs goes through `CommandRunner.run`, so each
one is logged with its duration, bounded by a timeout and counted per tool and outcome (the
metrics endpoint reads `totals()`).  Backends never call `subprocess` themselves.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import subprocess
import threading
import time

log = logging.getLogger("fsrvpd.runner")

DEFAULT_TIMEOUT_SECONDS = 60.0


class CommandFailed(Exception):
    """A storage command exited non-zero, timed out or could not be started."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str, timed_out: bool = False):
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited {returncode}"
        super().__init__(f"{' '.join(argv)} {what}: {self.stderr}")


@dataclasses.dataclass
class CommandStats:
    """Running totals per tool (argv[0] basename) for metrics and the admin CLI; `failures` counts
    the commands whose caller needed them to succeed (check=True)."""

    calls: int = 0
    failures: int = 0
    seconds: float = 0.0


class CommandRunner:
    """Runs storage commands with a timeout, logging and per-tool accounting."""

    def __init__(self, default_timeout: float = DEFAULT_TIMEOUT_SECONDS, env: dict[str, str] | None = None):
        self.default_timeout = default_timeout
        self.env = {**os.environ, "LC_ALL": "C", **(env or {})}
        self.stats: dict[str, CommandStats] = collections.defaultdict(CommandStats)
        self._lock = threading.Lock()

    def totals(self) -> dict[str, CommandStats]:
        """A consistent copy of `stats`, for readers in other threads (the metrics scrape)."""
        with self._lock:
            return {tool: dataclasses.replace(entry) for tool, entry in self.stats.items()}

    def run(self, argv: list[str], timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run argv and return the completed process; raise CommandFailed when check and it failed."""
        timeout = self.default_timeout if timeout is None else timeout
        started = time.monotonic()
        timed_out = False
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired as exc:
            timed_out = True
            proc = subprocess.CompletedProcess(argv, None, exc.stdout or "", str(exc.stderr or "timed out"))
        except OSError as exc:
            proc = subprocess.CompletedProcess(argv, None, "", str(exc))
        elapsed = time.monotonic() - started
        failed = proc.returncode != 0
        with self._lock:
            entry = self.stats[os.path.basename(argv[0])]
            entry.calls += 1
            entry.seconds += elapsed
            entry.failures += failed and check  # with check=False the caller expects and handles failure
        level = logging.WARNING if failed and check else logging.DEBUG
        log.log(level, "%s -> %s in %.3fs%s", " ".join(argv), "timeout" if timed_out else proc.returncode,
                elapsed, f": {proc.stderr.strip()}" if failed else "")
        if failed and check:
            raise CommandFailed(argv, proc.returncode, proc.stderr or "", timed_out)
        return proc

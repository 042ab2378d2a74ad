"""fsrvpd in the test's own process, wired exactly as `fsrvpd run` wires it (cli.build, then
Supervisor.open): real ZFS backend, real embedded SMB server on a loopback port, real SQLite
state, real metrics.  Tests use it where they must reach inside: the metrics the service reports,
the retention admin API, a clock they move.  Clients still talk to it over SMB (`client()`), like
to the daemon process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import yaml

from fsrvpd.cli import build
from fsrvpd.client import FsrvpClient
from fsrvpd.config import parse
from tests.support.daemon import NETBIOS_NAME, PASSWORD, USER, FsrvpDaemon
from tests.support.zfs import FilePool

CALL_SECONDS = 120


class InProcessFsrvpd:
    """Configured like FsrvpDaemon (`config` may be edited before `start`); `days_later` moves its clock."""

    def __init__(self, pool: FilePool, directory: Path, shares: tuple[str, ...] = ("vms", "sql")):
        self.template = FsrvpDaemon(pool, directory, shares)  # the same config, datasets and helpers
        self.config, self.paths, self.pool = self.template.config, self.template.paths, pool
        self.clock_offset = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.service = None

    def start(self) -> InProcessFsrvpd:
        self.thread.start()
        config = parse(yaml.safe_dump(self.config), "in-process")
        supervisor = build(config, clock=lambda: time.time() + self.clock_offset)
        self.run(supervisor.open())
        self.service = supervisor.service
        return self

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample of the metrics the service reported (to its observer, metrics.Metrics)."""
        return self.service.observer.registry.get_sample_value(name, labels)

    def stop(self) -> None:
        if self.service is not None:
            self.run(self.service.stop())
            self.run(self.service.front_door.stop())
            self.service.store.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def run(self, coroutine):
        """Run a coroutine on the daemon's loop, as the daemon would, and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=CALL_SECONDS)

    def days_later(self, days: float) -> None:
        self.clock_offset += days * 86400

    def client(self) -> FsrvpClient:
        client = FsrvpClient("127.0.0.1", self.config["front_door"]["port"], USER, PASSWORD,
                             server_name=NETBIOS_NAME, timeout=60)
        client.connect()
        return client

    def smbclient(self, share: str, command: str) -> str:
        return self.template.smbclient(share, command)

"""fsrvpd as the tests meet it: a real daemon process on a real (zfs-fuse) pool, real clients.

`FsrvpDaemon` writes a private config (a free port on 127.0.0.1, user backup/backup, one dataset
per share), starts `python -m fsrvpd run` and waits for its SMB port; `rpcclient`, `smbclient`
and `client` talk to it the way an admin or a backup tool would.  Fixture `daemon` gives one per
test on a fresh pool, with shares `vms` and `sql`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fsrvpd.cli import nt_hash
from fsrvpd.client import FsrvpClient
from tests.support.zfs import FilePool

USER = PASSWORD = "backup"
NETBIOS_NAME = "FSRVPTEST"
START_SECONDS = 30.0
STOP_SECONDS = 30.0
CLEANUP_SECONDS = 60.0
PEER_PACKAGES = {"rpcclient": "samba-common-bin", "smbclient": "smbclient"}

__all__ = ["FsrvpDaemon", "daemon", "samba_clients", "free_port", "USER", "PASSWORD", "NETBIOS_NAME"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_samba_clients() -> None:
    """rpcclient and smbclient from Debian, installed once if missing (idempotent)."""
    missing = [package for tool, package in PEER_PACKAGES.items() if shutil.which(tool) is None]
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


class FsrvpDaemon:
    """One fsrvpd process with its own config, state directory and log file."""

    def __init__(self, pool: FilePool, directory: Path, shares: tuple[str, ...] = ("vms", "sql"),
                 sequence_seconds: float = 180, sequence_long_seconds: float = 1800):
        self.pool = pool
        self.directory = directory
        self.port = free_port()
        self.config_path = directory / "fsrvpd.yaml"
        self.log_path = directory / "fsrvpd.log"
        self.admin_socket = str(directory / "admin.sock")
        self.paths: dict[str, str] = {}
        self.datasets: dict[str, str] = {}
        for share in shares:
            self.datasets[share], self.paths[share] = pool.dataset(share)
        self.config = {
            "server": {"netbios_name": NETBIOS_NAME},
            "front_door": {"mode": "embedded", "listen": "127.0.0.1", "port": self.port},
            "users": {USER: {"nt_hash": nt_hash(PASSWORD)}},
            "state_dir": str(directory / "state"),
            "mount_root": os.path.join(pool.directory, "snapshots"),
            "timers": {"sequence_seconds": sequence_seconds, "sequence_long_seconds": sequence_long_seconds},
            "shares": {share: {"path": path, "backend": "zfs"} for share, path in self.paths.items()},
            "logging": {"level": "debug"},
            "admin": {"socket": self.admin_socket},
        }
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}  # added to the daemon's environment, e.g. FSRVPD_CRASH_AT or PATH
        self.wrapper: list[str] = []  # a command that runs the daemon's command line given as its arguments

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> FsrvpDaemon:
        self.config_path.write_text(yaml.safe_dump(self.config))
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*self.wrapper, sys.executable, "-m", "fsrvpd", "run", "-c",
                                         str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, **self.env})
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while not self._listening():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fsrvpd did not start:\n{self.log()}")
            time.sleep(0.1)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the daemon (SIGTERM: clean; SIGKILL: a crash) and return its exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        finally:
            self.process = None

    def wait_for_exit(self, timeout: float = STOP_SECONDS) -> int:
        """Wait for a daemon that is dying on its own (e.g. at a crash point); its exit status."""
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.process = None

    def restart(self) -> FsrvpDaemon:
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _listening(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- peers --------------------------------------------------------------------------------
    def rpcclient(self, *commands: str, binding: str = "127.0.0.1") -> str:
        """Samba's rpcclient; it exits 0 even when a call fails, so callers check its output."""
        proc = subprocess.run(["rpcclient", "-p", str(self.port), "-U", f"{USER}%{PASSWORD}", binding,
                               "-c", "; ".join(commands)], capture_output=True, text=True, timeout=120)
        return proc.stdout + proc.stderr

    def smbclient(self, share: str, command: str, user: str = USER, password: str = PASSWORD) -> str:
        proc = subprocess.run(["smbclient", "-p", str(self.port), "-U", f"{user}%{password}",
                               f"//127.0.0.1/{share}", "-c", command], capture_output=True, text=True, timeout=120)
        return proc.stdout + proc.stderr

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        """fsrvpctl against this daemon's admin socket."""
        return subprocess.run([sys.executable, "-m", "fsrvpd.ctl", "-s", self.admin_socket, *args],
                              capture_output=True, text=True, timeout=120)

    def client(self, port: int | None = None, **kwargs) -> FsrvpClient:
        """Our own client, connected (to `port`, e.g. a relay's, or the daemon's); host names in UNCs are
        the NetBIOS name unless told otherwise."""
        client = FsrvpClient("127.0.0.1", port or self.port, USER, PASSWORD,
                             server_name=kwargs.pop("server_name", NETBIOS_NAME), timeout=60, **kwargs)
        client.connect()
        return client


    # -- what the daemon holds ---------------------------------------------------------------
    def state(self) -> tuple[list[dict], list[dict]]:
        """The shadow copy sets and retained copies in the daemon's durable state, as stored."""
        with sqlite3.connect(Path(self.config["state_dir"]) / "state.sqlite3") as db:
            return tuple([json.loads(body) for (body,) in db.execute(f"SELECT body FROM {table}")]
                         for table in ("shadow_copy_sets", "retained_copies"))

    def published_shares(self) -> set[str]:
        """The disk shares the daemon's SMB server lists (srvsvc NetShareEnum, through smbclient -L)."""
        proc = subprocess.run(["smbclient", "-g", "-L", "//127.0.0.1", "-p", str(self.port), "-U",
                               f"{USER}%{PASSWORD}"], capture_output=True, text=True, timeout=120)
        shares = {line.split("|")[1] for line in proc.stdout.splitlines() if line.startswith("Disk|")}
        if not shares:
            raise RuntimeError(f"smbclient -L listed no shares:\n{proc.stdout}{proc.stderr}")
        return shares


def ours_on_storage(pool: FilePool) -> list[str]:
    """Every dataset or snapshot of the pool that fsrvpd made (by name), as `zfs list -t all` shows."""
    listing = subprocess.run(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r", pool.name],
                             capture_output=True, text=True, check=True).stdout.split()
    return [name for name in listing if "fsrvpd-" in name]


def ours_after_cleanup(pool: FilePool, seconds: float = CLEANUP_SECONDS) -> list[str]:
    """What of ours is still on storage once the daemon has had time to finish removing it.

    A clone smbd or a slow client still holds is busy for a moment; the daemon retries its removal
    within seconds rather than failing the call, so tests wait for it (generously: CI machines are slow)."""
    deadline = time.monotonic() + seconds
    while (left := ours_on_storage(pool)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="session")
def samba_clients():
    ensure_samba_clients()


@pytest.fixture
def daemon(request, zfs_pool, tmp_path, samba_clients):
    """A running fsrvpd on a fresh pool with shares vms and sql; stopped (cleanly) afterwards.

    The daemon's log is printed when the test failed or the daemon did not exit cleanly."""
    running = FsrvpDaemon(zfs_pool, tmp_path).start()
    yield running
    status = running.stop()
    report = getattr(request.node, "report_call", None)
    if status not in (0, None) or (report is not None and report.failed):
        print(f"--- fsrvpd log ({running.log_path}) ---\n{running.log()}")

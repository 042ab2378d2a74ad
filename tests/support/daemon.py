"""fsrvpd as the tests meet it: a real daemon process on a real (zfs-fuse) pool, real clients.

`FsrvpDaemon` writes a private config (a free port on 127.0.0.1, user backup/backup, one dataset
per share), starts `python -m fsrvpd run` and waits for its SMB port; `rpcclient`, `smbclient`
and `client` talk to it the way an admin or a backup tool would.  Fixture `daemon` gives one per
test on a fresh pool, with shares `vms` and `sql`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from impacket.smbconnection import SMBConnection

from fsrvpd.cli import nt_hash
from fsrvpd.client import FsrvpClient
from fsrvpd.constants import PIPE_NAME
from tests.support.apt import ensure_tools
from tests.support.zfs import FilePool

USER = PASSWORD = "backup"
NETBIOS_NAME = "FSRVPTEST"
START_SECONDS = 30.0
STOP_SECONDS = 30.0
CLEANUP_SECONDS = 60.0
PEER_PACKAGES = {"rpcclient": "samba-common-bin", "smbclient": "smbclient"}

__all__ = ["FsrvpDaemon", "RawPipe", "daemon", "serving", "samba_clients", "free_port", "USER", "PASSWORD",
           "NETBIOS_NAME"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_samba_clients() -> None:
    """rpcclient and smbclient from Debian, installed once if missing (idempotent)."""
    ensure_tools(PEER_PACKAGES)


class FsrvpDaemon:
    """One fsrvpd process with its own config, state directory and log file."""

    start_seconds = START_SECONDS

    def __init__(self, pool: FilePool, directory: Path, shares: tuple[str, ...] = ("vms", "sql"),
                 sequence_seconds: float = 180, sequence_long_seconds: float = 1800):
        self.pool = pool
        self.directory = directory
        self.port = free_port()
        self.config_path = directory / "fsrvpd.yaml"
        self.log_path = directory / "fsrvpd.log"
        self.admin_socket = str(directory / "admin.sock")
        self.datasets: dict[str, str] = {}
        share_configs = {share: self.create_share(share) for share in shares}
        self.paths = {share: config["path"] for share, config in share_configs.items()}
        self.config = {
            "server": {"netbios_name": NETBIOS_NAME},
            "front_door": {"mode": "embedded", "listen": "127.0.0.1", "port": self.port},
            "users": {USER: {"nt_hash": nt_hash(PASSWORD)}},
            "state_dir": str(directory / "state"),
            "mount_root": os.path.join(pool.directory, "snapshots"),
            "timers": {"sequence_seconds": sequence_seconds, "sequence_long_seconds": sequence_long_seconds},
            "shares": share_configs,
            "logging": {"level": "debug"},
            "admin": {"socket": self.admin_socket},
        }
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}  # added to the daemon's environment, e.g. FSRVPD_CRASH_AT or PATH
        self.config_mode = 0o600  # the configuration holds NT hashes
        self.wrapper: list[str] = []  # a command that runs the daemon's command line given as its arguments

    def create_share(self, name: str) -> dict:
        """Make the storage for share `name` on the pool and return the share's config."""
        self.datasets[name], path = self.pool.dataset(name)
        return {"path": path, "backend": "zfs"}

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> FsrvpDaemon:
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.config_path.chmod(self.config_mode)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*self.wrapper, sys.executable, "-m", "fsrvpd", "run", "-c",
                                         str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, **self.env})
        log.close()
        deadline = time.monotonic() + self.start_seconds
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

    def __enter__(self) -> FsrvpDaemon:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

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
    def rpcclient(self, *commands: str, binding: str = "ncacn_np:127.0.0.1[sign]", user: str = USER,
                  password: str = PASSWORD, options: tuple[str, ...] = ()) -> str:
        """Samba's rpcclient, NTLM-signing its RPC calls by default (the daemon's default minimum
        level); it exits 0 even when a call fails, so callers check its output."""
        proc = subprocess.run(["rpcclient", "-p", str(self.port), "-U", f"{user}%{password}", *options, binding,
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

    def removals_done(self, seconds: float = 30.0) -> bool:
        """Wait until the daemon removed the storage of every copy it recorded as being removed: it
        does so right after answering DeleteShareMapping (a busy clone: at its next reconciliation)."""
        return wait_until(lambda: not self.being_removed(), seconds)

    def being_removed(self) -> list[dict]:
        """The copies the daemon recorded as being removed: deleted, their storage not yet gone."""
        with sqlite3.connect(Path(self.config["state_dir"]) / "state.sqlite3") as db:
            return [json.loads(body) for (body,) in db.execute("SELECT body FROM copies_being_removed")]

    def published_shares(self) -> set[str]:
        """The disk shares the daemon's SMB server lists (srvsvc NetShareEnum, through smbclient -L)."""
        proc = subprocess.run(["smbclient", "-g", "-L", "//127.0.0.1", "-p", str(self.port), "-U",
                               f"{USER}%{PASSWORD}"], capture_output=True, text=True, timeout=120)
        shares = {line.split("|")[1] for line in proc.stdout.splitlines() if line.startswith("Disk|")}
        if not shares:
            raise RuntimeError(f"smbclient -L listed no shares:\n{proc.stdout}{proc.stderr}")
        return shares


class RawPipe:
    """An FssagentRpc pipe opened over impacket's SMB client, for bytes no RPC client would send."""

    def __init__(self, port: int, smb: SMBConnection | None = None) -> None:
        if smb is None:
            smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=port)
            smb.login(USER, PASSWORD)
        self.smb = smb
        self.tree = smb.connectTree("IPC$")
        self.file = smb.openFile(self.tree, "\\" + PIPE_NAME)

    def write(self, data: bytes) -> None:
        self.smb.writeFile(self.tree, self.file, data)

    def answers(self, limit: int = 3) -> list[bytes]:
        """What comes back, up to `limit` reads or until the daemon closes the pipe."""
        answers = []
        try:
            while len(answers) < limit and (answer := self.smb.readFile(self.tree, self.file)):
                answers.append(answer)
        except Exception:  # the pipe is gone: the daemon closed it
            pass
        return answers


def ours_on_storage(pool) -> list[str]:
    """Everything on the test's storage (a FilePool, FileBtrfs, ...) that fsrvpd made."""
    return pool.ours()


def wait_until(condition: Callable[[], bool], seconds: float = 30.0, every: float = 0.2) -> bool:
    """Whether `condition` held within `seconds` (asked every `every` seconds)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def ours_after_cleanup(pool, seconds: float = CLEANUP_SECONDS) -> list[str]:
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


def serving(request, daemon: FsrvpDaemon) -> Iterator[FsrvpDaemon]:
    """A fixture's body: the daemon started for the test, stopped (cleanly) afterwards; its log is
    printed when the test failed or the daemon did not exit cleanly."""
    yield daemon.start()
    status = daemon.stop()
    report = getattr(request.node, "report_call", None)
    if status not in (0, None) or (report is not None and report.failed):
        print(f"--- fsrvpd log ({daemon.log_path}) ---\n{daemon.log()}")


@pytest.fixture
def daemon(request, zfs_pool, tmp_path, samba_clients):
    """A running fsrvpd on a fresh pool with shares vms and sql."""
    yield from serving(request, FsrvpDaemon(zfs_pool, tmp_path))

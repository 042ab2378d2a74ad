"""The servers under test, each started the same way and reached by the same client.

`SERVERS` is what the benchmark runs: fsrvpd in each front-door mode and Samba's own FSRVP server
(rpcd_fsrvp), every one behind its own private smbd or embedded SMB server on 127.0.0.1. A server
is a context manager taking (storage, backend, shares, directory) and yielding an `Endpoint`.

RPC authentication is the same for every server: the client binds with NTLM at packet privacy
(sealed, what MS-FSRVP asks of clients; FsrvpClient's default). fsrvpd requires at least
integrity in both modes (the embedded default; behind smbd, where the default is `none`, set here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.storage import BenchStorage
from fsrvpd.config import BACKENDS as FSRVPD_BACKENDS
from fsrvpd.runner import CommandRunner
from fsrvpd.samba import SambaTools
from tests.support.daemon import PASSWORD, USER, FsrvpDaemon
from tests.support.samba import (ADMIN, ADMIN_PASSWORD, DCERPCD_HELPERS, START_SECONDS, SambaFsrvpd, SambaServer,
                                 ensure_samba)

SNAP_SCRIPT = Path(__file__).with_name("samba-zfs-snap.sh")
REFERENCE = "samba"  # ratios are fsrvpd ÷ this
SERVER_NAME = "127.0.0.1"  # the host in every UNC: each server takes its own address


@dataclasses.dataclass
class Endpoint:
    """Where the client connects, as whom, and fsrvpd's process (for RSS and profiles; None: Samba)."""

    port: int
    daemon_pid: Callable[[], int | None]
    user: str = USER
    password: str = PASSWORD
    # Behind smbd: seconds Samba's own tools take to publish, and to withdraw, one snapshot share
    # of the given base share (see samba_share_tools).
    share_tools: Callable[[str], dict[str, float]] | None = None


@contextlib.contextmanager
def _serving(daemon: FsrvpDaemon, backend: str, shares: dict[str, str]) -> Iterator[Endpoint]:
    """`daemon` running with `shares` on `backend`, the logging of production (debug would log every
    command) and no per-client call rate limit (50 calls/s by default: one fast client, as here, goes
    over it with GetShareMapping; Samba has none); stopped after, also when it did not come up."""
    samba_mode = isinstance(daemon, SambaFsrvpd)  # the paths are smbd's
    daemon.config["shares"] = {name: {"backend": backend, **({} if samba_mode else {"path": path})}
                               for name, path in shares.items()}
    daemon.config["logging"]["level"] = "info"
    daemon.config["limits"] = {"max_calls_per_second": 100000}
    try:
        daemon.start()
        yield Endpoint(daemon.port, lambda: daemon.process.pid if daemon.process else None)
    finally:
        daemon.stop()


def fsrvpd_embedded(storage: BenchStorage, backend: str, shares: dict[str, str],
                    directory: Path) -> contextlib.AbstractContextManager[Endpoint]:
    """fsrvpd is the SMB server itself: clients connect to the daemon's port."""
    return _serving(FsrvpDaemon(storage.pool, directory, shares=()), backend, shares)


def _samba(directory: Path, shares: dict[str, str], options: dict[str, str], helpers: tuple[str, ...]) -> SambaServer:
    """A private smbd serving `shares` (registry shares, imported in one `net conf import`)."""
    directory.mkdir(parents=True, exist_ok=True)
    samba = SambaServer(directory, helpers=helpers).setup_accounts()
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".conf", delete=False) as shares_conf:
        for name, path in shares.items():
            shares_conf.write(f"[{name}]\n\tpath = {path}\n\tread only = no\n")
            shares_conf.writelines(f"\t{key} = {value}\n" for key, value in options.items())
    samba.net("conf", "import", shares_conf.name)
    return samba


@contextlib.contextmanager
def _running(samba: SambaServer) -> Iterator[SambaServer]:
    try:
        yield samba.start()
    finally:
        samba.stop()


@contextlib.contextmanager
def fsrvpd_samba(storage: BenchStorage, backend: str, shares: dict[str, str], directory: Path) -> Iterator[Endpoint]:
    """fsrvpd behind smbd's external pipe: clients connect to smbd, which passes FssagentRpc on."""
    with _running(_samba(directory / "samba", shares, {}, DCERPCD_HELPERS)) as samba:
        (directory / "fsrvpd").mkdir()
        daemon = SambaFsrvpd(samba, storage.pool, directory / "fsrvpd", shares=())
        daemon.config["rpc"] = {"min_auth_level": "integrity"}
        with _serving(daemon, backend, shares) as endpoint:
            endpoint.share_tools = lambda base: samba_share_tools(samba.conf, directory / "scratch", base)
            yield endpoint


def samba_share_tools(smb_conf: str, scratch: Path, base: str) -> dict[str, float]:
    """Seconds Samba's tools alone take for one snapshot share, with the commands fsrvpd's Samba
    front door runs for each (daemon/samba.py): "publish" -- the base share's security
    descriptor read, the registry share written, its descriptor set -- and "withdraw" -- the share
    deleted, smbd told to reload. Samba has no interface that adds or removes several shares at once."""
    tools = SambaTools(CommandRunner(), smb_conf, str(scratch))
    name = f"{base}@{{{str(uuid.uuid4()).upper()}}}"
    started = time.perf_counter()
    sddl = tools.security_descriptor(base)
    tools.put_share(name, {"path": "/", "read only": "yes"})
    tools.set_security_descriptor(name, sddl)
    published = time.perf_counter()
    tools.delete_share(name)
    tools.reload_smbd()
    return {"publish": published - started, "withdraw": time.perf_counter() - published}


def _snapshot_options(storage: BenchStorage, backend: str) -> dict[str, str]:
    """How rpcd_fsrvp snapshots: vfs_btrfs on btrfs, vfs_shell_snap with samba-zfs-snap.sh on ZFS."""
    if backend == "btrfs":
        return {"vfs objects": "btrfs", "btrfs:manipulate snapshots": "yes"}
    script = f"{SNAP_SCRIPT} {' '.join(storage.samba_clone_place())}"
    return {"vfs objects": "shell_snap", "shell_snap:check path command": f"{script} check",
            "shell_snap:create command": f"{script} create", "shell_snap:delete command": f"{script} delete"}


@contextlib.contextmanager
def samba_rpcd_fsrvp(storage: BenchStorage, backend: str, shares: dict[str, str],
                     directory: Path) -> Iterator[Endpoint]:
    """Samba's own FSRVP server: samba-dcerpcd serves rpcd_fsrvp, which snapshots through the share's VFS.

    vfs_shell_snap runs its scripts as the client's user and `zfs` wants root, so the client logs
    on to this server as root (an FSRVP operator for Samba too)."""
    ensure_samba()
    samba = _samba(directory, shares, _snapshot_options(storage, backend), (*DCERPCD_HELPERS, "rpcd_fsrvp"))
    with _running(samba):
        pipe, deadline = os.path.join(samba.ncalrpc_dir, "np", "fssagentrpc"), time.monotonic() + START_SECONDS
        while not os.path.exists(pipe):  # samba-dcerpcd makes it a moment after srvsvc's
            if time.monotonic() > deadline:
                raise RuntimeError(f"rpcd_fsrvp's pipe {pipe} did not appear")
            time.sleep(0.1)
        yield Endpoint(samba.port, lambda: None, user=ADMIN, password=ADMIN_PASSWORD)


# fsrvpd's front-door modes, then the reference; a new front door is one more entry.
FSRVPD_FRONT_DOORS: dict[str, Callable[..., contextlib.AbstractContextManager[Endpoint]]] = {
    "fsrvpd-embedded": fsrvpd_embedded,
    "fsrvpd-samba": fsrvpd_samba,
}
SERVERS = {**FSRVPD_FRONT_DOORS, REFERENCE: samba_rpcd_fsrvp}


def serves(server: str, backend: str) -> bool:
    """Whether `server` can run on `backend` here: fsrvpd only on the backends this build has."""
    return server == REFERENCE or backend in FSRVPD_BACKENDS

"""A real Samba for the tests: a private smbd and samba-dcerpcd on a free loopback port.

`SambaServer` writes an smb.conf whose every directory lives under one temp dir (standalone
server, tdbsam passdb, registry shares), sets up the accounts, and runs smbd and samba-dcerpcd in
the foreground.  samba-dcerpcd runs the helpers smbclient -L and srvsvc need, and never
rpcd_fsrvp: fsrvpd serves that pipe (`rpc start on demand helpers = no`, as in production).

Accounts (Debian's base-passwd ones, so no Unix user is created): `backup` is in BUILTIN\\Backup
Operators (mapped to the Unix group `backup`), `list` is in no privileged group, and `root` is
Samba's administrator (it may read share security descriptors over srvsvc).

`SambaFsrvpd` is an FsrvpDaemon in samba mode behind that smbd; fixture `samba` gives one
SambaServer per test module (starting smbd costs about a second).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.daemon import PASSWORD, USER, FsrvpDaemon, free_port

__all__ = ["SambaServer", "SambaFsrvpd", "samba", "ensure_samba", "PLAIN_USER", "PLAIN_PASSWORD", "ADMIN",
           "ADMIN_PASSWORD"]

PLAIN_USER, PLAIN_PASSWORD = "list", "plain-pw"
ADMIN, ADMIN_PASSWORD = "root", "admin-pw"
LIBEXEC = "/usr/libexec/samba"
DCERPCD_HELPERS = ("rpcd_classic", "rpcd_winreg", "rpcd_lsad", "rpcd_epmapper")  # srvsvc needs winreg
START_SECONDS = 30.0
# The [global] lines the README tells admins to add, exactly as shipped.
FSRVPD_LINES = "".join(f"    {line}\n" for line in
                       (Path(__file__).parents[2] / "etc" / "samba" / "fsrvpd.conf").read_text().splitlines()
                       if line.strip() and not line.startswith("#"))


def ensure_samba() -> None:
    """smbd and the Samba tools from Debian, installed once if missing (idempotent)."""
    if shutil.which("smbd") is None or shutil.which("rpcclient") is None or shutil.which("smbclient") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "samba", "samba-common-bin",
                        "smbclient"], check=True, env=env)


def _run(*argv: str, input_text: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input_text, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc.stdout


class SambaServer:
    """smbd + samba-dcerpcd with a private configuration under `directory`."""

    def __init__(self, directory: Path, on_demand_helpers: bool = False, helpers: tuple[str, ...] = DCERPCD_HELPERS):
        """`helpers`: the rpcd_* samba-dcerpcd serves (with rpcd_fsrvp, Samba's own FSRVP server takes the pipe)."""
        self.directory = directory
        self.helpers = helpers
        self.port = free_port()
        self.conf = str(directory / "smb.conf")
        self.ncalrpc_dir = str(directory / "ncalrpc")
        self.processes: dict[str, subprocess.Popen] = {}
        dirs = {name: directory / name for name in ("pid", "lock", "state", "cache", "private", "ncalrpc", "log")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        Path(self.conf).write_text(f"""[global]
    server role = standalone server
    workgroup = FSRVPLAB
    netbios name = FSRVPSMB
    interfaces = 127.0.0.1
    bind interfaces only = yes
    smb ports = {self.port}
    pid directory = {dirs['pid']}
    lock directory = {dirs['lock']}
    state directory = {dirs['state']}
    cache directory = {dirs['cache']}
    private dir = {dirs['private']}
    ncalrpc dir = {dirs['ncalrpc']}
    passdb backend = tdbsam:{dirs['private']}/passdb.tdb
    log file = {dirs['log']}/%m.log
{FSRVPD_LINES}{'    rpc start on demand helpers = yes' + chr(10) if on_demand_helpers else ''}    load printers = no
    disable spoolss = yes
    server min protocol = SMB3
""")

    # -- life cycle ---------------------------------------------------------------------------
    def setup_accounts(self) -> SambaServer:
        for user, password in ((USER, PASSWORD), (PLAIN_USER, PLAIN_PASSWORD), (ADMIN, ADMIN_PASSWORD)):
            _run("smbpasswd", "-c", self.conf, "-s", "-a", user, input_text=f"{password}\n{password}\n")
        self.net("groupmap", "add", "sid=S-1-5-32-551", "unixgroup=backup", "type=builtin",
                 "ntgroup=Backup Operators")
        self.net("sam", "addmem", "BUILTIN\\Backup Operators", USER)
        return self

    def start(self) -> SambaServer:
        logs = self.directory / "log"
        self._spawn("smbd", ["smbd", "-F", "--no-process-group", "-s", self.conf], logs / "smbd.out")
        helpers = [os.path.join(LIBEXEC, helper) for helper in self.helpers]
        self._spawn("samba-dcerpcd", [os.path.join(LIBEXEC, "samba-dcerpcd"), "-F", "--no-process-group", "-s",
                                      self.conf, *helpers], logs / "dcerpcd.out")
        deadline = time.monotonic() + START_SECONDS
        while not (self._listening() and os.path.exists(os.path.join(self.ncalrpc_dir, "np", "srvsvc"))):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes.values()):
                raise RuntimeError(f"Samba did not start; see {logs}")
            time.sleep(0.1)
        return self

    def _spawn(self, name: str, argv: list[str], log_path: Path) -> None:
        with open(log_path, "ab") as log:
            self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True)

    def _listening(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop_smbd(self) -> None:
        self._stop("smbd")

    def restart_smbd(self) -> None:
        self._stop("smbd")
        self._spawn("smbd", ["smbd", "-F", "--no-process-group", "-s", self.conf],
                    self.directory / "log" / "smbd.out")
        deadline = time.monotonic() + START_SECONDS
        while not self._listening():
            if time.monotonic() > deadline:
                raise RuntimeError("smbd did not come back")
            time.sleep(0.1)

    def _stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)  # its own session: smbd's children go too
        try:
            process.wait(timeout=START_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # helpers (rpcd_*, smbd children) that outlived it
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        for name in list(self.processes):
            self._stop(name)

    # -- tools --------------------------------------------------------------------------------
    def smbpasswd(self, *args: str) -> str:
        return _run("smbpasswd", "-c", self.conf, *args)

    def net(self, *args: str) -> str:
        return _run("net", "-s", self.conf, *args)

    def add_share(self, name: str, path: str) -> None:
        self.net("conf", "addshare", name, path, "writeable=y", "guest_ok=n")

    def registry_shares(self) -> list[str]:
        return self.net("conf", "listshares").split()

    def sddl(self, share: str) -> str:
        return _run("sharesec", "-s", self.conf, share, "--viewsddl").strip()

    def set_sddl(self, share: str, sddl: str) -> None:
        _run("sharesec", "-s", self.conf, share, f"--setsddl={sddl}")

    def rpcclient(self, *commands: str, user: str = USER, password: str = PASSWORD,
                  binding: str = "127.0.0.1") -> str:
        """rpcclient over SMB3 through smbd (`binding` adds RPC-level auth, e.g. 'ncacn_np:127.0.0.1[sign]');
        it exits 0 even when a call fails, so callers read its output."""
        proc = subprocess.run(["rpcclient", "-m", "SMB3", "-p", str(self.port), "-U", f"{user}%{password}",
                               binding, "-c", "; ".join(commands)], capture_output=True, text=True, timeout=120)
        return proc.stdout + proc.stderr

    def smbclient(self, share: str, command: str, user: str = USER, password: str = PASSWORD) -> str:
        proc = subprocess.run(["smbclient", "-m", "SMB3", "-p", str(self.port), "-U", f"{user}%{password}",
                               f"//127.0.0.1/{share}", "-c", command], capture_output=True, text=True, timeout=120)
        return proc.stdout + proc.stderr

    def share_list(self) -> str:
        proc = subprocess.run(["smbclient", "-m", "SMB3", "-p", str(self.port), "-U", f"{USER}%{PASSWORD}", "-L",
                               "127.0.0.1"], capture_output=True, text=True, timeout=120)
        return proc.stdout + proc.stderr


class SambaFsrvpd(FsrvpDaemon):
    """fsrvpd in samba mode behind `samba`; its shares are registry shares of that smbd."""

    def __init__(self, samba_server: SambaServer, pool, directory: Path, shares: tuple[str, ...] = ("vms", "sql"),
                 **timers):
        super().__init__(pool, directory, shares, **timers)
        os.chmod(pool.directory, 0o755)  # smbd works as the logged-on user, who must reach the mounts below
        self.samba = samba_server
        self.port = samba_server.port
        self.config["front_door"] = {"mode": "samba", "smb_conf": samba_server.conf}
        del self.config["users"]
        self.config["shares"] = {}  # Samba's shares, zfs, dataset found from the path
        for share, path in self.paths.items():
            os.chmod(path, 0o777)  # the share's users write there (its snapshots inherit the mode)
            samba_server.add_share(share, path)
        self._log_offset = 0

    def start(self) -> SambaFsrvpd:
        self._log_offset = len(self.log())
        return super().start()

    def _listening(self) -> bool:
        return "(samba front door)" in self.log()[self._log_offset:]

    def rpcclient(self, *commands: str, user: str = USER, password: str = PASSWORD,
                  binding: str = "127.0.0.1") -> str:
        return self.samba.rpcclient(*commands, user=user, password=password, binding=binding)

    def smbclient(self, share: str, command: str, user: str = USER, password: str = PASSWORD) -> str:
        return self.samba.smbclient(share, command, user=user, password=password)

    def remove_base_shares(self) -> None:
        for share in self.paths:
            self.samba.net("conf", "delshare", share)


@pytest.fixture(scope="module")
def samba(samba_clients):
    """One private smbd (and samba-dcerpcd) for a test module, stopped and removed afterwards."""
    ensure_samba()
    directory = Path(tempfile.mkdtemp(prefix="fsrvpd-samba-"))
    server = SambaServer(directory).setup_accounts().start()
    yield server
    server.stop()
    shutil.rmtree(directory)

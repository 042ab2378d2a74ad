"""What fsrvpd needs to run, and what it keeps to itself: it runs inside the capability bounding
set of its systemd unit, listens on nothing but its SMB port and its root-only admin socket, keeps
its state root-only, and warns when its configuration's NT hashes are readable by others."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from tests.support.daemon import FsrvpDaemon, ours_on_storage

pytestmark = pytest.mark.zfs

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "fsrvpd.service"
TCP_LISTEN = "0A"
UNIX_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix


def unit_setting(name: str) -> str:
    return re.search(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE).group(1)


def unit_capabilities() -> list[str]:
    return unit_setting("CapabilityBoundingSet").split()


def bounding_set(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("CapBnd:")), 16)


def capability_bits(names: list[str]) -> int:
    numbers = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
               "CAP_NET_BIND_SERVICE": 10, "CAP_IPC_LOCK": 14, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24}
    return sum(1 << numbers[name] for name in names)


def test_a_backup_runs_inside_the_units_capability_bounding_set(zfs_pool, tmp_path, samba_clients):
    """The unit's set, as far as this sandbox has it (it lacks CAP_SYS_RESOURCE): a bounding set
    only ever shrinks."""
    capabilities = unit_capabilities()
    assert unit_setting("NoNewPrivileges") == "yes"
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    daemon.wrapper = ["setpriv", "--no-new-privs", "--inh-caps=-all",
                      "--bounding-set=-all," + ",".join("+" + name.lower().removeprefix("cap_") for name in capabilities)]
    with daemon.start():
        assert bounding_set(daemon.process.pid) == capability_bits(capabilities) & bounding_set(os.getpid())
        output = daemon.rpcclient("fss_create_expose backup ro vms")
        set_id, copy_id = re.search(r"^(\S{36})\((\S{36})\): share", output, re.MULTILINE).groups()
        assert "shadow-copy deleted" in daemon.rpcclient(f"fss_delete vms {set_id} {copy_id}"), daemon.log()
    assert ours_on_storage(zfs_pool) == []


def listening_sockets(pid: int) -> tuple[set[int], int]:
    """The TCP ports and the number of Unix sockets on which process `pid` accepts connections."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.exists(f"/proc/{pid}/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[9]) in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    unix = sum(1 for line in Path("/proc/net/unix").read_text().splitlines()[1:]
               if int(line.split()[3], 16) & UNIX_ACCEPTING and int(line.split()[6]) in inodes)
    return ports, unix


def test_the_smb_port_and_the_root_only_admin_socket_are_the_only_ways_in(daemon):
    with daemon.client() as client:
        client.get_supported_version()  # srvsvc, wkssvc and FSRVP pipes have all been set up by now
    assert listening_sockets(daemon.process.pid) == ({daemon.port}, 1)  # no metrics port configured here
    admin = Path(daemon.admin_socket)
    assert stat.S_ISSOCK(admin.stat().st_mode) and stat.S_IMODE(admin.stat().st_mode) == 0o600
    assert admin.stat().st_uid == 0


def test_state_and_mount_points_are_root_only(daemon):
    with daemon.client() as client:
        mapping, = client.backup_cycle(["vms"])  # the state is written, a clone is mounted
        state_dir = Path(daemon.config["state_dir"])
        mount_root = Path(daemon.config["mount_root"])
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        files = list(state_dir.iterdir())
        assert {path.name for path in files} >= {"state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm"}
        assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in files} == \
            {path.name: 0o600 for path in files}
        assert all(path.stat().st_uid == 0 for path in files)
        # smbd serves clones as the connecting user, so the mount root is traversable, never writable
        assert stat.S_IMODE(mount_root.stat().st_mode) == 0o755 and mount_root.stat().st_uid == 0
        client.delete_share_mapping(mapping.set_id, mapping.copy_id, "vms")


def test_a_state_directory_made_too_wide_is_narrowed(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    state_dir = Path(daemon.config["state_dir"])
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    with daemon.start():
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_configuration_readable_by_others_is_warned_about(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    daemon.config_mode = 0o644
    with daemon.start():
        assert "holds NT hashes (password equivalents) but is readable by its group and all users: chmod 600 it" \
            in daemon.log()
    daemon.config_mode = 0o600
    with daemon.start():
        assert daemon.log().count("holds NT hashes") == 1  # the root-only file passes quietly

"""The production shape: a real smbd serves the shares over SMB3 and hands \\PIPE\\FssagentRpc to a
real fsrvpd (samba mode) on a zfs-fuse pool; rpcclient and smbclient talk to smbd only.

One smbd per module (fixture `samba`), one fsrvpd and one pool per test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from impacket import ntlm as impacket_ntlm

from fsrvpd.runner import CommandRunner
from fsrvpd.samba import SambaPassdbAccounts, SambaTools
from tests.support.daemon import PASSWORD, ours_on_storage
from tests.support.samba import ADMIN, ADMIN_PASSWORD, PLAIN_PASSWORD, PLAIN_USER, SambaFsrvpd, SambaServer
from tests.test_e2e_rpcclient import EXPOSED, create_expose, delete, write

pytestmark = [pytest.mark.zfs, pytest.mark.samba_client]

BASE_SDDL = "D:(A;;0x001f01ff;;;BA)(A;;0x001f01ff;;;BO)(A;;0x001200a9;;;AU)"
E_ACCESSDENIED = "0x80070005"
WAIT_SECONDS = 30.0


@pytest.fixture
def fsrvpd(samba, zfs_pool, tmp_path):
    running = SambaFsrvpd(samba, zfs_pool, tmp_path).start()
    yield running
    status = running.stop()
    running.remove_base_shares()
    if status not in (0, None):
        print(running.log())


def snapshot_shares(samba) -> list[str]:
    return [name for name in samba.registry_shares() if "@{" in name]


def assert_nothing_left(fsrvpd) -> None:
    assert fsrvpd.removals_done() and ours_on_storage(fsrvpd.pool) == []
    assert snapshot_shares(fsrvpd.samba) == []


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def test_read_only_cycle_through_smbd_over_smb3(fsrvpd, tmp_path):
    samba = fsrvpd.samba
    samba.set_sddl("vms", BASE_SDDL)
    write(f"{fsrvpd.paths['vms']}/disk.vhdx", "before the commit\n")
    set_id, copies = create_expose(fsrvpd, "ro", "vms")
    share = f"vms@{{{copies['vms']}}}"
    write(f"{fsrvpd.paths['vms']}/disk.vhdx", "after the commit, longer\n")

    assert "before the commit" in samba.smbclient(share, "get disk.vhdx -")
    write(tmp_path / "local.txt", "x")
    assert "NT_STATUS_ACCESS_DENIED" in samba.smbclient(share, f"put {tmp_path / 'local.txt'} new.txt")
    assert share in samba.share_list()
    registry = samba.net("conf", "showshare", share)
    assert "read only = yes" in registry and "fsrvpd:base = vms" in registry

    assert samba.sddl(share) == samba.sddl("vms") == BASE_SDDL
    info = samba.rpcclient(f"netsharegetinfo '{share}' 502", user=ADMIN, password=ADMIN_PASSWORD)
    assert [sid for sid in re.findall(r"SID: (S-[\d-]+)", info)] == ["S-1-5-32-544", "S-1-5-32-551", "S-1-5-11"], info

    assert "marked recovery complete" in fsrvpd.rpcclient(f"fss_recovery_complete {set_id}")
    delete(fsrvpd, set_id, copies)
    assert share not in samba.share_list()
    assert "NT_STATUS_BAD_NETWORK_NAME" in samba.smbclient(share, "ls")
    assert_nothing_left(fsrvpd)


def test_auto_recovery_share_is_writable_until_recovery_complete(fsrvpd, tmp_path):
    samba = fsrvpd.samba
    write(tmp_path / "local.txt", "written by a VSS writer during recovery\n")
    set_id, copies = create_expose(fsrvpd, "rw", "vms", "sql")
    share = f"vms@{{{copies['vms']}}}"

    samba.smbclient(share, f"put {tmp_path / 'local.txt'} recovered.txt")
    assert "written by a VSS writer" in samba.smbclient(share, "get recovered.txt -")
    assert "read only = no" in samba.net("conf", "showshare", share)

    assert "marked recovery complete" in fsrvpd.rpcclient(f"fss_recovery_complete {set_id}")
    assert "read only = yes" in samba.net("conf", "showshare", share)
    assert "NT_STATUS_ACCESS_DENIED" in samba.smbclient(share, f"put {tmp_path / 'local.txt'} late.txt")
    assert "late.txt" not in samba.smbclient(share, "ls")

    delete(fsrvpd, set_id, copies)
    assert_nothing_left(fsrvpd)


def test_only_administrators_backup_operators_and_listed_accounts_change_state(fsrvpd):
    samba = fsrvpd.samba
    refused = samba.rpcclient("fss_create_expose backup ro vms", user=PLAIN_USER, password=PLAIN_PASSWORD)
    assert E_ACCESSDENIED in refused and "shadow-copy set created" not in refused, refused
    # As on Windows, read-only queries too need the groups unless authorization.open_queries says otherwise.
    assert E_ACCESSDENIED in samba.rpcclient("fss_is_path_sup vms", user=PLAIN_USER, password=PLAIN_PASSWORD)
    assert ours_on_storage(fsrvpd.pool) == []
    assert f"{PLAIN_USER} (rpc -) from" in fsrvpd.log() and "authz=denied" in fsrvpd.log()

    set_id, copies = create_expose(fsrvpd, "ro", "vms")  # USER is a Backup Operators member
    delete(fsrvpd, set_id, copies)

    fsrvpd.stop()
    fsrvpd.config["authorization"] = {"allow": [PLAIN_USER]}
    fsrvpd.start()
    output = samba.rpcclient("fss_create_expose backup ro vms", user=PLAIN_USER, password=PLAIN_PASSWORD)
    assert "shadow-copy set created" in output, output
    set_id = re.search(r"^(\S+): shadow-copy set created", output, re.MULTILINE).group(1)
    copy_id = re.search(r"\((\S+)\): share", output).group(1)
    assert "shadow-copy deleted" in samba.rpcclient(f"fss_delete vms {set_id} {copy_id}", user=PLAIN_USER,
                                                    password=PLAIN_PASSWORD)
    assert_nothing_left(fsrvpd)


def test_rpc_authentication_behind_smbd_checks_samba_accounts(samba, zfs_pool, tmp_path):
    """rpc.min_auth_level integrity in samba mode: the bind's NTLM, relayed by smbd, is checked
    against Samba's passdb; signed and sealed cycles work, an unsigned call is refused."""
    fsrvpd = SambaFsrvpd(samba, zfs_pool, tmp_path)
    fsrvpd.config["rpc"] = {"min_auth_level": "integrity"}
    fsrvpd.start()
    try:
        assert E_ACCESSDENIED in fsrvpd.rpcclient("fss_is_path_sup vms")
        created = fsrvpd.rpcclient("fss_create_expose backup ro vms", binding="ncacn_np:127.0.0.1[seal]")
        [(set_id, copy_id, _, _)] = EXPOSED.findall(created)
        assert "NT_STATUS" not in fsrvpd.smbclient(f"vms@{{{copy_id}}}", "ls")
        deleted = fsrvpd.rpcclient(f"fss_delete vms {set_id} {copy_id}", binding="ncacn_np:127.0.0.1[sign]")
        assert "shadow-copy deleted" in deleted, deleted + fsrvpd.log()
        assert re.search(r"RPC authentication of \S*backup \(winnt, pkt_privacy\)", fsrvpd.log()), fsrvpd.log()
        assert_nothing_left(fsrvpd)
    finally:
        fsrvpd.stop()
        fsrvpd.remove_base_shares()


def test_samba_accounts_are_read_from_samba_passdb(samba):
    """The accounts RPC logons are checked against: enabled passdb accounts, with their NT hash."""
    accounts = SambaPassdbAccounts(SambaTools(CommandRunner(), samba.conf, str(samba.directory / "tmp")))
    assert accounts.nt_hash("BACKUP") == ("backup", impacket_ntlm.compute_nthash(PASSWORD))
    assert accounts.nt_hash("nobody-here") is None
    samba.smbpasswd("-d", PLAIN_USER)
    try:
        assert accounts.nt_hash(PLAIN_USER) is None
    finally:
        samba.smbpasswd("-e", PLAIN_USER)


def test_retained_copies_are_previous_versions_of_the_share(samba, zfs_pool, tmp_path):
    """retention.previous_versions: smbd's vfs_shadow_copy2, pointed at fsrvpd's `@GMT-` links,
    lists each retained backup as a previous version of the base share and serves its old bytes."""
    fsrvpd = SambaFsrvpd(samba, zfs_pool, tmp_path)
    fsrvpd.config["shares"] = {"vms": {"retention": {"keep_last": 1, "previous_versions": True}}}
    snapdir = os.path.join(fsrvpd.config["mount_root"], "previous-versions", "vms")
    for parameter, value in (("vfs objects", "shadow_copy2"), ("shadow:snapdir", snapdir),
                             ("shadow:mountpoint", fsrvpd.paths["vms"])):
        samba.net("conf", "setparm", "vms", parameter, value)
    disk = os.path.join(fsrvpd.paths["vms"], "disk.vhdx")
    fsrvpd.start()
    try:
        versions = []
        for version in ("version 1", "version 2"):
            write(disk, version)
            set_id, copies = create_expose(fsrvpd, "ro", "vms")
            delete(fsrvpd, set_id, copies)
            write(disk, "current")
            tokens = re.findall(r"^@GMT-[0-9.-]+$", fsrvpd.smbclient("vms", "allinfo disk.vhdx"), re.MULTILINE)
            assert len(tokens) == 1 and tokens[0] not in versions, tokens
            assert version in fsrvpd.smbclient("vms", f"get {tokens[0]}/disk.vhdx -")
            versions.append(tokens[0])
            time.sleep(1.1)  # the next backup's @GMT- name is a second later
        [retained] = json.loads(fsrvpd.ctl("--json", "retained").stdout)
        assert fsrvpd.ctl("unretain", retained["copy_id"]).returncode == 0
        assert "@GMT-" not in fsrvpd.smbclient("vms", "allinfo disk.vhdx")
        assert_nothing_left(fsrvpd)
        assert os.listdir(os.path.dirname(snapdir)) == []
    finally:
        fsrvpd.stop()
        fsrvpd.remove_base_shares()


def test_expiry_removes_the_snapshot_share(samba, zfs_pool, tmp_path):
    fsrvpd = SambaFsrvpd(samba, zfs_pool, tmp_path, sequence_seconds=3, sequence_long_seconds=3).start()
    try:
        create_expose(fsrvpd, "rw", "vms")  # exposed, never recovered: the sequence timer runs
        wait_for(lambda: not snapshot_shares(samba) and not ours_on_storage(zfs_pool), "the expired set is gone")
    finally:
        fsrvpd.stop()
        fsrvpd.remove_base_shares()


def test_fsrvpd_restart_keeps_live_shares_and_removes_orphans(fsrvpd):
    samba = fsrvpd.samba
    write(f"{fsrvpd.paths['vms']}/disk.vhdx", "kept across restarts\n")
    set_id, copies = create_expose(fsrvpd, "ro", "vms")
    share = f"vms@{{{copies['vms']}}}"
    orphan = f"vms@{{{uuid.uuid4()}}}"  # what a crash between publishing and recording could leave
    samba.add_share(orphan, fsrvpd.paths["vms"])
    samba.net("conf", "setparm", orphan, "fsrvpd:base", "vms")
    foreign = f"sql@{{{uuid.uuid4()}}}"  # same shape, not ours: must stay
    samba.add_share(foreign, fsrvpd.paths["sql"])

    fsrvpd.stop(signal.SIGKILL)
    fsrvpd.start()
    shares = snapshot_shares(samba)
    assert share in shares and foreign in shares and orphan not in shares
    assert "kept across restarts" in samba.smbclient(share, "get disk.vhdx -")
    delete(fsrvpd, set_id, copies)
    samba.net("conf", "delshare", foreign)
    assert_nothing_left(fsrvpd)


def test_smbd_restart_mid_cycle_leaves_the_state_intact(fsrvpd):
    samba = fsrvpd.samba
    write(f"{fsrvpd.paths['sql']}/db.mdf", "database at commit\n")
    set_id, copies = create_expose(fsrvpd, "ro", "sql")
    samba.restart_smbd()
    share = f"sql@{{{copies['sql']}}}"
    assert "database at commit" in samba.smbclient(share, "get db.mdf -")
    assert f"is a shadow-copy of" in fsrvpd.rpcclient(f"fss_get_mapping sql {set_id} {copies['sql']}")
    delete(fsrvpd, set_id, copies)
    assert_nothing_left(fsrvpd)
    assert fsrvpd.alive()


def _start_failure(tmp_path, smb_conf: str) -> str:
    """Run fsrvpd in samba mode against `smb_conf`; it must exit at once and say why."""
    config = tmp_path / "fsrvpd.yaml"
    config.write_text(f"front_door: {{mode: samba, smb_conf: {smb_conf}}}\nstate_dir: {tmp_path / 'state'}\n")
    proc = subprocess.run([sys.executable, "-m", "fsrvpd", "run", "-c", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stderr


def test_start_up_says_what_is_wrong_with_samba(tmp_path):
    on_demand = SambaServer(tmp_path / "on-demand", on_demand_helpers=True)
    assert "rpc start on demand helpers = no" in _start_failure(tmp_path, on_demand.conf)

    server = SambaServer(tmp_path / "lab")
    np_dir = tmp_path / "lab" / "ncalrpc" / "np"
    np_dir.mkdir(mode=0o755)
    np_dir.chmod(0o755)
    assert "mode 0755" in _start_failure(tmp_path, server.conf) and "chmod 0700" in _start_failure(tmp_path,
                                                                                                server.conf)
    np_dir.chmod(0o700)
    with socket.socket(socket.AF_UNIX) as squatter:  # e.g. samba-dcerpcd running rpcd_fsrvp
        squatter.bind(str(np_dir / "fssagentrpc"))
        squatter.listen(1)
        assert "is taken" in _start_failure(tmp_path, server.conf)
    assert "cannot read Samba's configuration" in _start_failure(tmp_path, str(tmp_path / "missing.conf"))

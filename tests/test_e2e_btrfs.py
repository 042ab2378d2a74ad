"""The backup cycle on btrfs: a real fsrvpd process with shares on subvolumes of a loop-mounted
btrfs, driven by Samba's rpcclient and smbclient (and fsrvpctl), as on ZFS in test_e2e_rpcclient.py.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.daemon import ours_after_cleanup
from tests.support.lvm import run
from tests.test_e2e_rpcclient import assert_writable_until_recovery_complete, create_expose, delete, write

pytestmark = [pytest.mark.btrfs, pytest.mark.samba_client]

NOT_SUPPORTED = "0x8004230c"


def test_read_only_cycle_serves_the_bytes_of_the_commit_and_leaves_nothing(btrfs_daemon, tmp_path):
    daemon = btrfs_daemon
    write(f"{daemon.paths['vms']}/disk.vhdx", "vms before the commit\n")
    write(f"{daemon.paths['sql']}/db.mdf", "sql before the commit\n")
    set_id, copies = create_expose(daemon, "ro", "vms", "sql")
    write(f"{daemon.paths['vms']}/disk.vhdx", "after the commit, longer\n")

    local = tmp_path / "local.txt"
    local.write_text("x")
    seen = daemon.smbclient(f"vms@{{{copies['vms']}}}", f"get disk.vhdx -; put {local} new.txt")
    assert "vms before the commit" in seen and "NT_STATUS_ACCESS_DENIED" in seen, seen
    assert "sql before the commit" in daemon.smbclient(f"sql@{{{copies['sql']}}}", "get db.mdf -")
    assert "after the commit" in daemon.smbclient("vms", "get disk.vhdx -")
    assert "has an associated shadow-copy" in daemon.rpcclient("fss_has_shadow_copy vms")
    assert sorted(entry for entry in daemon.pool.ours() if "/" in entry and entry[0] != "/") == \
        sorted(f"{set_id}/{copy_id}" for copy_id in copies.values())

    assert "marked recovery complete" in daemon.rpcclient(f"fss_recovery_complete {set_id}")
    delete(daemon, set_id, copies)
    assert ours_after_cleanup(daemon.pool) == []  # no snapshot, set directory or mount of the file system
    assert "NT_STATUS_BAD_NETWORK_NAME" in daemon.smbclient(f"vms@{{{copies['vms']}}}", "ls")


def test_auto_recovery_snapshot_is_writable_until_recovery_complete(btrfs_daemon, tmp_path):
    daemon = btrfs_daemon
    set_id, copies = assert_writable_until_recovery_complete(daemon, tmp_path)
    snapshot = os.path.join(daemon.pool.snapshots(), set_id, copies["vms"])
    assert run("btrfs", "property", "get", "-ts", snapshot, "ro").strip() == "ro=true"

    delete(daemon, set_id, copies)
    assert ours_after_cleanup(daemon.pool) == []


def test_share_with_a_subvolume_below_is_not_supported_and_the_doctor_says_why(btrfs_daemon):
    daemon = btrfs_daemon
    daemon.pool.subvolume("sql/nested")
    assert NOT_SUPPORTED in daemon.rpcclient("fss_is_path_sup sql").lower()
    assert NOT_SUPPORTED in daemon.rpcclient("fss_create_expose backup ro sql").lower()
    diagnosis = daemon.ctl("--json", "doctor", "sql")
    verdict = json.loads(diagnosis.stdout)
    assert not verdict["can_shadow_copy"], diagnosis.stdout
    assert "1 subvolume(s)" in next(check["detail"] for check in verdict["checks"] if check["check"] == "layout")
    healthy = json.loads(daemon.ctl("--json", "doctor", "vms").stdout)
    assert healthy["can_shadow_copy"], healthy
    assert "pool space" in {check["check"] for check in healthy["checks"]}
    assert daemon.pool.ours() == []


def test_exposed_share_survives_a_reboot_of_the_host(btrfs_daemon):
    """After a reboot the backend's mounts are gone; the restarted daemon mounts its top level and
    the exposure again, and the share serves the committed bytes."""
    daemon = btrfs_daemon
    write(f"{daemon.paths['vms']}/f", "as committed\n")
    set_id, copies = create_expose(daemon, "ro", "vms")
    daemon.stop()
    for mountpoint in daemon.pool.mounts():
        if mountpoint != daemon.pool.mountpoint:
            run("umount", mountpoint)
    daemon.start()
    assert "as committed" in daemon.smbclient(f"vms@{{{copies['vms']}}}", "get f -")
    delete(daemon, set_id, copies)
    assert ours_after_cleanup(daemon.pool) == []

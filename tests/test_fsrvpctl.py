"""fsrvpctl against a real daemon on a zfs-fuse pool, through its admin socket: every command in
human and JSON form, the exit codes scripts rely on, and the root-only rule (checked by running
fsrvpctl as `nobody`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from fsrvpd import messages as m
from fsrvpd.constants import HResult
from tests.support.daemon import FsrvpDaemon, ours_on_storage
from tests.support.zfs import zfs

pytestmark = pytest.mark.zfs

REPO = Path(__file__).resolve().parent.parent
OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3


def ctl_json(daemon: FsrvpDaemon, *args: str):
    proc = daemon.ctl("--json", *args)
    assert proc.returncode == OK, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_status_sets_shares_and_delete(daemon):
    with daemon.client() as client:
        set_id = client.backup_cycle(["vms", "sql"])[0].set_id
        assert client.call(m.CommitShadowCopySetRequest(set_id, 1000)).result == HResult.FSRVP_E_BAD_STATE
    status = daemon.ctl("status")
    assert status.returncode == OK and "sets:        1 Exposed" in status.stdout, status
    assert f"refused: FSRVP_E_BAD_STATE: set {set_id} is Exposed" in status.stdout  # why the call failed
    problem, = ctl_json(daemon, "status")["recent_problems"]
    assert problem["fields"]["FSRVP_OPERATION"] == "CommitShadowCopySet"
    assert problem["fields"]["FSRVP_HRESULT"] == "0x80042301" and problem["fields"]["FSRVP_SET_ID"] == str(set_id)
    print(status.stdout)  # the README's samples come from here (pytest -s)
    sets = daemon.ctl("sets")
    assert sets.returncode == OK and str(set_id) in sets.stdout and "Exposed" in sets.stdout
    print(sets.stdout)
    shares = daemon.ctl("shares")
    assert shares.returncode == OK and "vms@{" in shares.stdout
    print(shares.stdout)

    described, = ctl_json(daemon, "sets")
    assert described["status"] == "Exposed" and described["shares"] == ["vms", "sql"]
    assert described["client"] == "127.0.0.1" and described["principal"].endswith("\\backup@127.0.0.1")
    exposed = [entry["name"] for entry in ctl_json(daemon, "shares")["shadow_copy_shares"]]
    assert len(exposed) == 2

    assert daemon.ctl("delete", str(set_id)).returncode == OK
    assert ours_on_storage(daemon.pool) == []
    assert "NT_STATUS_BAD_NETWORK_NAME" in daemon.smbclient(exposed[0], "ls")
    assert ctl_json(daemon, "sets") == []
    for unknown in (str(uuid.uuid4()), "not-a-guid"):
        refused = daemon.ctl("delete", unknown)
        assert refused.returncode == FAILED and refused.stderr.startswith("fsrvpctl: delete: "), refused


def test_prune_removes_tagged_storage_no_set_owns(daemon):
    dataset = daemon.datasets["vms"]
    orphan_set = uuid.uuid4()
    zfs("snapshot", "-o", f"fsrvpd:set={orphan_set}", "-o", f"fsrvpd:copy={uuid.uuid4()}",
        f"{dataset}@fsrvpd-{orphan_set}")
    zfs("snapshot", f"{dataset}@admins-own")  # not ours: must stay
    assert ctl_json(daemon, "prune") == {"expired_sets": 0, "orphans_removed": 1}
    assert zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", dataset).split() == [f"{dataset}@admins-own"]


def test_expose_publishes_an_older_snapshot_read_only_and_delete_keeps_the_snapshot(daemon):
    disk = os.path.join(daemon.paths["vms"], "disk.vhdx")
    with open(disk, "w") as handle:
        handle.write("before the upgrade\n")
        handle.flush()
        os.fsync(handle.fileno())  # zfs-fuse: through FUSE's cache to the pool before the snapshot
    snapshot = f"{daemon.datasets['vms']}@before-upgrade"
    zfs("snapshot", snapshot)
    with open(disk, "w") as handle:
        handle.write("after the upgrade\n")

    exposed = daemon.ctl("expose", snapshot)
    assert exposed.returncode == OK, exposed
    print(exposed.stdout)
    restore, = ctl_json(daemon, "sets")
    share = restore["copies"][0]["exposed_as"]
    assert restore["status"] == "Recovered" and restore["copies"][0]["restore_of"] == snapshot
    assert "before the upgrade" in daemon.smbclient(share, "get disk.vhdx -")
    assert "NT_STATUS_ACCESS_DENIED" in daemon.smbclient(share, "put /etc/hostname disk.vhdx")

    daemon.restart()  # the exposure is durable
    assert "before the upgrade" in daemon.smbclient(share, "get disk.vhdx -")
    assert daemon.ctl("delete", restore["set_id"]).returncode == OK
    assert ours_on_storage(daemon.pool) == []
    assert zfs("list", "-H", "-o", "name", snapshot).strip() == snapshot  # the admin's snapshot stays

    for wrong in (f"{daemon.datasets['vms']}@no-such-snapshot", "not-a-snapshot", "otherpool/x@y"):
        refused = daemon.ctl("expose", wrong)
        assert refused.returncode == FAILED, refused
    assert ctl_json(daemon, "sets") == []


def test_doctor_explains_what_can_and_cannot_be_shadow_copied(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms", "nested"))
    inside = os.path.join(daemon.paths["vms"], "inside")
    os.mkdir(inside)
    zfs_pool.dataset("nested/child")
    daemon.config["shares"]["inside"] = {"path": inside}
    daemon.start()
    try:
        good = daemon.ctl("doctor", "vms")
        assert good.returncode == OK and "vms can be shadow-copied." in good.stdout, good
        print(good.stdout)
        report = ctl_json(daemon, "doctor", "vms")
        assert report["can_shadow_copy"] and {check["check"] for check in report["checks"]} >= {
            "configuration", "directory", "layout", "pool space", "mount root", "front door", "samba"}

        directory = daemon.ctl("doctor", "inside")
        assert directory.returncode == FAILED and "not the root of a ZFS dataset" in directory.stdout, directory
        print(directory.stdout)
        nested = daemon.ctl("doctor", "nested")
        assert nested.returncode == FAILED and "other file systems below it" in nested.stdout, nested
        missing = daemon.ctl("doctor", "nosuchshare")
        assert missing.returncode == FAILED and "no share named 'nosuchshare'" in missing.stdout
    finally:
        daemon.stop()


def test_exit_codes_and_root_only(zfs_pool, tmp_path, samba_clients):
    """fsrvpctl as `nobody`, on Debian's python3 (the venv lives under root's home, closed to nobody)."""
    public = tempfile.mkdtemp(prefix="fsrvpctl-")
    os.chmod(public, 0o755)
    os.symlink(REPO / "daemon", os.path.join(public, "fsrvpd"))
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    daemon.admin_socket = daemon.config["admin"]["socket"] = os.path.join(public, "admin.sock")
    try:
        daemon.start()
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-m",
                     "fsrvpd.ctl", "-s", daemon.admin_socket, "status"]
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": public}
        denied = subprocess.run(as_nobody, capture_output=True, text=True, timeout=60, env=env)
        assert denied.returncode == UNREACHABLE and "Permission denied" in denied.stderr, denied
        os.chmod(daemon.admin_socket, 0o666)  # past the file mode, the daemon's own peer check refuses
        refused = subprocess.run(as_nobody, capture_output=True, text=True, timeout=60, env=env)
        assert refused.returncode == UNREACHABLE and "needs root" in refused.stderr, refused

        assert daemon.ctl("no-such-command").returncode == USAGE
        daemon.stop()
        gone = daemon.ctl("status")
        assert gone.returncode == UNREACHABLE and "cannot reach fsrvpd" in gone.stderr
    finally:
        daemon.stop()
        shutil.rmtree(public)

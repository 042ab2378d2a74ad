"""The backup cycle as an independent client drives it: Samba's rpcclient and smbclient against a
real fsrvpd process on a real ZFS pool.

rpcclient exits 0 even when an FSRVP call fails, so every check reads the line it prints on
success.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest

from tests.support.daemon import ours_after_cleanup, ours_on_storage, wait_until

pytestmark = [pytest.mark.zfs, pytest.mark.samba_client]

GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
EXPOSED = re.compile(rf"^({GUID})\(({GUID})\): share \\\\[^\\]+\\(\S+) exposed as a snapshot of \\\\[^\\]+\\(\w+)",
                     re.MULTILINE)


def create_expose(daemon, mode: str, *shares: str) -> tuple[str, dict[str, str]]:
    """fss_create_expose; the set id and, per share, its shadow copy id."""
    output = daemon.rpcclient(f"fss_create_expose backup {mode} {' '.join(shares)}")
    exposed = EXPOSED.findall(output)
    assert "shadow-copy set created" in output and len(exposed) == len(shares), output + daemon.log()
    set_ids = {set_id for set_id, _, _, _ in exposed}
    assert len(set_ids) == 1
    copies = {share: copy_id for _, copy_id, _, share in exposed}
    assert all(name == f"{share}@{{{copies[share]}}}" for _, _, name, share in exposed)
    return set_ids.pop(), copies


def delete(daemon, set_id: str, copies: dict[str, str]) -> None:
    for share, copy_id in copies.items():
        assert "shadow-copy deleted" in daemon.rpcclient(f"fss_delete {share} {set_id} {copy_id}")


def write(path: str, content: str) -> None:
    with open(path, "w") as handle:
        handle.write(content)


def test_version_and_support_queries(daemon):
    assert "supports FSRVP versions from 1 to 1" in daemon.rpcclient("fss_get_sup_version")
    assert "supports shadow copy requests" in daemon.rpcclient("fss_is_path_sup vms")
    assert "does not have an associated shadow-copy" in daemon.rpcclient("fss_has_shadow_copy vms")


def test_read_only_cycle_serves_the_bytes_of_the_commit_and_leaves_nothing(daemon, tmp_path):
    write(f"{daemon.paths['vms']}/disk.vhdx", "before the commit\n")
    set_id, copies = create_expose(daemon, "ro", "vms")
    write(f"{daemon.paths['vms']}/disk.vhdx", "after the commit, longer\n")
    share = f"vms@{{{copies['vms']}}}"

    assert "before the commit" in daemon.smbclient(share, "get disk.vhdx -")
    assert "after the commit" in daemon.smbclient("vms", "get disk.vhdx -")
    write(tmp_path / "local.txt", "x")
    assert "NT_STATUS_ACCESS_DENIED" in daemon.smbclient(share, f"put {tmp_path / 'local.txt'} new.txt")

    mapping = daemon.rpcclient(f"fss_get_mapping vms {set_id} {copies['vms']}")
    assert f"share \\\\127.0.0.1\\{share} is a shadow-copy of \\\\127.0.0.1\\vms\\ at" in mapping
    assert "has an associated shadow-copy" in daemon.rpcclient("fss_has_shadow_copy vms")
    assert "marked recovery complete" in daemon.rpcclient(f"fss_recovery_complete {set_id}")

    delete(daemon, set_id, copies)
    assert ours_after_cleanup(daemon.pool) == []
    assert "NT_STATUS_BAD_NETWORK_NAME" in daemon.smbclient(share, "ls")
    assert "does not have an associated shadow-copy" in daemon.rpcclient("fss_has_shadow_copy vms")


def assert_writable_until_recovery_complete(daemon, tmp_path) -> tuple[str, dict[str, str]]:
    """An auto-recovery set of `vms`: its share takes a write (which a reconciliation keeps) that the
    base share never sees, until fss_recovery_complete; then it refuses writes. The set id and copies."""
    local = tmp_path / "local.txt"
    local.write_text("written by a VSS writer during recovery\n")
    set_id, copies = create_expose(daemon, "rw", "vms")
    share = f"vms@{{{copies['vms']}}}"

    daemon.smbclient(share, f"put {local} recovered.txt")
    assert daemon.ctl("prune").returncode == 0  # a reconciliation finds the writable exposure and keeps it
    assert "written by a VSS writer" in daemon.smbclient(share, "get recovered.txt -")
    assert not os.path.exists(os.path.join(daemon.paths["vms"], "recovered.txt"))  # the copy, not the share

    assert "marked recovery complete" in daemon.rpcclient(f"fss_recovery_complete {set_id}")
    assert "NT_STATUS_ACCESS_DENIED" in daemon.smbclient(share, f"put {local} late.txt")
    assert "late.txt" not in daemon.smbclient(share, "ls")
    return set_id, copies


def test_auto_recovery_snapshot_is_writable_until_recovery_complete(daemon, tmp_path):
    set_id, copies = assert_writable_until_recovery_complete(daemon, tmp_path)
    delete(daemon, set_id, copies)
    assert ours_after_cleanup(daemon.pool) == []


def test_one_set_snapshots_several_shares(daemon):
    write(f"{daemon.paths['vms']}/a", "vms at commit\n")
    write(f"{daemon.paths['sql']}/b", "sql at commit\n")
    set_id, copies = create_expose(daemon, "ro", "vms", "sql")
    assert "vms at commit" in daemon.smbclient(f"vms@{{{copies['vms']}}}", "get a -")
    assert "sql at commit" in daemon.smbclient(f"sql@{{{copies['sql']}}}", "get b -")
    expected = sorted(f"{daemon.datasets[s]}@fsrvpd-{set_id}" for s in ("vms", "sql"))
    # zfs-fuse snapshots the pool's root with them, destroyed once the Commit is answered and the calls pause
    assert wait_until(lambda: sorted(name for name in ours_on_storage(daemon.pool) if "@" in name) == expected)
    delete(daemon, set_id, copies)
    assert ours_after_cleanup(daemon.pool) == []


def test_refusals_reach_rpcclient_with_the_spec_codes(daemon):
    missing = str(uuid.uuid4())
    assert "0x80042308" in daemon.rpcclient("fss_is_path_sup nosuchshare")  # FSRVP_E_OBJECT_NOT_FOUND
    assert "0x80042308" in daemon.rpcclient(f"fss_delete vms {missing} {missing}")
    assert "0x80042501" in daemon.rpcclient(f"fss_recovery_complete {missing}")  # SHADOWCOPYSET_ID_MISMATCH
    assert "0x80042501" in daemon.rpcclient(f"fss_get_mapping vms {missing} {missing}")
    assert "supports FSRVP versions" in daemon.rpcclient("fss_get_sup_version")  # still serving

"""Retention ("the backup is the snapshot") and the exposure TTL, end to end on real storage.

The daemon process keeps a completed backup's snapshot after DeleteShareMapping and prunes by
count; the in-process daemon (same wiring) shows pruning by age with a moved clock, the admin API
(list, remove), the metrics of reaping and pruning, and the withdrawal of a share nobody owns.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from fsrvpd.backends.base import ShadowCopyRef
from fsrvpd.backends.zfs import clone_name, snapshot_name
from fsrvpd.constants import ATTR_AUTO_RECOVERY, Context
from fsrvpd.state import Refused
from fsrvpd.transports.base import ShareSpec
from tests.support.consistency import accepts_writes, problems
from tests.support.daemon import FsrvpDaemon, ours_on_storage, wait_until
from tests.support.inprocess import InProcessFsrvpd

pytestmark = pytest.mark.zfs


def backup(client, share: str, context: int = Context.BACKUP):
    """A complete backup of one share, mapping deleted at the end; its set and copy ids."""
    [mapping] = client.backup_cycle([share], context=context)
    client.recovery_complete(mapping.set_id)
    client.delete_share_mapping(mapping.set_id, mapping.copy_id, share)
    return mapping.set_id, mapping.copy_id


def snapshot_of(daemon, share: str, set_id) -> str:
    return f"{daemon.pool.name}/{share}@fsrvpd-{set_id}"


def test_retention_keeps_the_newest_backups_snapshots_and_prunes_older_ones(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path)
    daemon.config["shares"]["vms"]["retention"] = {"keep_last": 2}
    daemon.start()
    try:
        kept = []
        with daemon.client() as client:
            for number in range(3):
                with open(os.path.join(daemon.paths["vms"], "f"), "w") as handle:
                    handle.write(f"backup {number}\n")
                set_id, copy_id = backup(client, "vms")
                kept = (kept + [snapshot_of(daemon, "vms", set_id)])[-2:]
                assert daemon.removals_done() and sorted(ours_on_storage(zfs_pool)) == sorted(kept), daemon.log()
                assert problems(daemon) == []
                assert "NT_STATUS_BAD_NETWORK_NAME" in daemon.smbclient(f"vms@{{{copy_id}}}", "ls")
            backup(client, "sql")  # no policy: nothing of it is kept
        assert daemon.removals_done() and sorted(ours_on_storage(zfs_pool)) == sorted(kept)
        assert "retention: pruning copy" in daemon.log()
        daemon.restart()  # retained copies are durable state
        assert sorted(ours_on_storage(zfs_pool)) == sorted(kept) and problems(daemon) == []
        assert [body["share"] for body in daemon.state()[1]] == ["vms", "vms"]
        listed = daemon.ctl("--json", "retained")  # the admin's view, and removal
        oldest = json.loads(listed.stdout)[0]
        assert listed.returncode == 0 and oldest["share"] == "vms" and f"fsrvpd-{oldest['set_id']}" in kept[0]
        assert "removed" in daemon.ctl("unretain", oldest["copy_id"]).stdout
        assert ours_on_storage(zfs_pool) == kept[1:] and problems(daemon) == []
        print(daemon.ctl("retained").stdout)
    finally:
        daemon.stop()


def test_exposure_ttl_reaps_backup_sets_and_never_rollback_sets(zfs_pool, tmp_path, samba_clients):
    """Sets of every context survive a restart; past the TTL only the non-persistent ones go."""
    daemon = FsrvpDaemon(zfs_pool, tmp_path)
    daemon.start()
    try:
        exposed = {}
        with daemon.client() as client:
            for context, share in ((Context.NAS_ROLLBACK, "vms"), (Context.APP_ROLLBACK, "sql"),
                                   (Context.BACKUP, "vms"), (Context.FILE_SHARE_BACKUP, "sql")):
                [mapping] = client.backup_cycle([share], context=context)
                client.recovery_complete(mapping.set_id)
                exposed[context] = mapping
        daemon.restart()
        assert len(daemon.state()[0]) == 4
        daemon.stop()
        daemon.config["timers"]["exposure_ttl_seconds"] = 1
        time.sleep(1)
        daemon.start()
        assert wait_until(lambda: len(daemon.state()[0]) == 2)
        persistent = {exposed[Context.NAS_ROLLBACK].set_id, exposed[Context.APP_ROLLBACK].set_id}
        assert {scs["set_id"] for scs in daemon.state()[0]} == {str(set_id) for set_id in persistent}
        for context in (Context.BACKUP, Context.FILE_SHARE_BACKUP):
            assert f"exposure TTL: removing set {exposed[context].set_id}" in daemon.log()
        assert problems(daemon) == []
        daemon.restart()
        with daemon.client() as client:
            for context, share in ((Context.NAS_ROLLBACK, "vms"), (Context.APP_ROLLBACK, "sql")):
                mapping = exposed[context]
                assert client.get_share_mapping(mapping.set_id, mapping.copy_id, share).copy_id == mapping.copy_id
                client.delete_share_mapping(mapping.set_id, mapping.copy_id, share)
        assert daemon.removals_done() and ours_on_storage(zfs_pool) == []
    finally:
        daemon.stop()


@pytest.fixture
def in_process(zfs_pool, tmp_path, samba_clients):
    daemon = InProcessFsrvpd(zfs_pool, tmp_path)
    daemon.config["shares"]["vms"]["retention"] = {"keep_days": 7}
    daemon.config["timers"]["exposure_ttl_seconds"] = 86400
    yield daemon
    daemon.stop()


def test_retention_by_age_and_the_admin_api(in_process):
    daemon = in_process.start()
    service = daemon.service
    with daemon.client() as client:
        old_set, old_copy = backup(client, "vms")
        daemon.days_later(5)
        new_set, new_copy = backup(client, "vms", context=Context.BACKUP | ATTR_AUTO_RECOVERY)
    listed = service.retained_copies()
    assert [(r.copy_id, r.keeps_exposure) for r in listed] == [(old_copy, False), (new_copy, True)]
    recovered = ShadowCopyRef.of(new_set, new_copy, listed[1].store)
    # The auto-recovery copy keeps its recovered (read-only) clone: the snapshot alone predates recovery.
    assert clone_name(recovered) in ours_on_storage(daemon.pool)
    assert not accepts_writes(listed[1].exposed_path)
    daemon.days_later(3)  # the first backup is 8 days old now
    daemon.run(service.reconcile())
    assert [r.copy_id for r in service.retained_copies()] == [new_copy]
    assert daemon.metric("fsrvpd_retained_pruned_total") == 1
    assert sorted(ours_on_storage(daemon.pool)) == sorted([snapshot_name(recovered), clone_name(recovered)])
    with pytest.raises(Refused):
        daemon.run(service.remove_retained(old_copy))
    assert daemon.run(service.remove_retained(new_copy)).copy_id == new_copy
    assert service.retained_copies() == [] and ours_on_storage(daemon.pool) == []


def test_reaping_counts_for_the_metrics_and_unowned_snapshot_shares_are_withdrawn(in_process):
    daemon = in_process.start()
    service = daemon.service
    with daemon.client() as client:
        [mapping] = client.backup_cycle(["sql"])
        client.recovery_complete(mapping.set_id)
    rogue = "sql@{00000000-0000-4000-8000-000000000001}"
    daemon.run(service.front_door.publish_share(ShareSpec(rogue, daemon.paths["sql"], read_only=True)))
    daemon.run(service.reconcile())
    assert rogue not in service.front_door.share_names()
    assert daemon.metric("fsrvpd_repairs_total", repair="share_withdrawn") == 1
    assert mapping.copy_id and f"sql@{{{mapping.copy_id}}}" in service.front_door.share_names()
    daemon.days_later(1)
    daemon.run(service.tick())
    assert daemon.metric("fsrvpd_exposure_ttl_reaped_sets_total") == 1
    assert service.machine.sets == {} and ours_on_storage(daemon.pool) == []

"""Storage failing for real under a running daemon: a full pool, a dataset destroyed behind its
back, a `zfs` command that hangs.  Each must answer the right HRESULT and leave the state agreeing
with storage, mounts and shares (consistency.problems) -- and the next backup must work.
"""

from __future__ import annotations

import os
import uuid

import pytest

from fsrvpd import messages as m
from fsrvpd.client import FsrvpError
from fsrvpd.constants import Context, HResult
from tests.support.consistency import problems
from tests.support.crash import destroy_behind_its_back
from tests.support.daemon import FsrvpDaemon, ours_on_storage, wait_until
from tests.support.zfs import FilePool, fill, hanging_zfs

pytestmark = pytest.mark.zfs
H = HResult


def result_of(client, request) -> H:
    return H(client.call(request).result)


def statuses(daemon) -> list[tuple[str, int]]:
    return [(scs["status"], len(scs["copies"])) for scs in daemon.state()[0]]


def started_set(client, *shares: str) -> tuple[uuid.UUID, list[uuid.UUID]]:
    client.set_context(0)
    set_id = client.start_shadow_copy_set()
    return set_id, [client.add_to_shadow_copy_set(set_id, share) for share in shares]


def finish(client, set_id: uuid.UUID, copies: dict[str, uuid.UUID]) -> None:
    client.recovery_complete(set_id)
    for share, copy_id in copies.items():
        client.delete_share_mapping(set_id, copy_id, share)


def test_full_pool_fails_commit_and_expose_with_out_of_storage_and_keeps_the_set(zfs_daemon, tmp_path,
                                                                                     samba_clients):
    with FilePool(size_mib=64) as pool:
        daemon = FsrvpDaemon(pool, tmp_path, shares=("vms",)).start()
        try:
            with daemon.client() as client:
                set_id, [copy_id] = started_set(client, "vms")
                filler = fill(daemon.paths["vms"])
                assert result_of(client, m.CommitShadowCopySetRequest(set_id, 60000)) == H.E_OUTOFMEMORY
                assert statuses(daemon) == [("Added", 1)] and ours_on_storage(pool) == []
                assert problems(daemon) == []
                os.remove(filler)
                client.commit(set_id)  # space again: the same set commits
                filler = fill(daemon.paths["vms"])
                assert result_of(client, m.ExposeShadowCopySetRequest(set_id, 60000)) == H.E_OUTOFMEMORY
                assert statuses(daemon) == [("Committed", 1)] and len(ours_on_storage(pool)) == 1  # the snapshot
                assert problems(daemon) == []
                os.remove(filler)
                client.expose(set_id)
                assert "filler" not in daemon.smbclient(f"vms@{{{copy_id}}}", "ls")  # taken before the fill
                finish(client, set_id, {"vms": copy_id})
                full_cycle_one(client)
            assert problems(daemon) == [] and ours_on_storage(pool) == []
        finally:
            daemon.stop()


def full_cycle_one(client) -> None:
    [mapping] = client.backup_cycle(["vms"])
    finish(client, mapping.set_id, {"vms": mapping.copy_id})


def test_dataset_destroyed_between_commit_and_expose(daemon):
    with daemon.client() as client:
        set_id, [vms, sql] = started_set(client, "vms", "sql")
        client.commit(set_id)
        destroy_behind_its_back(daemon.datasets["vms"])
        assert result_of(client, m.ExposeShadowCopySetRequest(set_id, 60000)) == H.FSRVP_E_OBJECT_NOT_FOUND
        assert f"copy {vms} of share vms is lost" in daemon.log()
        assert statuses(daemon) == [("Committed", 1)] and problems(daemon) == []
        client.expose(set_id)  # what is left of the set is still good
        with pytest.raises(FsrvpError) as lost:
            client.get_share_mapping(set_id, vms, "vms")
        assert lost.value.result == H.E_INVALIDARG
        assert client.get_share_mapping(set_id, sql, "sql").copy_id == sql
        finish(client, set_id, {"sql": sql})
        assert result_of(client, m.IsPathSupportedRequest(client.unc("vms"))) == H.FSRVP_E_NOT_SUPPORTED
    assert problems(daemon) == [] and ours_on_storage(daemon.pool) == []


def test_dataset_destroyed_under_a_recovered_rollback_set(fresh_reconciling_daemon):
    """A persistent copy whose dataset goes is forgotten by the next reconciliation, share and all."""
    daemon = fresh_reconciling_daemon
    with daemon.client() as client:
        mappings = client.backup_cycle(["vms", "sql"], context=Context.NAS_ROLLBACK)
        set_id, (vms, sql) = mappings[0].set_id, [mapping.copy_id for mapping in mappings]
        client.recovery_complete(set_id)
        destroy_behind_its_back(daemon.datasets["sql"])
        assert wait_until(lambda: statuses(daemon) == [("Recovered", 1)])
        assert wait_until(lambda: problems(daemon) == [])  # the state is written before the share goes
        assert "NT_STATUS_BAD_NETWORK_NAME" in daemon.smbclient(f"sql@{{{sql}}}", "ls")
        with pytest.raises(FsrvpError) as lost:
            client.get_share_mapping(set_id, sql, "sql")
        assert lost.value.result == H.E_INVALIDARG
        client.delete_share_mapping(set_id, vms, "vms")
    assert problems(daemon) == [] and ours_on_storage(daemon.pool) == []


@pytest.fixture
def fresh_reconciling_daemon(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path)
    daemon.config["timers"]["reconcile_seconds"] = 1
    yield daemon.start()
    daemon.stop()


@pytest.fixture
def hang_control(zfs_pool, tmp_path, samba_clients):
    """A daemon (share vms) whose `zfs` hangs on demand, with a 3 s per-command timeout; the control directory."""
    bin_dir, control = hanging_zfs(str(tmp_path / "wrapper"))
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    daemon.env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    daemon.config["storage"] = {"command_timeout_seconds": 3}
    daemon.start()
    yield daemon, control
    daemon.stop()


def hang(control: str, subcommand: str, when: str) -> str:
    marker = os.path.join(control, subcommand)
    with open(marker, "w") as handle:
        handle.write(when)
    return marker


def test_hanging_snapshot_is_answered_by_the_clients_deadline_and_undone(hang_control):
    """`zfs snapshot` takes the snapshot, then never returns: Commit answers FSSAGENT_E_TIMEOUT at the
    client's TimeOutInMilliseconds; the per-command timeout ends the command and the snapshot goes."""
    daemon, control = hang_control
    marker = hang(control, "snapshot", "after")
    with daemon.client() as client:
        set_id, [copy_id] = started_set(client, "vms")
        assert result_of(client, m.CommitShadowCopySetRequest(set_id, 1000)) == H.FSSAGENT_E_TIMEOUT
        # The next call waits until the hung command has been killed and its snapshot removed.
        assert result_of(client, m.ExposeShadowCopySetRequest(set_id, 60000)) == H.FSRVP_E_BAD_STATE
        assert statuses(daemon) == [("Added", 1)] and ours_on_storage(daemon.pool) == []
        assert "zfs snapshot" in daemon.log() and "-> timeout" in daemon.log()
        os.remove(marker)
        client.commit(set_id)
        client.expose(set_id)
        finish(client, set_id, {"vms": copy_id})
    assert problems(daemon) == [] and ours_on_storage(daemon.pool) == []


def test_hanging_clone_is_ended_by_the_per_command_timeout(hang_control):
    daemon, control = hang_control
    marker = hang(control, "clone", "before")
    with daemon.client() as client:
        set_id, [copy_id] = started_set(client, "vms")
        client.commit(set_id)
        assert result_of(client, m.ExposeShadowCopySetRequest(set_id, 60000)) == H.FSRVP_E_WAIT_FAILED
        assert statuses(daemon) == [("Committed", 1)] and problems(daemon) == []
        os.remove(marker)
        client.expose(set_id)
        finish(client, set_id, {"vms": copy_id})
        full_cycle_one(client)
    assert problems(daemon) == [] and ours_on_storage(daemon.pool) == []


def test_delete_share_mapping_answers_before_the_storage_is_removed(hang_control):
    """The backup application does not wait for `zfs destroy`: DeleteShareMapping withdraws the share,
    records the removal and answers; the removal runs after it. A destroy that hangs until the
    per-command timeout fails, and reconciliation removes the copy once zfs answers again."""
    daemon, control = hang_control
    with daemon.client() as client:
        mapping, = client.backup_cycle(["vms"])
        share = f"vms@{{{mapping.copy_id}}}"
        marker = hang(control, "destroy", "before")
        client.recovery_complete(mapping.set_id)
        client.delete_share_mapping(mapping.set_id, mapping.copy_id, "vms")
        assert [copy["copy_id"] for copy in daemon.being_removed()] == [str(mapping.copy_id)]
        assert statuses(daemon) == [] and "NT_STATUS_BAD_NETWORK_NAME" in daemon.smbclient(share, "ls")
        assert wait_until(lambda: "could not remove storage of copy" in daemon.log())  # the 3 s timeout
        assert len(ours_on_storage(daemon.pool)) == 2  # the clone and the snapshot, tagged
        os.remove(marker)
        assert daemon.removals_done() and ours_on_storage(daemon.pool) == []
        full_cycle_one(client)
    assert problems(daemon) == [] and ours_on_storage(daemon.pool) == []

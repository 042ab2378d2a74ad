"""Nothing orphaned, ever: SIGKILL at every crash point, restart, check, finish; racing clients;
reconciliation of what changed on storage behind fsrvpd's back.

Every test runs a real fsrvpd process on a fresh zfs-fuse pool (the kill cases that leave storage
half done also on a fresh btrfs); what the daemon holds is compared with the pool, the mounts and
the shares its SMB server lists (tests/support/consistency.py).
The long version of the kill matrix is bench/kill_matrix.py.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import threading
import uuid

import pytest

from fsrvpd.client import FsrvpError
from fsrvpd.constants import ATTR_AUTO_RECOVERY, HResult
from fsrvpd.crashpoints import ENVIRONMENT_VARIABLE
from tests.support.btrfs import BtrfsDaemon
from tests.support.consistency import problems
from tests.support.crash import KILL_CASES, destroy_behind_its_back, full_cycle, run_kill_case
from tests.support.daemon import FsrvpDaemon, ours_on_storage, wait_until
from tests.support.net import SourceAddressRelay
from tests.support.zfs import FilePool, zfs

pytestmark = pytest.mark.zfs


@pytest.fixture
def fresh_daemon(zfs_pool, tmp_path, samba_clients):
    """A daemon configured but not started (the test starts it, maybe armed at a crash point)."""
    daemon = FsrvpDaemon(zfs_pool, tmp_path)
    yield daemon
    daemon.stop()
    print("\n".join(line for line in daemon.log().splitlines() if "fsrvpd.smb" not in line))  # shown on failure


@pytest.mark.parametrize("case", KILL_CASES, ids=[case.name for case in KILL_CASES])
def test_kill_matrix(fresh_daemon, case):
    run_kill_case(fresh_daemon, case)


# The points where btrfs storage is half made, half changed or half removed (the others only touch the state).
BTRFS_KILL_CASES = [case for case in KILL_CASES if case.name in {
    "commit.snapshotted", "commit.persisted", "expose.cloned", "expose.cloned:2", "expose.published", "expose.persisted",
    "recovery.intent", "recovery.read_only", "delete.intent:2", "abort-abort.intent", "startup-reconcile.repair"}]


@pytest.mark.btrfs
@pytest.mark.parametrize("case", BTRFS_KILL_CASES, ids=[case.name for case in BTRFS_KILL_CASES])
def test_kill_matrix_on_btrfs(btrfs_fs, tmp_path, samba_clients, case):
    daemon = BtrfsDaemon(btrfs_fs, tmp_path)
    try:
        run_kill_case(daemon, case)
    finally:
        daemon.stop()
        print("\n".join(line for line in daemon.log().splitlines() if "fsrvpd.smb" not in line))


def race_set_context(daemon, clients) -> list[object]:
    """SetContext from every client at once; each one's HRESULT, or the exception it got."""
    barrier = threading.Barrier(len(clients))
    outcomes: list[object] = [None] * len(clients)

    def call(index, client):
        barrier.wait()
        try:
            client.set_context(0)
            outcomes[index] = HResult.S_OK
        except FsrvpError as refused:
            outcomes[index] = HResult(refused.result)
        except Exception as lost:  # the daemon died under the call
            outcomes[index] = lost

    threads = [threading.Thread(target=call, args=(index, client)) for index, client in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.parametrize("crash", [False, True], ids=["race", "race-killed"])
def test_two_clients_racing_set_context(fresh_daemon, crash):
    """One address wins the context, the other gets SET_IN_PROGRESS until the winner recovers its set --
    also when the daemon dies right after recording the winner (then the winner's retry wins again)."""
    daemon = fresh_daemon
    if crash:
        daemon.env[ENVIRONMENT_VARIABLE] = "set_context.persisted"
    daemon.start()
    with SourceAddressRelay("127.0.0.2", ("127.0.0.1", daemon.port)) as relay:
        first, second = daemon.client(), daemon.client(port=relay.port)
        outcomes = race_set_context(daemon, [first, second])
        if crash:  # nobody got an answer; the state names the winner, whose retry wins again
            assert daemon.wait_for_exit() < 0 and all(isinstance(outcome, Exception) for outcome in outcomes)
            del daemon.env[ENVIRONMENT_VARIABLE]
            daemon.start()
            assert problems(daemon) == []
            first, second = daemon.client(), daemon.client(port=relay.port)
            outcomes = [race_set_context(daemon, [client])[0] for client in (first, second)]
        assert sorted(outcomes) == [HResult.S_OK, HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS]
        winner, loser = (first, second) if outcomes[0] == HResult.S_OK else (second, first)
        mappings = winner.backup_cycle(["vms"])
        assert race_set_context(daemon, [loser]) == [HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS]
        winner.recovery_complete(mappings[0].set_id)  # releases the context
        winner.delete_share_mapping(mappings[0].set_id, mappings[0].copy_id, "vms")
        full_cycle(loser)
        for client in (first, second):
            client.close()
    assert problems(daemon) == [] and ours_on_storage(daemon.pool) == []
    assert "127.0.0.2" in daemon.log()


def exposed_copy(daemon, client, context: int = 0) -> tuple[uuid.UUID, dict[str, uuid.UUID]]:
    mappings = client.backup_cycle(["vms", "sql"], context=context)
    return mappings[0].set_id, {share: mapping.copy_id for share, mapping in zip(("vms", "sql"), mappings)}


def clone_of(daemon, copy_id: uuid.UUID) -> str:
    return f"{daemon.pool.name}/fsrvpd-{copy_id}"


@pytest.fixture
def reconciling_daemon(fresh_daemon):
    """A running daemon that reconciles every second."""
    fresh_daemon.config["timers"]["reconcile_seconds"] = 1
    return fresh_daemon.start()


def test_a_read_only_exposure_destroyed_behind_our_back_is_made_again(reconciling_daemon):
    daemon = reconciling_daemon
    with open(f"{daemon.paths['vms']}/f", "w") as handle:
        handle.write("as committed\n")
    with daemon.client() as client:
        set_id, copies = exposed_copy(daemon, client)
        destroy_behind_its_back(clone_of(daemon, copies["vms"]))
        assert wait_until(lambda: clone_of(daemon, copies["vms"]) in ours_on_storage(daemon.pool))
        assert wait_until(lambda: problems(daemon) == [])  # the share follows the clone
        assert "exposing its snapshot again" in daemon.log()
        assert "as committed" in daemon.smbclient(f"vms@{{{copies['vms']}}}", "get f -")
        client.abort(set_id)
    assert ours_on_storage(daemon.pool) == []


def test_a_writable_exposure_destroyed_behind_our_back_loses_its_copy(reconciling_daemon):
    """An auto-recovery clone holds the writers' recovery: re-cloning the snapshot would hide the loss."""
    daemon = reconciling_daemon
    with daemon.client() as client:
        set_id, copies = exposed_copy(daemon, client, context=ATTR_AUTO_RECOVERY)
        destroy_behind_its_back(clone_of(daemon, copies["vms"]))
        assert wait_until(lambda: "copy {} of share vms is lost".format(copies["vms"]) in daemon.log())
        assert wait_until(lambda: problems(daemon) == [])  # its snapshot goes right after the log line
        with pytest.raises(FsrvpError) as lost:
            client.get_share_mapping(set_id, copies["vms"], "vms")
        assert lost.value.result == HResult.E_INVALIDARG
        assert client.get_share_mapping(set_id, copies["sql"], "sql").copy_id == copies["sql"]
        assert "NT_STATUS_BAD_NETWORK_NAME" in daemon.smbclient(f"vms@{{{copies['vms']}}}", "ls")
        client.recovery_complete(set_id)
        client.delete_share_mapping(set_id, copies["sql"], "sql")
    assert daemon.removals_done() and ours_on_storage(daemon.pool) == []


def test_stray_objects_of_our_sets_are_removed_and_other_instances_objects_kept(reconciling_daemon):
    """A tagged object the state does not want goes -- also a snapshot of one of our sets of a dataset
    not in it; one tagged by another fsrvpd (a set this daemon never recorded, in a pool none of its
    shares uses) or not tagged at all stays. A snapshot an earlier fsrvpd tagged with its copy still
    counts as that copy's."""
    daemon = reconciling_daemon
    pool = daemon.pool.name
    look_alike = f"{pool}/sql@fsrvpd-{uuid.uuid4()}"  # our naming, but no tags
    zfs("snapshot", look_alike)
    with FilePool(size_mib=64) as other_pool:
        other_dataset, _ = other_pool.dataset("data")
        foreign_set = uuid.uuid4()
        foreign = f"{other_dataset}@fsrvpd-{foreign_set}"
        zfs("snapshot", "-o", f"fsrvpd:set={foreign_set}", "-o", f"fsrvpd:copy={uuid.uuid4()}", foreign)
        with daemon.client() as client:
            client.set_context(0)
            set_id = client.start_shadow_copy_set()
            copy_id = client.add_to_shadow_copy_set(set_id, "vms")
            client.commit(set_id)  # Committed: the state wants the snapshot, no clone
            snapshot = f"{pool}/vms@fsrvpd-{set_id}"
            zfs("set", f"fsrvpd:copy={copy_id}", snapshot)  # as an earlier fsrvpd tagged it
            stray_snapshot = f"{pool}/sql@fsrvpd-{set_id}"
            zfs("snapshot", "-o", f"fsrvpd:set={set_id}", stray_snapshot)
            stray = f"{pool}/fsrvpd-{copy_id}"
            zfs("clone", "-o", f"fsrvpd:set={set_id}", "-o", f"fsrvpd:copy={copy_id}", "-o", "mountpoint=none",
                snapshot, stray)
            assert wait_until(lambda: set(ours_on_storage(daemon.pool)) == {look_alike, snapshot})
            assert f"removing orphaned clone {stray}" in daemon.log()
            assert f"removing orphaned snapshot {stray_snapshot}" in daemon.log()
            client.abort(set_id)
            full_cycle(client)
        assert ours_on_storage(other_pool) == [foreign]
        assert foreign not in daemon.log()  # not even considered
    assert daemon.removals_done() and ours_on_storage(daemon.pool) == [look_alike]
    zfs("destroy", look_alike)
    assert problems(daemon) == []


def test_soak_script_runs_concurrent_clients_from_several_addresses_without_errors_or_leaks(zfs_daemon,
                                                                                            samba_clients):
    """bench/soak.py in miniature: three clients, three addresses, a few seconds (no RSS verdict here)."""
    soak = subprocess.run([sys.executable, "bench/soak.py", "--clients", "3", "--seconds", "6", "--sample-seconds",
                           "1", "--no-rss-check"], capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert soak.returncode == 0, soak.stdout + soak.stderr
    assert "errors 0, leaked objects 0" in soak.stdout

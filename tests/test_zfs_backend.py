"""The ZFS backend against a real pool (zfs-fuse here, OpenZFS in production): no zfs is mocked.

Each test gets its own pool on a sparse file, so what a test finds on storage is its own doing.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest

from fsrvpd.backends.base import SNAPSHOT, BackendError, NotSupported, OwnedObject, ShadowCopyRef
from fsrvpd.backends.zfs import COPY_TAG, SET_TAG, ZfsBackend, clone_name, property_options, snapshot_name
from fsrvpd.runner import CommandRunner
from tests.support.zfs import FilePool, fill, zfs

pytestmark = pytest.mark.zfs


@pytest.fixture
def backend(zfs_pool: FilePool) -> ZfsBackend:
    return ZfsBackend(CommandRunner(), mount_root=os.path.join(zfs_pool.directory, "exposed"))


def copies_of(backend: ZfsBackend, paths: list[str]) -> list[ShadowCopyRef]:
    """One shadow copy set over the shares at `paths`."""
    set_id = uuid.uuid4()
    return [ShadowCopyRef(set_id, uuid.uuid4(), backend.file_store(path)) for path in paths]


def ours(pool: FilePool) -> list[str]:
    """Every snapshot and dataset of the pool that fsrvpd's naming would claim."""
    return [name for name in zfs("list", "-H", "-t", "all", "-r", "-o", "name", pool.name).splitlines()
            if "fsrvpd-" in name]


def local_tags(name: str) -> dict[str, str]:
    lines = zfs("get", "-H", "-s", "local", "-o", "property,value", f"{SET_TAG},{COPY_TAG}", name).splitlines()
    return dict(line.split("\t") for line in lines)


def write(path: str, text: str) -> None:
    with open(path, "w") as out:
        out.write(text)


def read(path: str) -> str:
    with open(path) as source:
        return source.read()


def assert_refuses_writes(directory: str) -> None:
    with pytest.raises(OSError) as refused:
        write(os.path.join(directory, "new-file"), "x")
    assert refused.value.errno == errno.EROFS


# -- file_store --------------------------------------------------------------------------------

def test_file_store_is_the_dataset_mounted_at_the_path(zfs_pool, backend):
    name, mountpoint = zfs_pool.dataset("vms")
    store = backend.file_store(mountpoint)
    assert (store.backend, store.name, store.group, store.mountpoint) == ("zfs", name, zfs_pool.name, mountpoint)
    assert backend.file_store(mountpoint, configured=name) == store
    assert ours(zfs_pool) == []


def test_file_store_refuses_a_subdirectory_of_a_dataset(zfs_pool, backend):
    _, mountpoint = zfs_pool.dataset("vms")
    os.mkdir(os.path.join(mountpoint, "disk1"))
    with pytest.raises(NotSupported, match="directory inside"):
        backend.file_store(os.path.join(mountpoint, "disk1"))


def test_file_store_refuses_a_dataset_with_another_dataset_below(zfs_pool, backend):
    _, mountpoint = zfs_pool.dataset("vms")
    zfs_pool.dataset("vms/disk1")
    with pytest.raises(NotSupported, match="vms/disk1"):
        backend.file_store(mountpoint)


def test_file_store_refuses_a_dataset_with_another_mount_below(zfs_pool, backend):
    _, mountpoint = zfs_pool.dataset("vms")
    below = os.path.join(mountpoint, "scratch")
    os.mkdir(below)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", below], check=True)
    try:
        with pytest.raises(NotSupported, match="tmpfs at .*scratch"):
            backend.file_store(mountpoint)
    finally:
        subprocess.run(["umount", below], check=True)


def test_file_store_refuses_an_unmounted_dataset(zfs_pool, backend):
    name, mountpoint = zfs_pool.dataset("vms")
    zfs("umount", name)
    with pytest.raises(NotSupported, match="belongs at .* but is not mounted"):
        backend.file_store(mountpoint)
    with pytest.raises(NotSupported, match="is not mounted"):
        backend.file_store(mountpoint, configured=name)


def test_file_store_refuses_a_configured_name_that_does_not_match(zfs_pool, backend):
    vms, vms_mountpoint = zfs_pool.dataset("vms")
    _, db_mountpoint = zfs_pool.dataset("db")
    with pytest.raises(NotSupported, match=f"mounted at {vms_mountpoint}, not at {db_mountpoint}"):
        backend.file_store(db_mountpoint, configured=vms)
    with pytest.raises(NotSupported, match="no ZFS dataset named"):
        backend.file_store(vms_mountpoint, configured=f"{zfs_pool.name}/absent")
    zfs("snapshot", f"{vms}@manual")
    with pytest.raises(NotSupported, match="snapshot .* is not a filesystem"):
        backend.file_store(vms_mountpoint, configured=f"{vms}@manual")


def test_file_store_ignores_our_own_clones_below(zfs_pool):
    _, mountpoint = zfs_pool.dataset("vms")
    backend = ZfsBackend(CommandRunner(), mount_root=os.path.join(mountpoint, ".exposed"))
    [copy] = copies_of(backend, [mountpoint])
    backend.snapshot([copy])
    backend.expose(copy, writable=False)
    assert backend.file_store(mountpoint) == copy.store


# -- snapshot, expose, make_read_only ---------------------------------------------------------

def assert_read_only_copy_shows_old_data(backend, path: str) -> tuple[ShadowCopyRef, str]:
    """A copy of the share at `path` taken while disk.vhdx said "before", exposed read-only (twice:
    idempotent) under <mount_root>/<copy id>: it still says so and refuses writes."""
    write(os.path.join(path, "disk.vhdx"), "before")
    [copy] = copies_of(backend, [path])
    backend.snapshot([copy])
    write(os.path.join(path, "disk.vhdx"), "after")

    exposed = backend.expose(copy, writable=False)
    assert exposed == os.path.join(backend.mount_root, str(copy.copy_id))
    assert read(os.path.join(exposed, "disk.vhdx")) == "before"
    assert_refuses_writes(exposed)
    assert backend.expose(copy, writable=False) == exposed
    return copy, exposed


def test_read_only_copy_shows_old_data_and_refuses_writes(zfs_pool, backend):
    copy, _ = assert_read_only_copy_shows_old_data(backend, zfs_pool.dataset("vms")[1])
    assert local_tags(snapshot_name(copy)) == {SET_TAG: str(copy.set_id)}
    assert local_tags(clone_name(copy)) == {SET_TAG: str(copy.set_id), COPY_TAG: str(copy.copy_id)}


def set_taken_between_writes(backend, paths: list[str]) -> list[ShadowCopyRef]:
    """One set over the shares at `paths`, snapshotted while each one's file `data` said "old <path>"."""
    for path in paths:
        write(os.path.join(path, "data"), f"old {path}")
    copies = copies_of(backend, paths)
    finish_snapshots(backend.snapshot(copies))
    for path in paths:
        write(os.path.join(path, "data"), "new")
    return copies


def finish_snapshots(left) -> None:
    """Run what `snapshot` left for after the Commit's answer, as the daemon does."""
    if left is not None:
        left()


def test_set_of_three_datasets_is_one_snapshot_each_and_nothing_else(zfs_pool, backend):
    paths = [zfs_pool.dataset(name)[1] for name in ("vms", "db", "home/alice")]
    zfs_pool.dataset("scratch")  # in the pool, not in the set: gets no snapshot that stays
    copies = set_taken_between_writes(backend, paths)

    assert sorted(zfs("list", "-H", "-t", "snapshot", "-r", "-o", "name", zfs_pool.name).split()) == \
        sorted(snapshot_name(copy) for copy in copies)
    for copy in copies:
        assert local_tags(snapshot_name(copy)) == {SET_TAG: str(copy.set_id)}  # the set and dataset name the copy
        exposed = backend.expose(copy, writable=False)
        assert read(os.path.join(exposed, "data")) == f"old {copy.store.mountpoint}"


def skip_without_extra_snapshots(backend: ZfsBackend) -> None:
    """The extra snapshots of `snapshot -r` exist on zfs-fuse only (OpenZFS names every dataset)."""
    if backend.zfs.takes_several_snapshots():
        pytest.skip("this zfs snapshots the set's datasets by name, with no extra snapshots")


def test_a_filesystem_made_between_prepare_and_commit_keeps_a_snapshot_for_reconciliation(zfs_pool, backend):
    """zfs-fuse: the Commit destroys the extra snapshots of its `snapshot -r` that Prepare listed; a
    filesystem made after that keeps its snapshot, tagged with the set, which `owned` reports as
    the snapshot of a store no copy of the set has (reconciliation removes such orphans)."""
    skip_without_extra_snapshots(backend)
    paths = [zfs_pool.dataset(name)[1] for name in ("vms", "db")]
    zfs_pool.dataset("scratch")
    copies = copies_of(backend, paths)
    backend.prepare(copies)
    late, _ = zfs_pool.dataset("late")
    finish_snapshots(backend.snapshot(copies))
    set_id = copies[0].set_id
    assert sorted(ours(zfs_pool)) == sorted([*(snapshot_name(copy) for copy in copies), f"{late}@fsrvpd-{set_id}"])
    assert [(obj.name, obj.set_id, obj.store) for obj in backend.owned() if obj.store == late] == \
        [(f"{late}@fsrvpd-{set_id}", set_id, late)]


def test_extra_snapshots_wait_for_the_answer_except_those_of_our_clones(zfs_pool, backend):
    """zfs-fuse: of the extra snapshots of `snapshot -r`, those of our clones go within the Commit
    (they would block the clones' removal); the others are left to the work `snapshot` returns."""
    skip_without_extra_snapshots(backend)
    paths = [zfs_pool.dataset(name)[1] for name in ("vms", "db")]
    [earlier] = copies_of(backend, paths[:1])
    backend.snapshot([earlier])
    backend.expose(earlier, writable=False)
    copies = copies_of(backend, paths)
    left = backend.snapshot(copies)
    suffix = f"@fsrvpd-{copies[0].set_id}"
    mine = {snapshot_name(copy) for copy in copies}
    assert {name for name in ours(zfs_pool) if name.endswith(suffix)} - mine == {zfs_pool.name + suffix}
    left()
    assert {name for name in ours(zfs_pool) if name.endswith(suffix)} == mine


def test_set_of_a_dataset_and_one_below_it_mounted_elsewhere_keeps_both_snapshots(zfs_pool, backend):
    """zfs-fuse takes such a set by `zfs snapshot -r` of the upper one: nothing else to discard."""
    upper, upper_path = zfs_pool.dataset("vms")
    lower_path = os.path.join(zfs_pool.directory, "disks")
    zfs("create", "-o", f"mountpoint={lower_path}", f"{upper}/disks")
    copies = set_taken_between_writes(backend, [upper_path, lower_path])
    assert sorted(ours(zfs_pool)) == sorted(snapshot_name(copy) for copy in copies)


def assert_writable_until_made_read_only(backend, copy: ShadowCopyRef) -> None:
    """A writable exposure takes a write; made read-only (twice: idempotent) it keeps it and refuses more."""
    exposed = backend.expose(copy, writable=True)
    write(os.path.join(exposed, "recovered"), "fixed by the application")
    backend.make_read_only(copy)
    backend.make_read_only(copy)
    assert_refuses_writes(exposed)
    assert read(os.path.join(exposed, "recovered")) == "fixed by the application"


def test_writable_copy_accepts_writes_until_made_read_only(zfs_pool, backend):
    _, mountpoint = zfs_pool.dataset("vms")
    [copy] = copies_of(backend, [mountpoint])
    backend.snapshot([copy])
    assert_writable_until_made_read_only(backend, copy)


def test_usage_reports_bytes_of_snapshot_and_clone(zfs_pool, backend):
    _, mountpoint = zfs_pool.dataset("vms")
    [copy] = copies_of(backend, [mountpoint])
    backend.snapshot([copy])
    assert list(backend.usage(copy)) == ["snapshot"]
    backend.expose(copy, writable=False)
    usage = backend.usage(copy)
    assert sorted(usage) == ["clone", "snapshot"] and all(isinstance(used, int) for used in usage.values())


# -- removal and reconciliation ---------------------------------------------------------------

def assert_removing_written_exposures_leaves_no_directory(backend, paths: list[str]) -> None:
    """Snapshot the shares at `paths`, expose each writable, write to it and remove the copy (twice:
    idempotent) right away, while the exposure may still be busy for a moment."""
    copies = copies_of(backend, paths)
    finish_snapshots(backend.snapshot(copies))
    exposed = [backend.expose(copy, writable=True) for copy in copies]
    for copy, path in zip(copies, exposed):
        write(os.path.join(path, "touched"), "keeps the exposure busy for a moment")
        backend.remove(copy)
        backend.remove(copy)
    assert not any(os.path.exists(path) for path in exposed)


def test_remove_leaves_nothing_of_ours_and_can_be_repeated(zfs_pool, backend):
    assert_removing_written_exposures_leaves_no_directory(backend, [zfs_pool.dataset(name)[1] for name in ("vms", "db")])
    assert ours(zfs_pool) == []


@pytest.mark.parametrize("tagged", ["untagged", "another set", "another copy (an earlier version's tag)"])
def test_a_snapshot_with_our_name_but_not_our_tags_is_left_alone(zfs_pool, backend, tagged):
    _, mountpoint = zfs_pool.dataset("vms")
    [copy] = copies_of(backend, [mountpoint])
    tags = {"untagged": {}, "another set": {SET_TAG: str(uuid.uuid4())},
            "another copy (an earlier version's tag)": {SET_TAG: str(copy.set_id), COPY_TAG: str(uuid.uuid4())}}
    zfs("snapshot", *property_options(tags[tagged]), snapshot_name(copy))
    unowned = OwnedObject(SNAPSHOT, snapshot_name(copy), copy.set_id, None, zfs_pool.name, copy.store.name)
    # Expose is not refused: it only clones, and through the service such a snapshot never gets that far
    # (Commit's `zfs snapshot` of the set's name fails when the name is taken).
    for attempt in (backend.remove, lambda _: backend.remove_owned(unowned)):
        with pytest.raises(BackendError, match=snapshot_name(copy)):
            attempt(copy)
    assert ours(zfs_pool) == [snapshot_name(copy)]


def test_a_snapshot_an_earlier_version_tagged_with_its_copy_is_still_served_and_removed(zfs_pool, backend):
    [copy] = copies_of(backend, [zfs_pool.dataset("vms")[1]])
    zfs("snapshot", *property_options({SET_TAG: str(copy.set_id), COPY_TAG: str(copy.copy_id)}), snapshot_name(copy))
    assert [(obj.copy_id, obj.store) for obj in backend.owned() if obj.name == snapshot_name(copy)] == \
        [(copy.copy_id, copy.store.name)]
    backend.expose(copy, writable=False)
    backend.remove(copy)
    assert ours(zfs_pool) == []


def test_owned_finds_everything_and_remove_owned_cleans_it(zfs_pool, backend):
    paths = [zfs_pool.dataset(name)[1] for name in ("vms", "db")]
    copies = copies_of(backend, paths)
    finish_snapshots(backend.snapshot(copies))
    backend.expose(copies[0], writable=False)

    found = [obj for obj in backend.owned() if obj.name.startswith(zfs_pool.name + "/")]
    expected = [("clone", clone_name(copies[0]), copies[0].copy_id, None)] + sorted(
        ("snapshot", snapshot_name(copy), None, copy.store.name) for copy in copies)
    assert [(obj.kind, obj.name, obj.copy_id, obj.store) for obj in found] == expected
    assert all(obj.set_id == copies[0].set_id and obj.group == zfs_pool.name for obj in found)
    for obj in found:
        backend.remove_owned(obj)
    assert ours(zfs_pool) == []


# -- failures on a real full pool -------------------------------------------------------------

def test_snapshot_into_a_full_pool_leaves_nothing_in_any_pool(zfs_pool, backend):
    _, healthy = zfs_pool.dataset("vms")
    with FilePool(size_mib=64) as small_pool:
        crowded = [small_pool.dataset(name)[1] for name in ("data", "logs")]
        copies = copies_of(backend, [healthy, *crowded])  # the healthy pool's snapshot is taken first
        fill(crowded[0])
        with pytest.raises(BackendError) as failure:
            finish_snapshots(backend.snapshot(copies))
        assert failure.value.out_of_space
        assert ours(zfs_pool) == [] and ours(small_pool) == []


def test_expose_in_a_full_pool_fails_and_leaves_only_the_removable_snapshot(backend):
    with FilePool(size_mib=64) as small_pool:
        _, crowded = small_pool.dataset("data")
        [copy] = copies_of(backend, [crowded])
        backend.snapshot([copy])
        fill(crowded)
        with pytest.raises(BackendError) as failure:
            backend.expose(copy, writable=False)
        assert failure.value.out_of_space
        assert ours(small_pool) == [snapshot_name(copy)]
        backend.remove(copy)
        assert ours(small_pool) == []

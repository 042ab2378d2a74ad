"""The btrfs backend against a real file system (a loop-mounted image): no btrfs is mocked.

Each test gets its own file system, so what a test finds on storage is its own doing. The cases
follow the ZFS backend's tests; where btrfs differs (ownership by a record on the set directory,
the backend's own top-level mount, exposures as mounts) the tests say so.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from fsrvpd.backends.base import BackendError, NotSupported
from fsrvpd.backends.btrfs import OWNER_XATTR, SNAPSHOT_DIR, BtrfsBackend
from fsrvpd.backends.host import read_mounts
from fsrvpd.runner import CommandRunner
from tests.support.btrfs import FileBtrfs
from tests.support.lvm import run
from tests.test_zfs_backend import (assert_read_only_copy_shows_old_data,
                                    assert_removing_written_exposures_leaves_no_directory,
                                    assert_writable_until_made_read_only, copies_of, read, set_taken_between_writes,
                                    write)

pytestmark = pytest.mark.btrfs


@pytest.fixture
def backend(btrfs_fs: FileBtrfs) -> BtrfsBackend:
    return BtrfsBackend(CommandRunner(), mount_root=os.path.join(btrfs_fs.directory, "exposed"))


def fsid_of(filesystem: FileBtrfs) -> str:
    return run("btrfs", "filesystem", "show", filesystem.mountpoint).split("uuid: ")[1].split()[0]


def read_only_property(path: str) -> str:
    return run("btrfs", "property", "get", "-ts", path, "ro").strip()


def snapshot_path(filesystem: FileBtrfs, copy) -> str:
    """The copy's snapshot as the test's own mount of the file system shows it."""
    return os.path.join(filesystem.snapshots(), str(copy.set_id), str(copy.copy_id))


@contextlib.contextmanager
def tmpfs_at(directory: str) -> Iterator[None]:
    """A tmpfs mounted at `directory` (made here) while the block runs."""
    os.mkdir(directory)
    run("mount", "-t", "tmpfs", "tmpfs", directory)
    try:
        yield
    finally:
        run("umount", directory)


def mount_options(mountpoint: str) -> frozenset[str]:
    return next(m.options for m in reversed(read_mounts()) if m.mountpoint == mountpoint)


# -- file_store --------------------------------------------------------------------------------

def test_file_store_is_the_subvolume_at_the_path(btrfs_fs, backend):
    path = btrfs_fs.subvolume("vms")
    store = backend.file_store(path)
    fsid = fsid_of(btrfs_fs)
    assert (store.backend, store.name, store.group, store.mountpoint) == ("btrfs", f"{fsid}:/vms", fsid, path)
    assert backend.file_store(path, configured="/vms") == backend.file_store(path, configured="vms") == store
    assert btrfs_fs.ours() == []


def test_file_store_names_a_subvolume_mounted_on_its_own_by_its_path_in_the_file_system(btrfs_fs, backend):
    btrfs_fs.subvolume("pool/vms")
    elsewhere = os.path.join(btrfs_fs.directory, "vms")
    os.mkdir(elsewhere)
    run("mount", "-o", "subvol=pool/vms", btrfs_fs.device, elsewhere)
    write(os.path.join(elsewhere, "disk.vhdx"), "before")
    [copy] = copies_of(backend, [elsewhere])
    assert copy.store.name == f"{fsid_of(btrfs_fs)}:/pool/vms"
    backend.snapshot([copy])
    write(os.path.join(elsewhere, "disk.vhdx"), "after")
    assert read(os.path.join(backend.expose(copy, writable=False), "disk.vhdx")) == "before"
    backend.remove(copy)
    assert btrfs_fs.ours() == [elsewhere]  # the test's own second mount


def test_file_store_refuses_what_is_not_the_root_of_a_share_subvolume(btrfs_fs, backend):
    path = btrfs_fs.subvolume("vms")
    os.mkdir(os.path.join(path, "disk1"))
    with pytest.raises(NotSupported, match="directory inside a btrfs subvolume"):
        backend.file_store(os.path.join(path, "disk1"))
    with pytest.raises(NotSupported, match="top-level subvolume"):
        backend.file_store(btrfs_fs.mountpoint)
    with pytest.raises(NotSupported, match="is not a directory"):
        backend.file_store(os.path.join(btrfs_fs.mountpoint, "absent"))
    with pytest.raises(NotSupported, match="is btrfs subvolume /vms, not the configured /db"):
        backend.file_store(path, configured="/db")
    other = os.path.join(btrfs_fs.directory, "tmpfs")
    with tmpfs_at(other), pytest.raises(NotSupported, match="on a tmpfs file system, not on btrfs"):
        backend.file_store(other)


def test_file_store_refuses_a_subvolume_with_another_subvolume_below(btrfs_fs, backend):
    path = btrfs_fs.subvolume("vms")
    btrfs_fs.subvolume("vms/deeper/disk1")
    with pytest.raises(NotSupported, match=r"1 subvolume\(s\)"):
        backend.file_store(path)


def test_file_store_refuses_a_subvolume_with_another_mount_below(btrfs_fs, backend):
    path = btrfs_fs.subvolume("vms")
    with tmpfs_at(os.path.join(path, "scratch")), pytest.raises(NotSupported, match="tmpfs mounted at .*scratch"):
        backend.file_store(path)


def test_file_store_refuses_our_own_snapshot(btrfs_fs, backend):
    [copy] = copies_of(backend, [btrfs_fs.subvolume("vms")])
    backend.snapshot([copy])
    with pytest.raises(NotSupported, match="one of fsrvpd's own snapshots"):
        backend.file_store(backend.expose(copy, writable=False))


# -- snapshot, expose, make_read_only ---------------------------------------------------------

def test_read_only_copy_shows_old_data_and_refuses_writes(btrfs_fs, backend):
    path = btrfs_fs.subvolume("vms")
    copy, exposed = assert_read_only_copy_shows_old_data(backend, path)
    assert "ro" in mount_options(exposed) and read_only_property(snapshot_path(btrfs_fs, copy)) == "ro=true"
    assert os.getxattr(os.path.dirname(snapshot_path(btrfs_fs, copy)), OWNER_XATTR).decode() == str(copy.set_id)
    assert oct(os.stat(btrfs_fs.snapshots()).st_mode & 0o777) == "0o700"
    write(os.path.join(path, "still-writable"), "the share itself is untouched")


def test_set_of_three_subvolumes_is_one_snapshot_each_and_nothing_else(btrfs_fs, backend):
    paths = [btrfs_fs.subvolume(name) for name in ("vms", "db", "home-alice")]
    btrfs_fs.subvolume("scratch")  # on the file system, not in the set
    copies = set_taken_between_writes(backend, paths)

    top_level = os.path.join(backend.mount_root, "btrfs", copies[0].store.group)
    assert btrfs_fs.ours() == sorted(f"{copy.set_id}/{copy.copy_id}" for copy in copies) + [top_level]
    for copy in copies:
        exposed = backend.expose(copy, writable=False)
        assert read(os.path.join(exposed, "data")) == f"old {copy.store.mountpoint}"


def test_writable_copy_accepts_writes_until_made_read_only(btrfs_fs, backend):
    [copy] = copies_of(backend, [btrfs_fs.subvolume("vms")])
    backend.snapshot([copy])
    assert_writable_until_made_read_only(backend, copy)
    exposed = os.path.join(backend.mount_root, str(copy.copy_id))
    assert "ro" in mount_options(exposed) and read_only_property(snapshot_path(btrfs_fs, copy)) == "ro=true"
    write(os.path.join(btrfs_fs.mountpoint, "vms", "still-writable"), "only that one mount went read-only")


def test_withdrawn_writable_exposure_keeps_its_snapshot_read_only(btrfs_fs, backend):
    [copy] = copies_of(backend, [btrfs_fs.subvolume("vms")])
    backend.snapshot([copy])
    exposed = backend.expose(copy, writable=True)
    assert read_only_property(snapshot_path(btrfs_fs, copy)) == "ro=false"
    backend.remove_exposure(copy)
    backend.remove_exposure(copy)
    assert not os.path.exists(exposed)
    assert read_only_property(snapshot_path(btrfs_fs, copy)) == "ro=true"
    assert backend.expose(copy, writable=False) == exposed


def test_expose_of_a_snapshot_that_is_not_there_fails_as_missing(btrfs_fs, backend):
    [copy] = copies_of(backend, [btrfs_fs.subvolume("vms")])
    with pytest.raises(BackendError, match="does not exist") as failure:
        backend.expose(copy, writable=False)
    assert failure.value.missing


# -- removal and reconciliation ---------------------------------------------------------------

def test_remove_leaves_nothing_of_ours_and_can_be_repeated(btrfs_fs, backend):
    assert_removing_written_exposures_leaves_no_directory(backend, [btrfs_fs.subvolume(name) for name in ("vms", "db")])
    assert btrfs_fs.ours() == []  # no snapshot, set directory, exposure or top-level mount
    assert not os.path.exists(btrfs_fs.snapshots())
    assert os.listdir(backend.mount_root) == ["btrfs"] and os.listdir(os.path.join(backend.mount_root, "btrfs")) == []
    assert oct(os.stat(os.path.join(backend.mount_root, "btrfs")).st_mode & 0o777) == "0o700"


def test_a_subvolume_without_our_record_is_never_touched(btrfs_fs, backend):
    [copy] = copies_of(backend, [btrfs_fs.subvolume("vms")])
    impostor = snapshot_path(btrfs_fs, copy)
    os.makedirs(btrfs_fs.snapshots(), mode=0o700)
    btrfs_fs.subvolume(os.path.relpath(impostor, btrfs_fs.mountpoint))
    with pytest.raises(BackendError, match="not in a directory carrying fsrvpd's record"):
        backend.remove(copy)
    with pytest.raises(BackendError, match="not in a directory carrying fsrvpd's record"):
        backend.expose(copy, writable=True)
    with pytest.raises(BackendError, match="holds something, but no fsrvpd record"):
        backend.snapshot([copy])
    assert [obj for obj in backend.owned() if obj.copy_id == copy.copy_id] == []
    assert btrfs_fs.ours()[0] == f"{copy.set_id}/{copy.copy_id}"
    assert read_only_property(impostor) == "ro=false"


def test_a_snapshot_directory_others_may_change_is_refused(btrfs_fs, backend):
    [copy] = copies_of(backend, [btrfs_fs.subvolume("vms")])
    os.makedirs(btrfs_fs.snapshots())
    os.chmod(btrfs_fs.snapshots(), 0o777)
    with pytest.raises(BackendError, match="not a directory only fsrvpd's user may change"):
        backend.snapshot([copy])
    assert btrfs_fs.ours() == []


def test_owned_reports_exposures_apart_and_remove_owned_of_one_keeps_the_snapshot(btrfs_fs, backend):
    """For reconciliation an exposure is its own object: withdrawing an unwanted one (a writable one
    here) never deletes the snapshot a set still holds."""
    paths = [btrfs_fs.subvolume(name) for name in ("vms", "db")]
    copies = copies_of(backend, paths)
    backend.snapshot(copies)
    exposed = backend.expose(copies[0], writable=True)

    found = backend.owned()
    set_directory = os.path.join(backend.mount_root, "btrfs", copies[0].store.group, SNAPSHOT_DIR,
                                 str(copies[0].set_id))
    expected = [("mount", exposed, copies[0].copy_id)] + sorted(
        ("snapshot", os.path.join(set_directory, str(copy.copy_id)), copy.copy_id) for copy in copies)
    assert [(obj.kind, obj.name, obj.copy_id) for obj in found] == expected
    assert {(obj.set_id, obj.group) for obj in found} == {(copies[0].set_id, copies[0].store.group)}

    backend.remove_owned(found[0])
    assert not os.path.exists(exposed)
    assert read_only_property(snapshot_path(btrfs_fs, copies[0])) == "ro=true"
    assert [obj.kind for obj in backend.owned()] == ["snapshot", "snapshot"]
    for obj in found[1:]:
        backend.remove_owned(obj)
    assert btrfs_fs.ours() == []


def test_an_empty_set_directory_is_owned_and_removable(btrfs_fs, backend):
    """A crash between making the set's directory and its first snapshot leaves it empty."""
    [copy] = copies_of(backend, [btrfs_fs.subvolume("vms")])
    backend.snapshot([copy])
    run("btrfs", "subvolume", "delete", snapshot_path(btrfs_fs, copy))
    [empty] = backend.owned()
    assert (empty.kind, empty.set_id, empty.copy_id) == ("set directory", copy.set_id, None)
    backend.remove_owned(empty)
    assert btrfs_fs.ours() == []


def test_owned_mounts_the_top_level_again_after_a_reboot(btrfs_fs, backend):
    [copy] = copies_of(backend, [btrfs_fs.subvolume("vms")])
    backend.snapshot([copy])
    top_level = os.path.join(backend.mount_root, "btrfs", copy.store.group)
    run("umount", top_level)
    assert [(obj.kind, obj.copy_id) for obj in backend.owned()] == [("snapshot", copy.copy_id)]
    assert top_level in btrfs_fs.mounts()
    backend.remove(copy)
    assert btrfs_fs.ours() == []


# -- failures on a real file system -----------------------------------------------------------

def test_snapshot_into_a_full_file_system_leaves_nothing_on_any(btrfs_fs, backend):
    healthy = btrfs_fs.subvolume("vms")
    with FileBtrfs(size_mib=128, mixed=True) as small:
        crowded = small.subvolume("data")
        copies = copies_of(backend, [healthy, crowded])
        fill_metadata(crowded)
        with pytest.raises(BackendError) as failure:
            backend.snapshot(copies)
        assert failure.value.out_of_space, failure.value
        assert btrfs_fs.ours() == [] and small.ours() == []


def fill_metadata(directory: str) -> None:
    """Make small files until the (mixed) file system has no space left even for a directory entry."""
    number = 0
    while True:
        try:
            with open(os.path.join(directory, f"f{number}"), "wb") as out:
                out.write(bytes(64 << 10))
        except OSError:
            break
        number += 1
    os.sync()


def test_snapshot_of_a_subvolume_deleted_after_add_leaves_nothing(btrfs_fs, backend):
    copies = copies_of(backend, [btrfs_fs.subvolume("vms"), btrfs_fs.subvolume("db")])
    run("btrfs", "subvolume", "delete", copies[1].store.mountpoint)
    with pytest.raises(BackendError, match="taking the snapshots failed") as failure:
        backend.snapshot(copies)
    assert failure.value.missing and not failure.value.out_of_space
    assert btrfs_fs.ours() == []

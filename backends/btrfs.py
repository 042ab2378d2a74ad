"""The btrfs backend: a share is the root of a subvolume, a shadow copy is a read-only snapshot of it.

Objects and places (GUIDs lowercase, without braces)
  top level   <mount_root>/btrfs/<fsid>    the file system's top-level subvolume (id 5), mounted by
              fsrvpd while it holds snapshots there (unmounted with the last one); <mount_root>/btrfs
              is root's alone, so the mount opens no path around the admin's directory permissions
  set dir     <top level>/.fsrvpd-snapshots/<set guid>    carries the ownership record, the xattr
              trusted.fsrvpd.set=<set guid>, written before the set's first snapshot exists
  snapshot    <set dir>/<copy guid>        `btrfs subvolume snapshot -r` of the share's subvolume
  mount       <mount_root>/<copy guid>     the exposure: a mount of the snapshot subvolume
              (`subvol=/.fsrvpd-snapshots/<set>/<copy>`), ro, or rw for auto-recovery
The snapshots live on the file system they copy but outside every share: inside one, SMB clients
of the share would see earlier snapshots, and the share would have subvolumes below it. The
top-level subvolume is the one place every btrfs has however its subvolumes are mounted (`subvol=`
mounts hide it), so the backend mounts it itself; its `.fsrvpd-snapshots` is root's alone (0700),
and a top-level subvolume cannot be a share.

Ownership. btrfs has no user properties, and a snapshot cannot carry its own mark: it starts as
a copy of the share's root directory, xattrs included, and a read-only one refuses new xattrs.
So the mark is on the set directory; the trusted namespace is writable with CAP_SYS_ADMIN only,
so no user who can write to the file system can forge it. A subvolume is removed only if it is
named after a copy in the directory of its set, and that directory carries the record for it.

Exposure. The exposure is a mount of its own (like LVM's, unlike ZFS's clone): reconciliation
sees a copy's snapshot and its exposure as two objects, and withdrawing an exposure (unmounting)
never touches a snapshot that is still wanted. Auto-recovery makes the snapshot writable (the
subvolume's `ro` property) and mounts it rw; make_read_only remounts that one mount ro (a plain
`remount,ro` would turn the whole file system read-only), syncs, and sets `ro` again, so btrfs
itself refuses writes whatever the share says. An unexposed snapshot is always read-only.

Consistency of a set. btrfs has no multi-subvolume snapshot, so Commit takes the snapshots
PARALLEL_SNAPSHOTS at a time (btrfs commits several in one transaction; 64 took 0.30 s against
0.48 s one after the other): consistent per subvolume, and across them for what the client's VSS
writers hold frozen during Commit.

Nested subvolumes are found with the read-only ioctl BTRFS_IOC_GET_SUBVOL_ROOTREF, which lists
the children of one subvolume; `btrfs subvolume list -o` reads every subvolume of the file
system (0.1 s per AddToShadowCopySet at 10,000 snapshots, against 0.5 ms). Every command that
changes storage goes through the CommandRunner.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import struct
import uuid

from fsrvpd.backends.base import SNAPSHOT, Backend, BackendError, FileStore, NotSupported, OwnedObject, ShadowCopyRef
from fsrvpd.backends.host import (Mount, Mounter, StorageCommandError, failing_as, is_below, make_mount_root,
                                  read_mounts, remove_empty_directory)
from fsrvpd.runner import CommandFailed, CommandRunner

log = logging.getLogger("fsrvpd.backends.btrfs")

SNAPSHOT_DIR = ".fsrvpd-snapshots"
TOP_LEVELS = "btrfs"  # below the mount root
OWNER_XATTR = "trusted.fsrvpd.set"
MOUNT = "mount"  # OwnedObject kind of a snapshot mounted under the mount root: its exposure
SET_DIRECTORY = "set directory"  # OwnedObject kind of an empty set directory (copy_id None)
SUBVOLUME_ROOT_INODE = 256  # BTRFS_FIRST_FREE_OBJECTID: the root directory of every subvolume
PARALLEL_SNAPSHOTS = 8
PRIVATE_MODE = 0o700

_GUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# The subvolume an exposure mount shows, as /proc/self/mountinfo names it ("//deleted": removed since).
_EXPOSED_ROOT = re.compile(rf"^/{re.escape(SNAPSHOT_DIR)}/({_GUID})/({_GUID})(//deleted)?$")

# struct btrfs_ioctl_get_subvol_rootref_args: u64 min_treeid; {u64 treeid, dirid}[255]; u8 num_items; u8 pad[7]
_ROOTREF_SLOTS = 255
_ROOTREF_ARGS_SIZE = 8 + _ROOTREF_SLOTS * 16 + 8
_IOC_GET_SUBVOL_ROOTREF = (3 << 30) | (_ROOTREF_ARGS_SIZE << 16) | (0x94 << 8) | 61  # _IOWR(0x94, 61, ...)


class BtrfsError(StorageCommandError):
    MISSING = "no such file or directory|not found|does not exist"
    BUSY = r"\bbusy\b"
    OUT_OF_SPACE = "no space left"


class BtrfsCli:
    """The btrfs command line, as btrfs-progs 5.x/6.x accept it."""

    def __init__(self, runner: CommandRunner, timeout: float):
        self.runner = runner
        self.timeout = timeout

    def _run(self, *args: str) -> None:
        try:
            self.runner.run(["btrfs", *args], timeout=self.timeout)
        except CommandFailed as exc:
            raise BtrfsError.from_command(exc) from exc

    def snapshot(self, source: str, target: str) -> None:
        """A read-only snapshot; `target` must not exist (the CLI would put the snapshot inside it)."""
        self._run("subvolume", "snapshot", "-r", source, target)

    def delete(self, subvolume: str) -> None:
        self._run("subvolume", "delete", subvolume)

    def set_read_only(self, subvolume: str, read_only: bool) -> None:
        self._run("property", "set", "-ts", subvolume, "ro", "true" if read_only else "false")

    def sync(self, path: str) -> None:
        self._run("filesystem", "sync", path)


def child_subvolumes(path: str) -> list[int]:
    """The ids of the subvolumes directly below the subvolume whose root is `path`."""
    children: list[int] = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        min_tree_id = 0
        while True:
            args = bytearray(struct.pack("<Q", min_tree_id) + bytes(_ROOTREF_ARGS_SIZE - 8))
            try:
                fcntl.ioctl(fd, _IOC_GET_SUBVOL_ROOTREF, args)
                more = False
            except OSError as exc:
                if exc.errno != errno.EOVERFLOW:  # EOVERFLOW: the buffer is full, ask again from the last id
                    raise
                more = True
            count = args[8 + _ROOTREF_SLOTS * 16]
            children += [struct.unpack_from("<Q", args, 8 + 16 * slot)[0] for slot in range(count)]
            if not more or not count:
                return children
            min_tree_id = children[-1] + 1
    finally:
        os.close(fd)


def _filesystem_id(device: str) -> str | None:
    """The fsid of the btrfs file system the kernel knows on `device`, from /sys/fs/btrfs."""
    name = os.path.basename(os.path.realpath(device))
    with contextlib.suppress(FileNotFoundError):
        for fsid in os.listdir("/sys/fs/btrfs"):
            if os.path.exists(os.path.join("/sys/fs/btrfs", fsid, "devices", name)):
                return fsid
    return None


def _device_of(fsid: str) -> str | None:
    """A device of the file system `fsid` while the kernel knows it (it is mounted somewhere)."""
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(os.path.join("/sys/fs/btrfs", fsid, "devices"))):
            return os.path.join("/dev", name)
    return None


def _owner_of(directory: str) -> str | None:
    try:
        return os.getxattr(directory, OWNER_XATTR, follow_symlinks=False).decode()
    except OSError:
        return None


def _is_subvolume(path: str) -> bool:
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return False
    return status.st_ino == SUBVOLUME_ROOT_INODE and stat.S_ISDIR(status.st_mode)


def _snapshot_root(set_id: uuid.UUID, copy_id: uuid.UUID) -> str:
    """The snapshot's path in its file system (what `subvol=` and mountinfo name)."""
    return f"/{SNAPSHOT_DIR}/{set_id}/{copy_id}"


def _exposed(mount: Mount | None) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(set, copy) of the snapshot `mount` shows, if it is a mount of one of fsrvpd's snapshots."""
    shown = _EXPOSED_ROOT.match(mount.root) if mount is not None and mount.fstype == "btrfs" else None
    return (uuid.UUID(shown.group(1)), uuid.UUID(shown.group(2))) if shown else None


def _mount_at(mountpoint: str) -> Mount | None:
    return next((m for m in reversed(read_mounts()) if m.mountpoint == mountpoint), None)


def _require_private(directory: str) -> None:
    """fsrvpd's snapshot directory must be root's alone: whoever may rename in it could move a set."""
    status = os.lstat(directory)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid() or status.st_mode & 0o022:
        raise BtrfsError(f"{directory} is not a directory only fsrvpd's user may change; leaving it alone")


class BtrfsBackend(Backend):
    """Shadow copies of btrfs subvolumes (see the module docstring for places, ownership and exposure)."""

    name = "btrfs"

    def __init__(self, runner: CommandRunner, mount_root: str, command_timeout: float = 60):
        self.btrfs = BtrfsCli(runner, command_timeout)
        self.mounter = Mounter(runner, command_timeout)
        self.mount_root = mount_root

    # -- file stores -------------------------------------------------------------------------

    def file_store(self, path: str, configured: str | None = None) -> FileStore:
        """The store's name is `<fsid>:<subvolume path>`; `configured` is the subvolume path."""
        path = os.path.realpath(path)
        if not os.path.isdir(path):
            raise NotSupported(f"{path} is not a directory")
        mounts = read_mounts()
        enclosing = max((m for m in reversed(mounts) if is_below(path, m.mountpoint)), key=lambda m: len(m.mountpoint))
        if enclosing.fstype != "btrfs":
            raise NotSupported(f"{path} is on a {enclosing.fstype} file system, not on btrfs")
        if not _is_subvolume(path):
            raise NotSupported(f"{path} is a directory inside a btrfs subvolume, not the root of one. Give the share "
                               "its own subvolume (btrfs subvolume create).")
        subvolume = os.path.normpath(os.path.join(enclosing.root, os.path.relpath(path, enclosing.mountpoint)))
        if subvolume == "/":
            raise NotSupported(f"{path} is the top-level subvolume of its btrfs file system, where fsrvpd keeps its "
                               "snapshots. Give the share a subvolume of its own (btrfs subvolume create).")
        if is_below(subvolume, f"/{SNAPSHOT_DIR}"):
            raise NotSupported(f"{path} is one of fsrvpd's own snapshots")
        fsid = _filesystem_id(enclosing.source)
        if fsid is None:
            raise NotSupported(f"cannot tell which btrfs file system {enclosing.source} belongs to")
        if configured is not None and os.path.normpath("/" + configured.lstrip("/")) != subvolume:
            raise NotSupported(f"{path} is btrfs subvolume {subvolume}, not the configured {configured}")
        below = self._what_is_below(path, mounts)
        if below:
            raise NotSupported(f"{path} has {', '.join(below)} below it; a snapshot of subvolume {subvolume} would "
                               "not contain them. Give the share a subvolume with nothing below it.")
        return FileStore(backend=self.name, name=f"{fsid}:{subvolume}", group=fsid, mountpoint=path)

    def _what_is_below(self, path: str, mounts: list[Mount]) -> list[str]:
        """Mounts and subvolumes below the share's root: a snapshot would hold empty directories there."""
        found = sorted(f"{m.source} mounted at {m.mountpoint}" for m in mounts
                       if is_below(m.mountpoint, path) and m.mountpoint != path
                       and not is_below(m.mountpoint, self.mount_root))
        try:
            nested = child_subvolumes(path)
        except OSError as exc:
            raise NotSupported(f"cannot list the subvolumes below {path}: {exc.strerror}") from None
        if nested:
            found.append(f"{len(nested)} subvolume(s) (ids {', '.join(map(str, nested[:5]))}"
                         f"{', ...' if len(nested) > 5 else ''})")
        return found

    # -- places ------------------------------------------------------------------------------

    def _top_level(self, fsid: str) -> str:
        """Our mount of the file system's top-level subvolume, mounted now if it is not."""
        directory = os.path.join(self.mount_root, TOP_LEVELS, fsid)
        mounted = _mount_at(directory)
        if mounted is not None and mounted.fstype == "btrfs" and mounted.root == "/" \
                and _filesystem_id(mounted.source) == fsid:
            return directory
        device = _device_of(fsid)
        if device is None:
            raise BtrfsError(f"btrfs file system {fsid} is not mounted anywhere", missing=True)
        make_mount_root(self.mount_root)
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.dirname(directory))
            os.chmod(os.path.dirname(directory), PRIVATE_MODE)  # whatever the daemon's umask
        os.makedirs(directory, exist_ok=True)
        self.mounter.mount(device, directory, "btrfs", "subvolid=5")
        return directory

    def _top_levels(self) -> list[tuple[str, str]]:
        """(fsid, top level) of every file system fsrvpd keeps snapshots on, mounted again after a
        reboot; one the kernel no longer knows is skipped (and logged)."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for fsid in sorted(os.listdir(os.path.join(self.mount_root, TOP_LEVELS))):
                try:
                    found.append((fsid, self._top_level(fsid)))
                except (BtrfsError, CommandFailed) as exc:
                    log.warning("not looking for snapshots on btrfs %s: %s", fsid, exc)
        return found

    def _mountpoint(self, copy_id: uuid.UUID) -> str:
        return os.path.join(self.mount_root, str(copy_id))

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self, copies: list[ShadowCopyRef]) -> None:
        try:
            with failing_as("taking the snapshots failed"):
                self._snapshot_all(copies)
        except BackendError:
            for copy in copies:
                try:
                    self.remove(copy)
                except BackendError as cleanup:
                    log.error("could not discard the snapshot of copy %s of failed set %s (it carries our record; "
                              "reconciliation retries): %s", copy.copy_id, copy.set_id, cleanup)
            raise

    def _snapshot_all(self, copies: list[ShadowCopyRef]) -> None:
        jobs = []
        for copy in copies:
            top_level = self._top_level(copy.store.group)
            source = os.path.join(top_level, copy.store.name.split(":", 1)[1].lstrip("/"))
            if not _is_subvolume(source):
                raise BtrfsError(f"subvolume {copy.store.name} of {copy.store.mountpoint} is gone", missing=True)
            target = top_level + _snapshot_root(copy.set_id, copy.copy_id)
            self._make_set_directory(os.path.dirname(target), copy.set_id)
            if os.path.lexists(target):
                raise BtrfsError(f"{target} already exists")
            jobs.append((source, target))
        with concurrent.futures.ThreadPoolExecutor(PARALLEL_SNAPSHOTS) as pool:
            for done in [pool.submit(self.btrfs.snapshot, source, target) for source, target in jobs]:
                done.result()

    @staticmethod
    def _make_set_directory(directory: str, set_id: uuid.UUID) -> None:
        """The ownership record exists before the set's first snapshot does.

        An empty, unrecorded directory of the set (a crash between mkdir and setxattr) is taken over:
        in the private snapshot directory nobody else can have made it.
        """
        snapshots = os.path.dirname(directory)
        with contextlib.suppress(FileExistsError):
            os.mkdir(snapshots, PRIVATE_MODE)
        _require_private(snapshots)
        if _owner_of(directory) == str(set_id):
            return
        os.makedirs(directory, PRIVATE_MODE, exist_ok=True)
        if os.listdir(directory):
            raise BtrfsError(f"{directory} holds something, but no fsrvpd record for set {set_id}")
        os.setxattr(directory, OWNER_XATTR, str(set_id).encode(), follow_symlinks=False)

    def _require_ours(self, path: str, set_id: uuid.UUID) -> None:
        """Raise BackendError unless `path` is a subvolume in the set directory that records `set_id`."""
        if not _is_subvolume(path):
            raise BackendError(f"snapshot {path} does not exist", missing=True)
        directory = os.path.dirname(path)
        _require_private(os.path.dirname(directory))
        if _owner_of(directory) != str(set_id) or os.path.basename(directory) != str(set_id):
            raise BackendError(f"{path} is not in a directory carrying fsrvpd's record for set {set_id}; "
                               "leaving it alone")

    # -- exposure ----------------------------------------------------------------------------

    def expose(self, copy: ShadowCopyRef, writable: bool) -> str:
        if copy.source is not None:
            raise BackendError(f"exposing an existing btrfs snapshot ({copy.source}) is not supported")
        mountpoint = self._mountpoint(copy.copy_id)
        with failing_as(f"exposing the snapshot of copy {copy.copy_id}"):
            mounted = _mount_at(mountpoint)
            if _exposed(mounted) == (copy.set_id, copy.copy_id):
                if mounted.root.endswith("//deleted"):
                    raise BackendError(f"the snapshot mounted at {mountpoint} was deleted", missing=True)
                return mountpoint
            if mounted is not None:
                raise BackendError(f"{mountpoint} already has {mounted.source} ({mounted.root}) mounted")
            path = self._top_level(copy.store.group) + _snapshot_root(copy.set_id, copy.copy_id)
            self._require_ours(path, copy.set_id)
            self.btrfs.set_read_only(path, not writable)
            make_mount_root(self.mount_root)
            os.makedirs(mountpoint, exist_ok=True)
            options = f"{'rw' if writable else 'ro'},subvol={_snapshot_root(copy.set_id, copy.copy_id)}"
            try:
                self.mounter.mount(_device_of(copy.store.group), mountpoint, "btrfs", options)
            except CommandFailed:
                remove_empty_directory(mountpoint)
                raise
        return mountpoint

    def make_read_only(self, copy: ShadowCopyRef) -> None:
        """Stop writes through the exposure, put what was written on disk, then make the subvolume read-only."""
        mountpoint = self._mountpoint(copy.copy_id)
        with failing_as(f"making the snapshot of copy {copy.copy_id} read-only"):
            mounted = _mount_at(mountpoint)
            if _exposed(mounted) == (copy.set_id, copy.copy_id) and "rw" in mounted.options:
                self.mounter.remount_read_only(mountpoint, this_mount_only=True)
            path = self._top_level(copy.store.group) + _snapshot_root(copy.set_id, copy.copy_id)
            self._require_ours(path, copy.set_id)
            self.btrfs.sync(path)
            self.btrfs.set_read_only(path, True)

    def pool_space(self, store: FileStore) -> dict[str, int]:
        """The file system's space as statfs tells it (btrfs's own estimate of what data can still use)."""
        with failing_as(f"reading the space of btrfs {store.group}"):
            space = os.statvfs(store.mountpoint)
        return {"used": (space.f_blocks - space.f_bfree) * space.f_frsize,
                "available": space.f_bavail * space.f_frsize}

    # -- removal -----------------------------------------------------------------------------

    def remove_exposure(self, copy: ShadowCopyRef) -> None:
        self._remove(copy.store.group, copy.set_id, copy.copy_id, keep_snapshot=True)

    def remove(self, copy: ShadowCopyRef) -> None:
        self._remove(copy.store.group, copy.set_id, copy.copy_id, keep_snapshot=False)

    def _remove(self, fsid: str | None, set_id: uuid.UUID, copy_id: uuid.UUID, keep_snapshot: bool) -> None:
        """Unmount the copy's exposure; then make its snapshot read-only again, or delete it if ours."""
        mountpoint = self._mountpoint(copy_id)
        with failing_as(f"removing {'the exposure of ' if keep_snapshot else ''}shadow copy {copy_id}"):
            if _exposed(_mount_at(mountpoint)) == (set_id, copy_id):
                self.mounter.unmount(mountpoint)
            remove_empty_directory(mountpoint)
            if fsid is None:  # an exposure of a file system the kernel no longer names: nothing more to do
                return
            top_level = self._top_level(fsid)
            path = top_level + _snapshot_root(set_id, copy_id)
            if _is_subvolume(path):
                self._require_ours(path, set_id)
                if keep_snapshot:
                    self.btrfs.set_read_only(path, True)
                    return
                try:
                    self.btrfs.delete(path)
                except BtrfsError as exc:
                    if not exc.missing:
                        raise
            if not keep_snapshot:
                self._remove_set_directory(top_level, set_id)

    def _remove_set_directory(self, top_level: str, set_id: uuid.UUID) -> None:
        """Remove the set's directory once it is empty, and let go of the file system with the last one."""
        directory = os.path.join(top_level, SNAPSHOT_DIR, str(set_id))
        if _owner_of(directory) == str(set_id) and not os.listdir(directory):
            os.rmdir(directory)
        try:
            os.rmdir(os.path.dirname(directory))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                return
            raise
        self.mounter.unmount(top_level)
        remove_empty_directory(top_level)

    def owned(self) -> list[OwnedObject]:
        """Every exposure mount, every snapshot in a set directory carrying our record, and every
        empty such directory, in that order (a snapshot cannot go while it is mounted)."""
        objects = []
        with failing_as("listing fsrvpd's btrfs snapshots"):
            for mount in read_mounts():
                shown = _exposed(mount) if is_below(mount.mountpoint, self.mount_root) else None
                if shown is not None:
                    objects.append(OwnedObject(MOUNT, mount.mountpoint, *shown, group=_filesystem_id(mount.source)))
            for fsid, top_level in self._top_levels():
                objects += self._snapshots_in(fsid, os.path.join(top_level, SNAPSHOT_DIR))
        order = {MOUNT: 0, SNAPSHOT: 1, SET_DIRECTORY: 2}
        return sorted(objects, key=lambda obj: (order[obj.kind], obj.name))

    @staticmethod
    def _snapshots_in(fsid: str, snapshots: str) -> list[OwnedObject]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            _require_private(snapshots)
            for entry in os.scandir(snapshots):
                if not re.fullmatch(_GUID, entry.name) or _owner_of(entry.path) != entry.name:
                    log.debug("%s carries no fsrvpd ownership record; leaving it alone", entry.path)
                    continue
                set_id = uuid.UUID(entry.name)
                children = list(os.scandir(entry.path))
                if not children:
                    found.append(OwnedObject(SET_DIRECTORY, entry.path, set_id, None, group=fsid))
                found += [OwnedObject(SNAPSHOT, child.path, set_id, uuid.UUID(child.name), group=fsid)
                          for child in children if re.fullmatch(_GUID, child.name) and _is_subvolume(child.path)]
        return found

    def remove_owned(self, obj: OwnedObject) -> None:
        if obj.kind == SET_DIRECTORY:
            with failing_as(f"removing set directory {obj.name}"):
                self._remove_set_directory(self._top_level(obj.group), obj.set_id)
            return
        self._remove(obj.group, obj.set_id, obj.copy_id, keep_snapshot=obj.kind == MOUNT)

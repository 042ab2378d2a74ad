"""The LVM backend: a snapshot of the logical volume whose ext4 or xfs file system is a share's root.

Objects and names (GUIDs lowercase, without braces)
  snapshot LV  <vg>/fsrvpd-<copy guid>   tags fsrvpd-set:<set guid> and fsrvpd-copy:<copy guid>,
               given by `lvcreate --addtag`, so the LV never exists without them
  mount        <mount_root>/<copy guid>   the snapshot's file system: `ro,noload` (ext4) or
               `ro,norecovery,nouuid` (xfs) on a read-only LV, or read-write (journal replayed)
               for auto-recovery until make_read_only remounts it ro and runs `lvchange -p r`
Nothing is removed unless it carries both tags for the copy at hand: the tags are checked first
(for a clear error), and `lvremove` itself selects by name *and* tags, so the check holds under
lvm2's own VG lock.

Kinds of origin
  thin     (lv_attr V...): a thin snapshot in the origin's pool, no size needed. lvm2 gives a thin
           snapshot the activation-skip flag; it is activated (`lvchange -ay -K`) only to expose.
  classic  (a linear/striped/raid LV): a COW snapshot whose size comes from the share's
           `snapshot_size` (percent of the origin or absolute). Before anything is created, the
           sizes of a set are added up per VG and checked against the VG's free space: too little
           is BackendError(out_of_space) with nothing made. A COW area that fills up invalidates
           the snapshot (lv_attr state `I`); `failing` reports it, `expose` refuses it, and the
           device itself fails every read, so an exposed share errors instead of serving garbage.

Consistency of a set. `lvcreate --snapshot` takes exactly one origin (lvm2 2.03 answers "Command
does not accept argument" to a second one), so a set's snapshots are taken one after another in
one commit call. Each is crash-consistent on its own: lvm2 suspends the origin with its file
system frozen (do NOT add fsfreeze: a frozen file system makes that suspend fail with EBUSY).
Across volumes, the set is consistent for everything the client's VSS writers quiesce for the
commit (Hyper-V, SQL Server: what FSRVP is used for); a writer outside VSS can change one volume
between two snapshots. On any failure every snapshot of the call is removed before BackendError.

The command layer is `LvmCli`, the one class that knows the lvm2 command line. Machine-readable
state comes from `lvs --reportformat json`: lvm2's own report (stable, versioned field names),
with no extra daemon. libblockdev's LVM plugin would add a D-Bus daemon (lvmdbusd) or a C
library binding for the same information, and its Python bindings exist only through
GObject introspection, so the CLI is the well-kept way here, as with ZFS.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from typing import NamedTuple

from fsrvpd.backends.base import (MOUNT, SNAPSHOT, Backend, BackendError, FileStore, NotSupported, OwnedObject,
                                  ShadowCopyRef)
from fsrvpd.backends.host import (Mount, Mounter, StorageCommandError, failing_as, is_below, read_mounts,
                                  remove_empty_directory, retry_while_busy)
from fsrvpd.runner import CommandFailed, CommandRunner

log = logging.getLogger("fsrvpd.backends.lvm")

SET_TAG = "fsrvpd-set:"
COPY_TAG = "fsrvpd-copy:"
NAME_PREFIX = "fsrvpd-"
DEFAULT_SNAPSHOT_SIZE = "20%"
# Mount options per file system: read-only without touching the (frozen-clean) log, or writable.
MOUNT_OPTIONS = {
    "ext4": {False: "ro,noload", True: "rw"},
    "xfs": {False: "ro,norecovery,nouuid", True: "rw,nouuid"},
}
LVS_FIELDS = ("vg_name", "lv_name", "lv_attr", "origin", "pool_lv", "lv_tags", "data_percent", "lv_size",
              "vg_size", "vg_free", "vg_extent_size", "lv_kernel_major", "lv_kernel_minor")


class LvmError(StorageCommandError):
    MISSING = "not found|failed to find|does not exist"
    BUSY = "in use|busy|open logical volume"
    OUT_OF_SPACE = "insufficient (free|suitable)|reached threshold|out of (data|metadata) space|no space"


class LogicalVolume(NamedTuple):
    """One row of `lvs`, in the terms the backend needs."""

    vg: str
    name: str
    attr: str
    origin: str
    pool: str
    tags: frozenset[str]
    data_percent: float | None
    size: int
    vg_size: int
    vg_free: int
    extent_size: int
    device: str | None  # "major:minor" while active

    @property
    def full_name(self) -> str:
        return f"{self.vg}/{self.name}"

    @property
    def path(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    @property
    def thin(self) -> bool:
        return self.attr[0] == "V"

    @property
    def classic_snapshot(self) -> bool:
        return self.attr[0] in "sS"

    @property
    def writable(self) -> bool:
        return self.attr[1] == "w"

    @property
    def active(self) -> bool:
        return self.attr[4] == "a"

    @property
    def invalid(self) -> bool:
        """A classic snapshot whose COW area overflowed: its data is gone for good."""
        return self.classic_snapshot and (self.attr[4] in "IS" or (self.data_percent or 0) >= 100)

    @classmethod
    def from_report(cls, row: dict[str, str]) -> LogicalVolume:
        major, minor = row["lv_kernel_major"], row["lv_kernel_minor"]
        return cls(vg=row["vg_name"], name=row["lv_name"], attr=row["lv_attr"], origin=row["origin"],
                   pool=row["pool_lv"], tags=frozenset(filter(None, row["lv_tags"].split(","))),
                   data_percent=float(row["data_percent"]) if row["data_percent"] else None,
                   size=int(row["lv_size"]), vg_size=int(row["vg_size"]), vg_free=int(row["vg_free"]), extent_size=int(row["vg_extent_size"]),
                   device=f"{major}:{minor}" if major not in ("", "-1") else None)


class LvmCli:
    """The lvm2 command line: `lvs --reportformat json`, `lvcreate`, `lvchange`, `lvremove`."""

    def __init__(self, runner: CommandRunner, timeout: float):
        self.runner = runner
        self.timeout = timeout

    def _run(self, *argv: str) -> str:
        try:
            return self.runner.run(list(argv), timeout=self.timeout).stdout
        except CommandFailed as exc:
            raise LvmError.from_command(exc) from exc

    def volumes(self, vgs: Iterable[str] = ()) -> list[LogicalVolume]:
        """Every visible LV of the given VGs (of all VGs without any)."""
        out = self._run("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", ",".join(LVS_FIELDS),
                        *sorted(set(vgs)))
        return [LogicalVolume.from_report(row) for report in json.loads(out)["report"] for row in report["lv"]]

    def create_snapshot(self, origin: str, name: str, tags: Iterable[str], size: int | None) -> None:
        """A thin snapshot (size None) or a classic one of `size` bytes, tagged as it is created."""
        self._run("lvcreate", "--snapshot", "--name", name, *(arg for tag in tags for arg in ("--addtag", tag)),
                  *(["--size", f"{size}b"] if size is not None else []), origin)

    def activate(self, name: str) -> None:
        """Activate, also an LV that carries the activation-skip flag (thin snapshots do)."""
        self._run("lvchange", "--activate", "y", "--ignoreactivationskip", name)

    def set_permission(self, name: str, writable: bool) -> None:
        self._run("lvchange", "--permission", "rw" if writable else "r", name)

    def remove(self, name: str, tags: Iterable[str]) -> None:
        """Remove `name` only if it carries all `tags` (lvm2 selects under its VG lock); busy is retried."""
        vg, lv = name.split("/")
        tag_list = ",".join(f'"{tag}"' for tag in tags)
        selection = f"vg_name={vg} && lv_name={lv} && lv_tags={{{tag_list}}}"
        retry_while_busy(lambda: self._run("lvremove", "--yes", "--select", selection),
                         lambda exc: isinstance(exc, LvmError) and exc.busy)


@dataclasses.dataclass(frozen=True)
class SnapshotSize:
    """The COW area of a classic snapshot: a share of its origin's size, or a fixed size in bytes."""

    percent: float | None = None
    size: int | None = None

    UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    @classmethod
    def parse(cls, text: str) -> SnapshotSize:
        """'20%' or '512M' / '4G' / '1.5T' (binary units) / '1073741824' (bytes); ValueError otherwise."""
        percent = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text.strip())
        if percent:
            value = float(percent.group(1))
            if not 0 < value <= 100:
                raise ValueError(f"{text!r}: a share of the origin must be above 0% and at most 100%")
            return cls(percent=value)
        absolute = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.I)
        if absolute and float(absolute.group(1)) > 0:
            return cls(size=math.ceil(float(absolute.group(1)) * cls.UNITS[absolute.group(2).upper()]))
        raise ValueError(f"{text!r} is neither a share of the origin (like 20%) nor a size (like 512M or 4G)")

    def bytes_for(self, origin: LogicalVolume) -> int:
        """The size lvm2 will allocate: rounded up to whole extents of the origin's VG."""
        wanted = self.size if self.size is not None else origin.size * self.percent / 100
        return max(1, math.ceil(wanted / origin.extent_size)) * origin.extent_size


def snapshot_lv_name(copy: ShadowCopyRef) -> str:
    return f"{copy.store.name.split('/')[0]}/{NAME_PREFIX}{copy.copy_id}"


def ownership_tags(set_id: uuid.UUID, copy_id: uuid.UUID | None) -> list[str]:
    return [f"{SET_TAG}{set_id}", *([f"{COPY_TAG}{copy_id}"] if copy_id else [])]


class LvmBackend(Backend):
    """Shadow copies of ext4/xfs file systems on LVM (see the module docstring)."""

    name = "lvm"
    exposure_holds_data = False  # an exposure is a mount of the snapshot LV, which holds the recovery

    def __init__(self, runner: CommandRunner, mount_root: str, command_timeout: float = 60,
                 snapshot_size: Callable[[str], SnapshotSize | None] = lambda path: None):
        """`snapshot_size` gives the classic snapshot size of the share mounted at a path (None:
        DEFAULT_SNAPSHOT_SIZE); it is asked at each commit, so a reloaded configuration counts."""
        self.lvm = LvmCli(runner, command_timeout)
        self.mounter = Mounter(runner, command_timeout)
        self.mount_root = mount_root
        self.snapshot_size = snapshot_size

    # -- file stores -------------------------------------------------------------------------

    def file_store(self, path: str, configured: str | None = None) -> FileStore:
        path = os.path.realpath(path)
        mounts = read_mounts()
        on_top = next((m for m in reversed(mounts) if m.mountpoint == path), None)
        with failing_as(f"looking up the logical volume of {path}"):
            volumes = self.lvm.volumes()
        volume = self._volume_mounted_at(path, on_top, mounts, volumes, configured)
        if on_top.fstype not in MOUNT_OPTIONS:
            raise NotSupported(f"{path} holds a {on_top.fstype} file system; LVM shares must be ext4 or xfs")
        if volume.classic_snapshot or volume.name.startswith(NAME_PREFIX):
            raise NotSupported(f"logical volume {volume.full_name} is itself a snapshot")
        below = sorted(f"{m.source} at {m.mountpoint}" for m in mounts
                       if is_below(m.mountpoint, path) and m.mountpoint != path
                       and not is_below(m.mountpoint, self.mount_root))
        if below:
            raise NotSupported(f"{path} has other file systems below it ({', '.join(below)}); a snapshot of "
                               f"{volume.full_name} would not contain them. Give the share a volume with nothing "
                               "mounted below it.")
        return FileStore(backend=self.name, name=volume.full_name, group=_group(volume), mountpoint=path)

    @staticmethod
    def _volume_mounted_at(path: str, on_top: Mount | None, mounts: list[Mount], volumes: list[LogicalVolume],
                           configured: str | None) -> LogicalVolume:
        if configured is not None:
            volume = next((lv for lv in volumes if lv.full_name == configured), None)
            if volume is None:
                raise NotSupported(f"there is no logical volume named {configured}")
            if on_top is None or volume.device is None or on_top.device != volume.device:
                elsewhere = [m.mountpoint for m in mounts if volume.device and m.device == volume.device]
                raise NotSupported(f"logical volume {configured} is mounted at {elsewhere[-1]}, not at {path}"
                                   if elsewhere else f"logical volume {configured} is not mounted")
            return volume
        if on_top is None:
            if not os.path.isdir(path):
                raise NotSupported(f"{path} is not a directory")
            enclosing = max((m for m in mounts if is_below(path, m.mountpoint)), key=lambda m: len(m.mountpoint))
            raise NotSupported(f"{path} is a directory inside {enclosing.source} (mounted at {enclosing.mountpoint}), "
                               "not the root of a logical volume. Give the share its own logical volume.")
        volume = next((lv for lv in volumes if lv.device == on_top.device), None)
        if volume is None:
            raise NotSupported(f"{path} is {on_top.source} ({on_top.fstype}), not an LVM logical volume")
        return volume

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self, copies: list[ShadowCopyRef]) -> None:
        with failing_as("reading the volumes to snapshot"):
            volumes = self._volumes(copy.store.name.split("/")[0] for copy in copies)
        sizes = {copy.copy_id: self._cow_size(copy, volumes) for copy in copies}
        self._check_free_space(copies, sizes, volumes)
        try:
            for copy in copies:
                self.lvm.create_snapshot(copy.store.name, snapshot_lv_name(copy).split("/")[1],
                                         ownership_tags(copy.set_id, copy.copy_id), sizes[copy.copy_id])
        except LvmError as exc:
            for copy in copies:
                try:
                    self._remove(copy, keep_snapshot=False)
                except BackendError as cleanup:
                    log.error("could not discard snapshot %s of failed set %s: %s", snapshot_lv_name(copy),
                              copy.set_id, cleanup)
            raise BackendError(f"taking the snapshots failed: {exc}", out_of_space=exc.out_of_space) from exc

    def _cow_size(self, copy: ShadowCopyRef, volumes: dict[str, LogicalVolume]) -> int | None:
        """Bytes for a classic snapshot of the copy's volume; None for a thin one."""
        origin = volumes.get(copy.store.name)
        if origin is None:
            raise BackendError(f"logical volume {copy.store.name} of {copy.store.mountpoint} no longer exists")
        if origin.thin:
            return None
        size = self.snapshot_size(copy.store.mountpoint) or SnapshotSize.parse(DEFAULT_SNAPSHOT_SIZE)
        return size.bytes_for(origin)

    @staticmethod
    def _check_free_space(copies: list[ShadowCopyRef], sizes: dict[uuid.UUID, int | None],
                          volumes: dict[str, LogicalVolume]) -> None:
        """Refuse the whole set before creating anything when a VG cannot hold its classic snapshots."""
        needed: dict[str, int] = collections.Counter()
        for copy in copies:
            needed[volumes[copy.store.name].vg] += sizes[copy.copy_id] or 0
        for vg, wanted in needed.items():
            free = next(lv.vg_free for lv in volumes.values() if lv.vg == vg)
            if wanted > free:
                raise BackendError(f"volume group {vg} has {free} bytes free; the classic snapshots of this set "
                                   f"need {wanted}. Free space in {vg} or lower the shares' snapshot_size.",
                                   out_of_space=True)

    def _volumes(self, vgs: Iterable[str]) -> dict[str, LogicalVolume]:
        return {lv.full_name: lv for lv in self.lvm.volumes(vgs)}

    def _snapshot_of(self, copy: ShadowCopyRef) -> LogicalVolume | None:
        """The copy's snapshot LV if it exists; BackendError if it exists without our tags."""
        name = snapshot_lv_name(copy)
        try:
            snapshot = self._volumes([name.split("/")[0]]).get(name)
        except LvmError as exc:
            if exc.missing:  # the whole VG is gone
                return None
            raise
        if snapshot is not None:
            _require_ours(snapshot, copy.set_id, copy.copy_id)
        return snapshot

    # -- exposure ----------------------------------------------------------------------------

    def _mountpoint(self, copy: ShadowCopyRef) -> str:
        return os.path.join(self.mount_root, str(copy.copy_id))

    def expose(self, copy: ShadowCopyRef, writable: bool) -> str:
        name, mountpoint = snapshot_lv_name(copy), self._mountpoint(copy)
        if copy.source is not None:
            raise BackendError(f"exposing an existing LVM snapshot ({copy.source}) is not supported")
        with failing_as(f"exposing {name}"):
            snapshot = self._snapshot_of(copy)
            if snapshot is None:
                raise BackendError(f"snapshot {name} does not exist")
            if snapshot.invalid:
                raise BackendError(_overflowed(snapshot))
            mounted = _mount_at(mountpoint)
            if mounted is not None and mounted.device == snapshot.device:
                return mountpoint
            if not snapshot.active:
                self.lvm.activate(name)
            if snapshot.writable != writable:
                self.lvm.set_permission(name, writable)
            fstype = self.mounter.fstype(snapshot.path)
            if fstype not in MOUNT_OPTIONS:
                raise BackendError(f"snapshot {name} holds a {fstype or 'unknown'} file system, not ext4 or xfs")
            os.makedirs(mountpoint, exist_ok=True)
            try:
                self.mounter.mount(snapshot.path, mountpoint, fstype, MOUNT_OPTIONS[fstype][writable])
            except CommandFailed:
                remove_empty_directory(mountpoint)
                raise
        return mountpoint

    def make_read_only(self, copy: ShadowCopyRef) -> None:
        """Remount read-only first (the file system flushes), then make the LV itself read-only."""
        name, mountpoint = snapshot_lv_name(copy), self._mountpoint(copy)
        with failing_as(f"making {name} read-only"):
            mounted = _mount_at(mountpoint)
            if mounted is not None and "rw" in mounted.options:
                self.mounter.remount_read_only(mountpoint)
            snapshot = self._snapshot_of(copy)
            if snapshot is None:
                raise BackendError(f"snapshot {name} does not exist")
            if snapshot.writable:
                self.lvm.set_permission(name, writable=False)

    def failing(self, copies: list[ShadowCopyRef]) -> dict[uuid.UUID, str]:
        """Copies whose classic snapshot overflowed, with the reason (one `lvs` for all of them)."""
        with failing_as("checking the snapshots"):
            volumes = self._volumes(snapshot_lv_name(copy).split("/")[0] for copy in copies)
        broken = {}
        for copy in copies:
            snapshot = volumes.get(snapshot_lv_name(copy))
            if snapshot is not None and snapshot.invalid:
                broken[copy.copy_id] = _overflowed(snapshot)
        return broken

    def pool_space(self, store: FileStore) -> dict[str, int]:
        """The thin pool's data space for a thin volume, the VG's space for a classic one."""
        vg, _, pool = store.group.partition("/")
        with failing_as(f"reading the space of {store.group}"):
            volumes = self._volumes([vg])
        if pool:
            found = volumes.get(store.group)
            if found is None or found.data_percent is None:
                return {}
            used = int(found.size * found.data_percent / 100)
            return {"used": used, "available": found.size - used}
        some = next(iter(volumes.values()), None)
        return {"used": some.vg_size - some.vg_free, "available": some.vg_free} if some else {}

    def usage(self, copy: ShadowCopyRef) -> dict[str, int]:
        """Bytes the copy's snapshot holds (data_percent of its size), for metrics; {} if it is gone."""
        with failing_as(f"reading the space used by copy {copy.copy_id}"):
            snapshot = self._snapshot_of(copy)
        if snapshot is None or snapshot.data_percent is None:
            return {}
        return {"snapshot": int(snapshot.size * snapshot.data_percent / 100)}

    # -- removal -----------------------------------------------------------------------------

    def remove_exposure(self, copy: ShadowCopyRef) -> None:
        self._remove(copy, keep_snapshot=True)

    def remove(self, copy: ShadowCopyRef) -> None:
        self._remove(copy, keep_snapshot=False)

    def _remove(self, copy: ShadowCopyRef, keep_snapshot: bool) -> None:
        with failing_as(f"removing shadow copy {copy.copy_id}"):
            snapshot = self._snapshot_of(copy)
            if snapshot is not None:
                self._unmount(snapshot)
            remove_empty_directory(self._mountpoint(copy))
            if snapshot is not None and not keep_snapshot:
                self.lvm.remove(snapshot.full_name, ownership_tags(copy.set_id, copy.copy_id))

    def _unmount(self, snapshot: LogicalVolume) -> None:
        """Unmount every mount of the snapshot under the mount root (only we mount there)."""
        for mount in reversed(read_mounts()):
            if snapshot.device is not None and mount.device == snapshot.device \
                    and is_below(mount.mountpoint, self.mount_root):
                self.mounter.unmount(mount.mountpoint)

    def owned(self) -> list[OwnedObject]:
        """Every tagged snapshot LV, and its mounts under the mount root (the copy's exposure),
        mounts first (a snapshot cannot go while it is mounted)."""
        if shutil.which("lvs") is None:  # no lvm2 on this host: nothing of ours either
            return []
        with failing_as("listing fsrvpd's snapshots"):
            volumes = self.lvm.volumes()
        mounts = [mount for mount in read_mounts() if is_below(mount.mountpoint, self.mount_root)]
        objects = []
        for lv in volumes:
            set_tags = [tag for tag in lv.tags if tag.startswith(SET_TAG)]
            if not set_tags:
                continue
            copy_tags = [tag for tag in lv.tags if tag.startswith(COPY_TAG)]
            try:
                set_id = uuid.UUID(set_tags[0].removeprefix(SET_TAG))
                copy_id = uuid.UUID(copy_tags[0].removeprefix(COPY_TAG)) if copy_tags else None
            except ValueError:
                log.warning("%s carries malformed fsrvpd tags %s; leaving it alone", lv.full_name, sorted(lv.tags))
                continue
            objects.append(OwnedObject(SNAPSHOT, lv.full_name, set_id, copy_id, group=_group(lv)))
            objects += [OwnedObject(MOUNT, mount.mountpoint, set_id, copy_id, group=_group(lv))
                        for mount in mounts if lv.device is not None and mount.device == lv.device]
        return sorted(objects, key=lambda obj: (obj.kind == SNAPSHOT, obj.name))

    def remove_owned(self, obj: OwnedObject) -> None:
        with failing_as(f"removing {obj.kind} {obj.name}"):
            if obj.kind == MOUNT:  # an exposure nothing wants: its snapshot may still be kept
                if _mount_at(obj.name) is not None:
                    self.mounter.unmount(obj.name)
                remove_empty_directory(obj.name)
                return
            snapshot = self._volumes([obj.name.split("/")[0]]).get(obj.name)
            if snapshot is None:
                return
            _require_ours(snapshot, obj.set_id, obj.copy_id)
            self._unmount(snapshot)
            if obj.copy_id is not None:
                remove_empty_directory(os.path.join(self.mount_root, str(obj.copy_id)))
            self.lvm.remove(obj.name, ownership_tags(obj.set_id, obj.copy_id))


def _require_ours(lv: LogicalVolume, set_id: uuid.UUID, copy_id: uuid.UUID | None) -> None:
    """Raise BackendError unless the LV carries our tags for this set (and copy)."""
    if not set(ownership_tags(set_id, copy_id)) <= lv.tags:
        raise BackendError(f"{lv.full_name} exists but does not carry fsrvpd's tags for set {set_id}"
                           f"{f' and copy {copy_id}' if copy_id else ''}; leaving it alone")


def _group(lv: LogicalVolume) -> str:
    """FileStore.group: the thin pool of a thin volume (or snapshot), the VG of a classic one."""
    return f"{lv.vg}/{lv.pool}" if lv.thin else lv.vg


def _mount_at(mountpoint: str) -> Mount | None:
    return next((m for m in reversed(read_mounts()) if m.mountpoint == mountpoint), None)


def _overflowed(snapshot: LogicalVolume) -> str:
    return (f"classic snapshot {snapshot.full_name} overflowed its {snapshot.size} bytes of copy-on-write space "
            "and is invalid: its data is lost. Give the share a larger snapshot_size.")

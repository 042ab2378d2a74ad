"""The ZFS backend: one snapshot per dataset, exposed as a clone.

Objects and names (GUIDs lowercase, without braces)
  snapshot  <dataset>@fsrvpd-<set guid>    user property fsrvpd:set=<set guid>
  clone     <pool>/fsrvpd-<copy guid>       fsrvpd:set and fsrvpd:copy=<copy guid>; mounted at <mount_root>/<copy guid>
A set holds one copy per dataset, so a snapshot's set tag and dataset name its copy: `owned`
reports the dataset as the snapshot's store and reconciliation finds the copy by it. A copy tag
costs one `zfs set` per snapshot (one call sets one value), which would dwarf the atomic snapshot
itself; snapshots made by earlier versions carry one, and it must then match.
A tag counts only where it is set on the object itself (user properties are inherited, so a
snapshot of one of our clones would otherwise look like ours). Nothing is destroyed unless it
carries our tags for the copy at hand, and `zfs destroy` never gets -r or -R.

Atomicity of `snapshot`: copies are grouped per pool (and set); each group is one atomic call.
  - OpenZFS takes several snapshot arguments in one `zfs snapshot`: all are taken in the same
    transaction group, or none is.
  - zfs-fuse (pool v23) takes one argument. A group of one dataset is snapshotted directly; a
    group of several by `zfs snapshot -r` of their deepest common ancestor, which is atomic as
    well; the snapshots of the datasets below that ancestor that are not in the set (as `prepare`
    listed them, at PrepareShadowCopySet) are then destroyed, after checking their set tag: those
    of our clones within the Commit (they would block the clones' removal), the others once the
    Commit is answered (`snapshot` returns that work; `zfs destroy` takes ~10 ms, more with
    thousands of snapshots, and the client's writers are frozen until the answer). Until then
    they exist; after a crash, reconciliation removes them (no copy of the set is of their dataset).
  Groups in different pools are separate calls, so a set spanning pools is consistent per pool
  only; no ZFS tool offers more. The set tag comes with the snapshot (`zfs snapshot -o`), so it is
  never missing. If anything fails, every snapshot of the call that carries the set tag is
  destroyed before BackendError is raised.

Exposure is a clone: zfs-fuse has no .zfs/snapshot directory, and a clone also serves writable
(auto-recovery) copies. A read-only exposure is a clone with readonly=on, so ZFS itself refuses
writes, whatever the share says.

The command layer is `ZfsCli`, the one class that knows the zfs command line; it reports
failures as `ZfsError` with the kinds the backend acts on. On OpenZFS hosts a `ZfsLibzfsCore` on
pyzfs (libzfs_core) can replace it method for method; pyzfs does not exist for zfs-fuse, so that
class is not written yet.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import uuid
from collections.abc import Iterable
from typing import Callable

from fsrvpd.backends.base import SNAPSHOT, Backend, BackendError, FileStore, NotSupported, OwnedObject, ShadowCopyRef
from fsrvpd.backends.host import (Mount, StorageCommandError, failing_as, is_below, make_mount_root, read_mounts,
                                  remove_empty_directory, retry_while_busy)
from fsrvpd.runner import CommandFailed, CommandRunner

log = logging.getLogger("fsrvpd.backends.zfs")

SET_TAG = "fsrvpd:set"
COPY_TAG = "fsrvpd:copy"
NAME_PREFIX = "fsrvpd-"
ZFS_MOUNT_TYPES = {"zfs", "fuse.zfs"}  # OpenZFS, zfs-fuse

_OUR_CLONE = re.compile(rf"^[^/@]+/{NAME_PREFIX}[0-9a-f-]{{36}}$")


class ZfsError(StorageCommandError):
    MISSING = "does not exist"
    BUSY = r"\bbusy\b"
    OUT_OF_SPACE = "out of space|quota exceeded|no space left"
    EXISTS = "already exists"


class ZfsCli:
    """The zfs command line, limited to what both zfs-fuse and current OpenZFS accept."""

    def __init__(self, runner: CommandRunner, timeout: float):
        self.runner = runner
        self.timeout = timeout
        self._takes_several_snapshots: bool | None = None

    def _run(self, *args: str) -> str:
        try:
            return self.runner.run(["zfs", *args], timeout=self.timeout).stdout
        except CommandFailed as exc:
            raise ZfsError.from_command(exc) from exc

    def filesystems(self) -> dict[str, str]:
        """Every filesystem's mountpoint, by name."""
        out = self._run("list", "-H", "-o", "name,mountpoint", "-t", "filesystem")
        return dict(line.split("\t") for line in out.splitlines())

    def tree(self, dataset: str) -> list[str]:
        """The dataset and every filesystem and volume below it."""
        return self._run("list", "-H", "-r", "-o", "name", "-t", "filesystem,volume", dataset).splitlines()

    def get(self, properties: Iterable[str], names: Iterable[str] | None = None, only_local: bool = False,
            exact: bool = False) -> dict[str, dict[str, str]]:
        """Property values per object; objects that do not exist are left out, unset values too.

        User properties (name:prop) count only where set on the object itself. With names None,
        every filesystem, volume and snapshot is read; with no names, none is (`zfs get` without
        names would read them all). `exact` gives numbers in bytes.
        """
        names = None if names is None else list(names)
        if names == []:
            return {}
        argv = ["zfs", "get", "-H", *(["-p"] if exact else []), "-o", "name,property,value,source",
                *(["-s", "local"] if only_local else []), ",".join(properties), *(names or [])]
        proc = self.runner.run(argv, timeout=self.timeout, check=False)
        complaints = proc.stderr.strip().splitlines()
        only_missing = bool(names) and bool(complaints) and all("does not exist" in line for line in complaints)
        if proc.returncode != 0 and not only_missing:
            raise ZfsError.from_command(CommandFailed(argv, proc.returncode, proc.stderr))
        values: dict[str, dict[str, str]] = {}
        for line in proc.stdout.splitlines():
            name, prop, value, source = line.split("\t")
            props = values.setdefault(name, {})
            if value != "-" and (":" not in prop or source == "local"):
                props[prop] = value
        return values

    def takes_several_snapshots(self) -> bool:
        """Whether one `zfs snapshot` takes several snapshots (OpenZFS) or only one (zfs-fuse).

        Probed once: both reject arguments without '@' before opening anything, but only a CLI
        that counts its arguments first answers "too many arguments".
        """
        if self._takes_several_snapshots is None:
            probe = self.runner.run(["zfs", "snapshot", "fsrvpd-probe", "fsrvpd-probe"],
                                    timeout=self.timeout, check=False)
            self._takes_several_snapshots = "too many arguments" not in probe.stderr
        return self._takes_several_snapshots

    def snapshot(self, snapshots: list[str], properties: dict[str, str], recursive: bool = False) -> None:
        self._run("snapshot", *(["-r"] if recursive else []), *property_options(properties), *snapshots)

    def clone(self, snapshot: str, target: str, properties: dict[str, str]) -> None:
        self._run("clone", *property_options(properties), snapshot, target)

    def set(self, name: str, prop: str, value: str) -> None:
        self._run("set", f"{prop}={value}", name)

    def mount(self, name: str) -> None:
        self._run("mount", name)

    def destroy(self, name: str) -> None:
        self._run("destroy", name)


def property_options(properties: dict[str, str]) -> list[str]:
    """`-o prop=value` for each property, as `zfs snapshot` and `zfs clone` take them."""
    return [arg for prop, value in properties.items() for arg in ("-o", f"{prop}={value}")]


def _groups(copies: list[ShadowCopyRef]) -> list[tuple[uuid.UUID, list[str]]]:
    """The copies' datasets per pool and set, with the set: each group is snapshotted in one atomic call."""
    groups: dict[tuple[str, uuid.UUID], list[str]] = {}
    for copy in copies:
        groups.setdefault((copy.store.group, copy.set_id), []).append(copy.store.name)
    return [(set_id, datasets) for (_, set_id), datasets in groups.items()]


def snapshot_name(copy: ShadowCopyRef) -> str:
    return copy.source or f"{copy.store.name}@{NAME_PREFIX}{copy.set_id}"


def clone_name(copy: ShadowCopyRef) -> str:
    return f"{copy.store.group}/{NAME_PREFIX}{copy.copy_id}"


def common_ancestor(datasets: Iterable[str]) -> str:
    """The deepest dataset that has all `datasets` at or below it (they share one pool)."""
    return "/".join(os.path.commonprefix([name.split("/") for name in datasets]))


class ZfsBackend(Backend):
    """Shadow copies of ZFS filesystems (see the module docstring for names, tags and atomicity)."""

    name = "zfs"

    def __init__(self, runner: CommandRunner, mount_root: str, command_timeout: float = 60):
        self.zfs = ZfsCli(runner, command_timeout)
        self.mount_root = mount_root
        self._trees: dict[str, list[str]] = {}  # ancestor -> its tree, as the last Prepare listed it

    # -- file stores -------------------------------------------------------------------------

    def file_store(self, path: str, configured: str | None = None) -> FileStore:
        """The dataset mounted at `path`, read from the mount table alone: AddToShadowCopySet asks for
        every share, and a zfs command costs more than the rest of the call (zfs-fuse: ~5 ms, plus
        ~0.5 ms per filesystem listed). Only a refusal runs `zfs list`, to say what is wrong."""
        path = os.path.realpath(path)
        mounts = read_mounts()
        on_top = next((m for m in reversed(mounts) if m.mountpoint == path), None)
        mounted = on_top.source if on_top is not None and on_top.fstype in ZFS_MOUNT_TYPES else None
        if mounted is None or configured not in (None, mounted):
            with failing_as(f"looking up the ZFS dataset of {path}"):
                raise NotSupported(self._why_not_a_share(path, configured, on_top, mounts))
        below = _mounts_below(path, mounts)
        if below:
            raise NotSupported(f"{path} has other file systems below it ({', '.join(below)}); a snapshot of "
                               f"{mounted} would not contain them. Give the share a dataset with nothing below it.")
        return FileStore(backend=self.name, name=mounted, group=mounted.split("/")[0], mountpoint=path)

    def _why_not_a_share(self, path: str, configured: str | None, on_top: Mount | None, mounts: list[Mount]) -> str:
        """Why no dataset (or not the `configured` one) is mounted at `path`."""
        filesystems = self.zfs.filesystems()
        if configured is not None:
            if configured not in filesystems:
                return self._why_not_a_filesystem(configured)
            elsewhere = [m.mountpoint for m in mounts if _is_zfs_mount_of(m, configured)]
            return (f"ZFS dataset {configured} is mounted at {elsewhere[-1]}, not at {path}" if elsewhere
                    else f"ZFS dataset {configured} is not mounted")
        if on_top is not None:
            return f"{path} is a {on_top.fstype} file system, not a ZFS dataset"
        unmounted = [name for name, mountpoint in filesystems.items() if mountpoint == path]
        if unmounted:
            return f"ZFS dataset {unmounted[0]} belongs at {path} but is not mounted"
        if not os.path.isdir(path):
            return f"{path} is not a directory"
        enclosing = max((m for m in mounts if is_below(path, m.mountpoint)), key=lambda m: len(m.mountpoint))
        return (f"{path} is a directory inside {enclosing.source} (mounted at {enclosing.mountpoint}), "
                "not the root of a ZFS dataset. Give the share its own dataset.")

    def _why_not_a_filesystem(self, dataset: str) -> str:
        kind = "snapshot" if "@" in dataset else self.zfs.get(["type"], [dataset]).get(dataset, {}).get("type")
        if kind is None:
            return f"there is no ZFS dataset named {dataset}"
        return f"ZFS {kind} {dataset} is not a filesystem"

    # -- snapshots ---------------------------------------------------------------------------

    def prepare(self, copies: list[ShadowCopyRef]) -> None:
        """zfs-fuse: list the tree below each group's common ancestor now, for the Commit to know the
        extra snapshots of its `snapshot -r` without listing them (~0.5 ms per filesystem)."""
        for set_id, datasets in _groups(copies):
            if not self._snapshots_directly(datasets):
                ancestor = common_ancestor(datasets)
                try:
                    self._trees[ancestor] = self.zfs.tree(ancestor)
                except ZfsError as exc:
                    log.warning("could not list %s before the Commit of set %s (the Commit will): %s",
                                ancestor, set_id, exc)

    def snapshot(self, copies: list[ShadowCopyRef]) -> Callable[[], None] | None:
        groups = _groups(copies)
        extras: list[tuple[uuid.UUID, list[str]]] = []
        try:
            for set_id, datasets in groups:
                extras.append((set_id, self._snapshot_atomically(set_id, datasets)))
        except ZfsError as exc:
            for set_id, datasets in groups:
                self._discard_snapshots(set_id, datasets)
            raise BackendError(f"taking the snapshots failed: {exc}", out_of_space=exc.out_of_space,
                               missing=exc.missing) from exc
        extras = [(set_id, names) for set_id, names in extras if names]
        return functools.partial(self._destroy_extras_after_answer, extras) if extras else None

    def _snapshots_directly(self, datasets: list[str]) -> bool:
        """Whether one call can name every dataset, or (zfs-fuse) must recurse from their ancestor."""
        return len(datasets) == 1 or self.zfs.takes_several_snapshots()

    def _snapshot_atomically(self, set_id: uuid.UUID, datasets: list[str]) -> list[str]:
        """Snapshot the datasets in one call; returns the extra snapshots left for after the answer."""
        suffix = f"@{NAME_PREFIX}{set_id}"
        if self._snapshots_directly(datasets):
            self.zfs.snapshot([dataset + suffix for dataset in datasets], {SET_TAG: str(set_id)})
            return []
        ancestor = common_ancestor(datasets)
        self.zfs.snapshot([ancestor + suffix], {SET_TAG: str(set_id)}, recursive=True)
        # As Prepare listed it; a filesystem made below the ancestor since then got a snapshot too,
        # tagged with the set: reconciliation removes it (no copy of the set is of that filesystem).
        tree = self._trees.pop(ancestor, None) or self.zfs.tree(ancestor)
        extras = [dataset + suffix for dataset in tree if dataset not in datasets]
        of_our_clones = [name for name in extras if _OUR_CLONE.match(name.partition("@")[0])]
        self._destroy_extras([(set_id, of_our_clones)])
        return [name for name in extras if name not in of_our_clones]

    def _destroy_extras(self, extras: list[tuple[uuid.UUID, list[str]]]) -> None:
        """Destroy the extra snapshots of `snapshot -r` (per set) that carry the set's tag."""
        for set_id, names in extras:
            for name, tags in self.zfs.get([SET_TAG], names).items():
                if tags.get(SET_TAG) == str(set_id):
                    self._destroy(name)

    def _destroy_extras_after_answer(self, extras: list[tuple[uuid.UUID, list[str]]]) -> None:
        with failing_as("destroying the extra snapshots of `zfs snapshot -r`"):
            self._destroy_extras(extras)

    def _discard_snapshots(self, set_id: uuid.UUID, datasets: list[str]) -> None:
        """Destroy what a failed call may have created; what stays is tagged, so `owned` finds it."""
        try:
            scope = datasets if self._snapshots_directly(datasets) else self.zfs.tree(common_ancestor(datasets))
            candidates = [f"{dataset}@{NAME_PREFIX}{set_id}" for dataset in scope]
            for name, tags in self.zfs.get([SET_TAG], candidates).items():
                if tags.get(SET_TAG) == str(set_id):
                    self._destroy(name)
        except ZfsError as exc:
            log.error("could not discard the snapshots of failed set %s (they are tagged): %s", set_id, exc)

    # -- exposure ----------------------------------------------------------------------------

    def expose(self, copy: ShadowCopyRef, writable: bool) -> str:
        """A clone of the snapshot, made straight away (one command per share of an Expose) when the
        snapshot is the set's own: the name carries the set's GUID, and the Commit that took it would
        have failed had the name been taken, so its tags need no second look (removal still checks
        them).  Only if the clone exists or the snapshot does not, or for a restore's snapshot,
        which is not ours, is the storage looked at first."""
        if copy.source is None:
            with failing_as(f"exposing {snapshot_name(copy)}"):
                try:
                    return self._clone(copy, writable)
                except ZfsError as exc:
                    if not (exc.exists or exc.missing):
                        raise
        return self._expose_after_looking(copy, writable)

    def _clone(self, copy: ShadowCopyRef, writable: bool) -> str:
        mountpoint = os.path.join(self.mount_root, str(copy.copy_id))
        make_mount_root(self.mount_root)
        try:
            self.zfs.clone(snapshot_name(copy), clone_name(copy),
                           {"readonly": "off" if writable else "on", "mountpoint": mountpoint,
                            SET_TAG: str(copy.set_id), COPY_TAG: str(copy.copy_id)})
        except ZfsError as exc:
            if not exc.exists:
                self._destroy_if_ours([clone_name(copy)], copy.set_id, copy.copy_id)  # made, then failed to mount
            raise
        return mountpoint

    def _expose_after_looking(self, copy: ShadowCopyRef, writable: bool) -> str:
        snapshot, clone = snapshot_name(copy), clone_name(copy)
        with failing_as(f"exposing {snapshot}"):
            found = self.zfs.get([SET_TAG, COPY_TAG, "origin", "mountpoint", "mounted"], [snapshot, clone])
            if clone in found:
                _require_ours(clone, found[clone], copy.set_id, copy.copy_id)
                if found[clone].get("mounted") != "yes":
                    self.zfs.mount(clone)
                return found[clone]["mountpoint"]
            if snapshot not in found or snapshot.partition("@")[0] != copy.store.name:
                raise BackendError(f"snapshot {snapshot} of {copy.store.name} does not exist", missing=True)
            if copy.source is None:
                _require_ours(snapshot, found[snapshot], copy.set_id, copy.copy_id)
            return self._clone(copy, writable)

    def make_read_only(self, copy: ShadowCopyRef) -> None:
        with failing_as(f"making {clone_name(copy)} read-only"):
            self.zfs.set(clone_name(copy), "readonly", "on")

    def usage(self, copy: ShadowCopyRef) -> dict[str, int]:
        """`used` of the copy's snapshot and clone (zfs-fuse has no `written`); a restore's snapshot is not ours."""
        names = {"clone": clone_name(copy)} if copy.source else {"snapshot": snapshot_name(copy),
                                                                 "clone": clone_name(copy)}
        with failing_as(f"reading the space used by copy {copy.copy_id}"):
            found = self.zfs.get(["used"], names.values(), exact=True)
        return {kind: int(found[name]["used"]) for kind, name in names.items() if name in found}

    def pool_space(self, store: FileStore) -> dict[str, int]:
        with failing_as(f"reading the space of pool {store.group}"):
            found = self.zfs.get(["used", "available"], [store.group], exact=True).get(store.group, {})
        return {key: int(value) for key, value in found.items()}

    # -- removal -----------------------------------------------------------------------------

    def remove_exposure(self, copy: ShadowCopyRef) -> None:
        self._remove(copy, [clone_name(copy)])

    def remove(self, copy: ShadowCopyRef) -> None:
        self._remove(copy, [clone_name(copy)] if copy.source else [clone_name(copy), snapshot_name(copy)])

    def _remove(self, copy: ShadowCopyRef, names: list[str]) -> None:
        with failing_as(f"removing shadow copy {copy.copy_id}"):
            self._destroy_if_ours(names, copy.set_id, copy.copy_id)
        remove_empty_directory(os.path.join(self.mount_root, str(copy.copy_id)))

    def owned(self) -> list[OwnedObject]:
        """Every tagged snapshot (with its dataset as store) and clone, clones first (a snapshot
        cannot go before its clones)."""
        with failing_as("listing fsrvpd's snapshots and clones"):
            tagged = self.zfs.get([SET_TAG, COPY_TAG], only_local=True)
        objects = []
        for name, tags in tagged.items():
            try:
                set_id = uuid.UUID(tags[SET_TAG])
                copy_id = uuid.UUID(tags[COPY_TAG]) if COPY_TAG in tags else None
            except (KeyError, ValueError):
                log.warning("%s carries malformed fsrvpd tags %s; leaving it alone", name, tags)
                continue
            dataset, at, _ = name.partition("@")
            objects.append(OwnedObject(SNAPSHOT if at else "clone", name, set_id, copy_id,
                                       group=dataset.split("/")[0], store=dataset if at else None))
        return sorted(objects, key=lambda obj: (obj.kind == SNAPSHOT, obj.name))

    def remove_owned(self, obj: OwnedObject) -> None:
        with failing_as(f"removing {obj.kind} {obj.name}"):
            self._destroy_if_ours([obj.name], obj.set_id, obj.copy_id)

    def _destroy_if_ours(self, names: list[str], set_id: uuid.UUID, copy_id: uuid.UUID | None) -> None:
        """Destroy those of `names` that exist, in order, after checking that every one of them is ours."""
        found = self.zfs.get([SET_TAG, COPY_TAG, "origin", "mountpoint"], names)
        for name in found:
            _require_ours(name, found[name], set_id, copy_id)
        for name in (name for name in names if name in found):
            self._destroy(name)
            if "@" not in name:
                remove_empty_directory(found[name]["mountpoint"])

    def _destroy(self, name: str) -> None:
        """`zfs destroy` that waits out a dataset busy for a moment; a missing one is fine."""
        try:
            retry_while_busy(lambda: self.zfs.destroy(name), lambda exc: isinstance(exc, ZfsError) and exc.busy)
        except ZfsError as exc:
            if not exc.missing:
                raise


def _require_ours(name: str, props: dict[str, str], set_id: uuid.UUID, copy_id: uuid.UUID | None) -> None:
    """Raise BackendError unless `name` carries our tags for this set and copy (and a clone is a clone).

    The set tag decides; a copy tag, where there is one (every clone, snapshots of earlier
    versions), must match as well.
    """
    tagged_copy = props.get(COPY_TAG)
    ours = (props.get(SET_TAG) == str(set_id)
            and (tagged_copy is None or tagged_copy == str(copy_id))
            and ("@" in name or "origin" in props))
    if not ours:
        raise BackendError(f"{name} exists but does not carry fsrvpd's tags for set {set_id}"
                           f"{f' and copy {copy_id}' if copy_id else ''}; leaving it alone")


def _mounts_below(path: str, mounts: list[Mount]) -> list[str]:
    """What a snapshot of the dataset at `path` would miss: the file systems mounted below it (a
    dataset below it that is not mounted is not part of the share either). Our own clones and
    OpenZFS's automounted .zfs/snapshot entries are not part of the share."""
    return sorted({f"{m.source} at {m.mountpoint}" for m in mounts
                   if is_below(m.mountpoint, path) and m.mountpoint != path
                   and not (m.fstype in ZFS_MOUNT_TYPES and _OUR_CLONE.match(m.source))
                   and not is_below(m.mountpoint, os.path.join(path, ".zfs"))})


def _is_zfs_mount_of(mount: Mount | None, dataset: str) -> bool:
    return mount is not None and mount.fstype in ZFS_MOUNT_TYPES and mount.source == dataset

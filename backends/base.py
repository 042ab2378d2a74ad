"""The interface every storage backend implements, and the errors it may raise.

A backend knows how to find the file store (ZFS dataset, LVM volume, btrfs subvolume) behind a
share path, snapshot several stores at once, expose a snapshot as a directory tree (read-only, or
writable for auto-recovery), make an exposure read-only, and remove exactly what it created.
Backend methods block (they run storage commands); the daemon calls them from a worker thread.
Names of created objects derive from the set and copy GUIDs, so a durable record of the GUIDs is
enough for a restarted daemon to find them again.
"""

from __future__ import annotations

import abc
import dataclasses
import uuid
from typing import Callable


class NotSupported(Exception):
    """The path cannot be shadow-copied by this backend; the message says why, in plain words."""


class BackendError(Exception):
    """A storage operation failed; `out_of_space` (a full pool/VG) and `missing` (an object that
    should be there is gone) tell the failures the daemon answers differently apart from the rest."""

    def __init__(self, message: str, out_of_space: bool = False, missing: bool = False):
        super().__init__(message)
        self.out_of_space = out_of_space
        self.missing = missing


@dataclasses.dataclass(frozen=True)
class FileStore:
    """The storage object behind one share.

    `group` names what can be snapshotted in one atomic call (the ZFS pool, the LVM thin pool);
    `name` is unique per backend (dataset name, VG/LV) and is what "one copy per file store" counts.
    """

    backend: str
    name: str
    group: str
    mountpoint: str


@dataclasses.dataclass(frozen=True)
class ShadowCopyRef:
    """One shadow copy as the backend needs to know it."""

    set_id: uuid.UUID
    copy_id: uuid.UUID
    store: FileStore
    # An existing snapshot of `store` to expose instead of the copy's own (an admin's restore):
    # the backend exposes it but never removes it, it is not fsrvpd's.
    source: str | None = None

    @classmethod
    def of(cls, set_id: uuid.UUID, copy_id: uuid.UUID, store: dict, source: str | None = None) -> ShadowCopyRef:
        """From the durable state, which keeps the store as a plain dictionary."""
        return cls(set_id=set_id, copy_id=copy_id, store=FileStore(**store), source=source)


SNAPSHOT = "snapshot"
MOUNT = "mount"  # OwnedObject kind of a snapshot mounted under the mount root: its exposure


@dataclasses.dataclass(frozen=True)
class OwnedObject:
    """Something on storage that carries fsrvpd's ownership tags (found by reconciliation).

    Kind "snapshot" is a copy's snapshot; every other kind ("clone", "mount", ...) is part of its
    exposure, which exists only while the copy is exposed (or retained with its exposure).
    An object may name its FileStore instead of its copy (`copy_id` None, `store` set): a set
    holds one copy per store, so reconciliation finds the copy by set and store.
    """

    kind: str  # SNAPSHOT, "clone", "mount", ...
    name: str
    set_id: uuid.UUID
    copy_id: uuid.UUID | None
    group: str | None = None  # the FileStore.group (pool, VG) it lives in; None: unknown
    store: str | None = None  # the FileStore.name it is of; None: unknown


class Backend(abc.ABC):
    """One kind of storage. Every method is idempotent where the docstring says so."""

    name: str
    # True: an exposure holds data its snapshot lacks (a ZFS clone takes the writers' recovery), so
    # a lost writable exposure is a lost copy.  False: it only shows the snapshot (a mount of it),
    # so a missing one is simply made again.
    exposure_holds_data = True

    @abc.abstractmethod
    def file_store(self, path: str, configured: str | None = None) -> FileStore:
        """Return the store whose root is mounted exactly at `path` (or the configured store name).

        Raises NotSupported when the path is not a store root or has other stores/mounts below it.
        Creates nothing.
        """

    def prepare(self, copies: list[ShadowCopyRef]) -> None:
        """Look up, before the Commit, what `snapshot` of these copies needs from storage, so that
        the Commit -- which the client's writers wait for, frozen -- only acts.  A hint: it never
        raises, and `snapshot` works without it.  Storage that needs nothing looked up skips it."""

    @abc.abstractmethod
    def snapshot(self, copies: list[ShadowCopyRef]) -> Callable[[], None] | None:
        """Take read-only snapshots of every copy's store, atomically per `group`, tagged as ours.

        On failure nothing of this call is left behind (or what is left is tagged and removable by
        `remove`), and BackendError is raised.  On success, returns the storage work that may wait
        until the client has its answer (the client's writers are frozen until then), or None; what
        that work would remove carries our tags, so reconciliation removes it if it never runs.
        """

    @abc.abstractmethod
    def expose(self, copy: ShadowCopyRef, writable: bool) -> str:
        """Make the snapshot readable as a directory tree and return its path (idempotent)."""

    @abc.abstractmethod
    def make_read_only(self, copy: ShadowCopyRef) -> None:
        """Turn a writable exposure read-only at the storage level (idempotent)."""

    def failing(self, copies: list[ShadowCopyRef]) -> dict[uuid.UUID, str]:
        """Copies whose snapshot can no longer be served (an overflowed COW snapshot), with the reason.

        Storage without such a failure mode has nothing to report.
        """
        return {}

    @abc.abstractmethod
    def remove_exposure(self, copy: ShadowCopyRef) -> None:
        """Remove the copy's exposure but keep its snapshot, only if ours (idempotent)."""

    @abc.abstractmethod
    def remove(self, copy: ShadowCopyRef) -> None:
        """Remove the copy's exposure and snapshot, only if they carry our tags (idempotent)."""

    def usage(self, copy: ShadowCopyRef) -> dict[str, int]:
        """Bytes the copy pins on storage, by kind ("snapshot", "clone"), for metrics; {} if unknown."""
        return {}

    def pool_space(self, store: FileStore) -> dict[str, int]:
        """"used" and "available" bytes of the store's `group` (pool, VG), for metrics; {} if unknown."""
        return {}

    @abc.abstractmethod
    def owned(self) -> list[OwnedObject]:
        """List every object on storage that carries fsrvpd's ownership tags."""

    @abc.abstractmethod
    def remove_owned(self, obj: OwnedObject) -> None:
        """Remove one object found by `owned` (used to clean up what no set in the state owns)."""

"""Retention ("the backup is the snapshot"): keeping a completed backup's data after DeleteShareMapping.

A share may carry a policy (config `shares.<name>.retention`: `keep_last` N, `keep_days` D, or
both).  When a client deletes the mapping of a copy of such a share after a completed backup --
the set was Recovered, or Exposed read-only -- fsrvpd withdraws the `share@{GUID}` share as usual
but keeps the copy's data on storage and records it here as a RetainedCopy:

* the read-only snapshot; and for an auto-recovery copy also its exposure (made read-only at
  RecoveryComplete), because that is where the writers' recovery went: the snapshot alone would
  be the un-recovered image, not the backup the client made;
* both keep fsrvpd's set/copy tags, and the durable state lists them, so reconciliation keeps
  them and nothing else.

A retained copy stays while it is one of its share's `keep_last` newest or younger than
`keep_days` (either rule keeps it, like restic's --keep-last / --keep-within); the rest is pruned
after each retention, at start-up and at every reconciliation.  Copies of a share that no longer
has a policy are kept until an admin removes them: a vanished config line must not delete what
an admin asked to keep.  `FsrvpService.retained_copies` and `remove_retained` are the admin API.

Windows Previous Versions (policy `previous_versions`): a retained copy then also keeps its
read-only exposure, and `<mount_root>/previous-versions/<share>/@GMT-YYYY.MM.DD-HH.MM.SS` (the
commit time, UTC) is a symlink to it.  smbd's vfs_shadow_copy2, pointed at that directory
(`shadow:snapdir`), lists those names as the share's previous versions and serves their files.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Callable, Iterable

from .state import ShadowCopy, ShadowCopySet, Status

SECONDS_PER_DAY = 86400.0
GMT_FORMAT = "@GMT-%Y.%m.%d-%H.%M.%S"  # vfs_shadow_copy2's default shadow:format
PREVIOUS_VERSIONS_DIR = "previous-versions"  # below the mount root: <share>/<@GMT-...> -> exposure


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_days: float | None = None
    previous_versions: bool = False  # retained copies stay exposed and are listed for Previous Versions

    def keeps(self, rank: int, age_seconds: float) -> bool:
        """Whether the copy `rank` places from the newest (0 = newest) and `age_seconds` old stays."""
        return ((self.keep_last is not None and rank < self.keep_last)
                or (self.keep_days is not None and age_seconds < self.keep_days * SECONDS_PER_DAY))


@dataclasses.dataclass(frozen=True)
class RetainedCopy:
    """A copy kept by retention: enough to find its objects on storage again and to list it."""

    copy_id: uuid.UUID
    set_id: uuid.UUID
    share: str
    store: dict  # backends.base.FileStore fields
    context: int
    created_at: float  # the commit, i.e. the moment the data is from
    retained_at: float  # the DeleteShareMapping that retained it
    keeps_exposure: bool  # auto-recovery: the recovered exposure is kept with the snapshot
    exposed_path: str | None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "copy_id": str(self.copy_id), "set_id": str(self.set_id)}

    @classmethod
    def from_dict(cls, body: dict) -> RetainedCopy:
        return cls(**{**body, "copy_id": uuid.UUID(body["copy_id"]), "set_id": uuid.UUID(body["set_id"])})


def retained_copy(scs: ShadowCopySet, copy: ShadowCopy, policy: RetentionPolicy, now: float) -> RetainedCopy | None:
    """The record that keeps `copy` if its backup completed; None for a set still in creation or
    recovery, and for an admin's restore (its snapshot is not fsrvpd's to keep)."""
    if copy.source or not (scs.status is Status.RECOVERED or (scs.status is Status.EXPOSED and not scs.auto_recovery)):
        return None
    keeps_exposure = scs.auto_recovery or (policy.previous_versions and copy.exposed_path is not None)
    return RetainedCopy(copy_id=copy.copy_id, set_id=scs.set_id, share=copy.share, store=copy.store,
                        context=scs.context, created_at=copy.created_at, retained_at=now,
                        keeps_exposure=keeps_exposure, exposed_path=copy.exposed_path)


def to_prune(retained: Iterable[RetainedCopy], policy_of: Callable[[str], RetentionPolicy | None],
             now: float) -> list[RetainedCopy]:
    """The retained copies their share's policy no longer keeps (shares without a policy keep all)."""
    by_share: dict[str, list[RetainedCopy]] = {}
    for copy in retained:
        by_share.setdefault(copy.share.casefold(), []).append(copy)
    doomed = []
    for copies in by_share.values():
        policy = policy_of(copies[0].share)
        if policy is None:
            continue
        newest_first = sorted(copies, key=lambda c: c.created_at, reverse=True)
        doomed += [copy for rank, copy in enumerate(newest_first) if not policy.keeps(rank, now - copy.created_at)]
    return doomed


def previous_versions(retained: Iterable[RetainedCopy],
                      policy_of: Callable[[str], RetentionPolicy | None]) -> dict[str, dict[str, str]]:
    """Per share whose policy asks for it: `@GMT-...` name -> the retained copy's exposure.  Two
    copies from the same second share a name; the later one (by copy id) shows."""
    views: dict[str, dict[str, str]] = {}
    for copy in sorted(retained, key=lambda c: (c.created_at, str(c.copy_id))):
        policy = policy_of(copy.share)
        if policy is not None and policy.previous_versions and copy.keeps_exposure and copy.exposed_path:
            name = time.strftime(GMT_FORMAT, time.gmtime(copy.created_at))
            views.setdefault(copy.share, {})[name] = copy.exposed_path
    return views

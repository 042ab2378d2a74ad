"""Reconciliation: fsrvpd's durable state, the objects on storage and the published shares agree.

It runs under the service's lock -- at start-up, every `timers.reconcile_seconds`, soon after a
removal failed, when a storage step finds something missing, and on `fsrvpctl prune` -- so no
call is half-way through its effects: whatever is half-done was left by a crash (or an
unexpected error).  In this order:

1. Interrupted calls, read from the state: a set CreationInProgress was being committed -- the
   commit is undone (the set is Added again, as after a failed commit); a Committed set with
   share names recorded was being exposed -- the exposure is withdrawn (it stays Committed).
   The client never got an answer and can retry either.
2. Storage, per backend, both ways (objects are matched by their set and copy tags, or by their
   set tag and the store they are of: a set holds one copy per store).  Objects count as this
   daemon's if their set is one it recorded -- a live set, a copy being removed (store.py), a
   retained copy -- or if they lie in a pool of a configured share or of a set; tagged objects
   elsewhere belong to another fsrvpd instance and are left alone.
   - an object nothing in the state wants -- no set holds that copy's snapshot, the copy is not
     exposed, retention does not keep it -- is an orphan and is removed;
   - a copy whose snapshot is gone (its dataset destroyed behind our back) is lost: it is
     forgotten and its share withdrawn;
   - a copy whose exposure is gone is exposed again, unless that exposure held data its snapshot
     lacks (an auto-recovery ZFS clone held the writers' recovery): that copy is lost.  Retained
     copies kept with their exposure (Previous Versions, LVM mounts after a reboot) likewise;
   - at start-up every exposure is made ready again (e.g. mounted).
   A backend that cannot list its objects is left alone this round: nothing is forgotten because
   storage could not be read; one that no share or set uses is not asked.
3. An interrupted RecoveryComplete (a Recovered copy still writable) is finished.
4. Shares: snapshot shares (`share@{GUID}`) the state does not own are withdrawn; every exposed
   copy's share is published.
5. Retention prunes what its policies no longer keep.
Every repair is logged and reported to the service's observer (metrics).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

from .backends.base import SNAPSHOT, Backend, BackendError, OwnedObject, ShadowCopyRef
from .constants import ATTR_AUTO_RECOVERY
from .crashpoints import crash_point
from .retention import RetainedCopy
from .state import HOLDS_SNAPSHOTS, ShadowCopy, ShadowCopySet, Status, is_exposed_share_name
from .transports.base import FrontDoorError

log = logging.getLogger("fsrvpd.reconcile")


class Reconciliation:
    """The reconciling half of FsrvpService (a mixin: it works on the service's own attributes)."""

    async def reconcile(self, starting: bool = False) -> int:
        """Compare the state with storage and shares and repair every difference (see the module
        docstring); returns how many orphaned storage objects went."""
        async with self.lock:
            return await self._reconcile(starting)

    async def _reconcile(self, starting: bool = False) -> int:
        """`reconcile` for a caller that already holds the lock."""
        await self._finish_queued_work()  # what is queued is not orphaned, only not done yet
        self._undo_interrupted()
        self.removal_pending = False
        scope = await self._scope()
        removed = 0
        in_use = {backend for backend, _ in scope[1]}
        for name, backend in self.backends.items():
            if name not in in_use:  # no share or set of ours there: nothing to list (zfs may not even run)
                continue
            try:
                owned = await asyncio.to_thread(backend.owned)
            except BackendError as exc:
                log.error("cannot list the %s objects to reconcile them this time: %s", name, exc)
                continue
            removed += await self._reconcile_storage(name, backend, owned, scope, starting)
        await self._finish_recoveries()
        await self._reconcile_shares(starting)
        await self.prune_retained()
        return removed

    def _undo_interrupted(self) -> None:
        for scs in list(self.machine.sets.values()):
            if scs.status is Status.CREATION_IN_PROGRESS:
                log.warning("set %s: its commit was interrupted; undoing it (the set is Added again)", scs.set_id)
                self.machine.end_commit(scs.set_id, ok=False, now=self.clock())
            elif scs.status is Status.COMMITTED and any(copy.exposed_name for copy in scs.copies):
                log.warning("set %s: its exposure was interrupted; withdrawing it (the set stays Committed)",
                            scs.set_id)
                self.machine.end_expose(scs.set_id, ok=False, now=self.clock())
            else:
                continue
            self.observer.repaired("interrupted_call")
            self._persist(scs)

    def _recorded_copies(self) -> list[tuple[uuid.UUID, uuid.UUID, dict]]:
        """(set, copy, store) of every copy this daemon recorded: in a set, retained, being removed."""
        return ([(scs.set_id, copy.copy_id, copy.store) for scs in self.machine.sets.values() for copy in scs.copies]
                + [(copy.set_id, copy.copy_id, copy.store) for copy in self.retained.values()]
                + [(uuid.UUID(body["set_id"]), copy_id, body["store"]) for copy_id, body in self.removing.items()])

    async def _scope(self) -> tuple[set[uuid.UUID], set[tuple[str, str]]]:
        """The sets this daemon recorded, and the (backend, pool) pairs it works in."""
        records = self._recorded_copies()
        pools = {(store.backend, store.group) for _, store in await self._configured_stores()}
        pools |= {(store["backend"], store["group"]) for _, _, store in records}
        sets = set(self.machine.sets) | {set_id for set_id, _, _ in records}
        return sets, pools

    def _with_copies(self, backend: str, objects: list[OwnedObject]) -> list[OwnedObject]:
        """`objects` with the copy filled in where an object names only its store (see OwnedObject):
        the recorded copy of that set and store; none recorded, it stays None (an orphan)."""
        copy_of = {(set_id, store["name"]): copy_id for set_id, copy_id, store in self._recorded_copies()
                   if store["backend"] == backend}
        return [dataclasses.replace(obj, copy_id=copy_of.get((obj.set_id, obj.store)))
                if obj.copy_id is None and obj.store is not None else obj for obj in objects]

    async def _reconcile_storage(self, name: str, backend: Backend, owned: list[OwnedObject],
                                 scope: tuple[set[uuid.UUID], set[tuple[str, str]]], starting: bool) -> int:
        sets, pools = scope
        ours = [obj for obj in owned if obj.set_id in sets or (name, obj.group) in pools]
        if starting and len(ours) < len(owned):
            foreign = next(obj for obj in owned if obj not in ours)
            log.info("left alone %d %s object(s) of other fsrvpd instances (tagged with sets this one never "
                     "recorded, outside its pools), e.g. %s", len(owned) - len(ours), name, foreign.name)
        ours = self._with_copies(name, ours)
        snapshots = {(obj.set_id, obj.copy_id) for obj in ours if obj.kind == SNAPSHOT}
        exposures = {(obj.set_id, obj.copy_id) for obj in ours if obj.kind != SNAPSHOT}
        live = [(scs, copy) for scs in list(self.machine.sets.values()) if scs.status in HOLDS_SNAPSHOTS
                for copy in scs.copies if copy.store["backend"] == name]
        kept = [copy for copy in self.retained.values() if copy.store["backend"] == name]
        wanted_snapshots = ({(scs.set_id, copy.copy_id) for scs, copy in live if not copy.source}
                            | {(r.set_id, r.copy_id) for r in kept})
        wanted_exposures = ({(scs.set_id, copy.copy_id) for scs, copy in live if copy.exposed_path}
                            | {(r.set_id, r.copy_id) for r in kept if r.keeps_exposure})
        left, orphans, failed = set(), 0, 0  # left: the (set, copy) of every object still there
        for obj in ours:
            key = (obj.set_id, obj.copy_id)
            if key not in (wanted_snapshots if obj.kind == SNAPSHOT else wanted_exposures):
                orphans += 1
                if await self._remove_orphan(backend, obj):
                    continue
                failed += 1
            left.add(key)
        self.observer.swept(name, orphans, failed)
        self._removed([copy_id for copy_id, body in list(self.removing.items()) if body["store"]["backend"] == name
                       and (uuid.UUID(body["set_id"]), copy_id) not in left])
        for scs, copy in live:
            key = (scs.set_id, copy.copy_id)
            if key not in snapshots and not copy.source:
                await self._lose(scs, copy, "its snapshot is gone from storage")
            elif copy.exposed_path and key not in exposures:
                if not (backend.exposure_holds_data and scs.auto_recovery):
                    log.warning("set %s: the exposure of copy %s (%s) is gone from storage; exposing its snapshot "
                                "again", scs.set_id, copy.copy_id, copy.share)
                    self.observer.repaired("exposure_remade")
                    await self._expose_again(backend, scs, copy)
                else:
                    await self._lose(scs, copy, "its writable exposure, which held the writers' recovery, is gone")
            elif copy.exposed_path and starting:
                await self._expose_again(backend, scs, copy)
        for retained in kept:
            key = (retained.set_id, retained.copy_id)
            if key in snapshots and retained.keeps_exposure and key not in exposures \
                    and not (backend.exposure_holds_data and retained.context & ATTR_AUTO_RECOVERY):
                await self._expose_retained_again(backend, retained)
            elif key not in snapshots or (retained.keeps_exposure and key not in exposures):
                log.error("retained copy %s of %s (set %s) is gone from storage; forgetting it", retained.copy_id,
                          retained.share, retained.set_id)
                self.observer.repaired("copy_lost")
                await self._unretain([retained])
        return orphans - failed

    async def _remove_orphan(self, backend: Backend, obj: OwnedObject) -> bool:
        log.warning("removing orphaned %s %s (set %s%s): nothing in fsrvpd's state owns it", obj.kind, obj.name,
                    obj.set_id, f", copy {obj.copy_id}" if obj.copy_id else "")
        crash_point("reconcile.repair")
        try:
            await asyncio.to_thread(backend.remove_owned, obj)
        except BackendError as exc:
            log.error("cannot remove orphaned %s %s yet: %s", obj.kind, obj.name, exc)
            self.removal_pending = True
            return False
        return True

    async def _lose(self, scs: ShadowCopySet, copy: ShadowCopy, why: str) -> None:
        """Forget a copy whose storage is gone; the set goes with its last copy."""
        log.error("set %s: copy %s of share %s is lost, %s; forgetting it", scs.set_id, copy.copy_id, copy.share, why)
        self.observer.repaired("copy_lost")
        self.machine.forget_copy(scs.set_id, copy.copy_id)
        self._persist_set(scs, removed=[(scs, copy)])
        await self._destroy(scs, [copy])

    async def _expose_again(self, backend: Backend, scs: ShadowCopySet, copy: ShadowCopy) -> None:
        """Expose an exposed copy again (idempotent: makes a missing clone, mounts an unmounted one)."""
        ref = ShadowCopyRef.of(scs.set_id, copy.copy_id, copy.store, copy.source)
        try:
            path = await asyncio.to_thread(backend.expose, ref, not copy.read_only)
        except BackendError as exc:
            if exc.missing:  # an admin's restore whose snapshot went
                await self._lose(scs, copy, f"what it shows is gone from storage ({exc})")
            else:
                log.error("set %s: cannot expose copy %s again yet: %s", scs.set_id, copy.copy_id, exc)
            return
        if path != copy.exposed_path:
            copy.exposed_path = path
            self._persist(scs)

    async def _expose_retained_again(self, backend: Backend, retained: RetainedCopy) -> None:
        """Mount a retained copy's read-only view again (e.g. after a reboot), for Previous Versions."""
        log.warning("retained copy %s of %s (set %s): its exposure is gone; exposing its snapshot again",
                    retained.copy_id, retained.share, retained.set_id)
        self.observer.repaired("exposure_remade")
        ref = ShadowCopyRef.of(retained.set_id, retained.copy_id, retained.store)
        try:
            path = await asyncio.to_thread(backend.expose, ref, False)
        except BackendError as exc:
            log.error("retained copy %s: cannot expose it again yet: %s", retained.copy_id, exc)
            return
        if path != retained.exposed_path:
            self.retained[retained.copy_id] = moved = dataclasses.replace(retained, exposed_path=path)
            self._persist(retained=[moved])

    async def _finish_recoveries(self) -> None:
        for scs in list(self.machine.sets.values()):
            if scs.status is Status.RECOVERED and any(c.exposed_path and not c.read_only for c in scs.copies):
                log.warning("set %s: its RecoveryComplete was interrupted; making its copies read-only", scs.set_id)
                self.observer.repaired("interrupted_call")
                await self.make_read_only(scs)

    async def _reconcile_shares(self, starting: bool) -> None:
        exposed = {copy.exposed_name.casefold(): copy for scs in self.machine.sets.values()
                   for copy in scs.copies if copy.exposed_path}
        published = {name.casefold(): name for name in self.front_door.share_names()}
        for key, name in published.items():
            if is_exposed_share_name(name) and key not in exposed:
                log.warning("withdrawing share %s: no shadow copy in fsrvpd's state owns it", name)
                self.observer.repaired("share_withdrawn")
                await self._unpublish(name)
        unpublished = [copy for key, copy in exposed.items() if key not in published]
        for copy in unpublished:
            if not starting:
                log.warning("share %s was not published; publishing it again", copy.exposed_name)
                self.observer.repaired("share_published")
            try:
                await self._publish(copy)
            except FrontDoorError as exc:
                log.error("cannot publish %s yet: %s", copy.exposed_name, exc)
        if starting and unpublished:
            log.info("%d shadow copy share(s) published", len(unpublished))

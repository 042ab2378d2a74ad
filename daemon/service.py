"""The FSRVP service: decoded requests in, responses out, storage and shares changed in between.

It ties the pure state machine (state.py) to the durable store, the storage backends and the
front door.  Every state-changing call goes: check and change the machine, write the changed
sets to the store (intent), act on storage and shares, write the outcome, answer.  A crash
between any two steps leaves a record that `start` finishes or undoes.  Storage commands block,
so they run in worker threads; one lock serialises state changes so calls from several clients
never interleave half-way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Callable

from . import messages as m
from .authz import Authorizer, changes_state
from .backends.base import Backend, BackendError, FileStore, NotSupported, ShadowCopyRef
from .config import Config, ShareConfig
from .constants import FSRVP_MAX_VERSION, FSRVP_MIN_VERSION, HResult
from .logs import HRESULT as HRESULT_FIELD, set_fields
from .observer import Observer
from .state import Refused, ShadowCopy, ShadowCopyMachine, ShadowCopySet, Status, is_exposed_share_name
from .store import StateStore
from .transports.base import Caller, FrontDoor, FrontDoorError, ShareSpec
from .unc import BadUnc, parse_unc

log = logging.getLogger("fsrvpd.service")

RETRY_REMOVAL_SECONDS = 5.0  # storage that was busy when it should have gone is tried again this soon
GLOBALS_KEY = "globals"


def copy_ref(scs: ShadowCopySet, copy: ShadowCopy) -> ShadowCopyRef:
    return ShadowCopyRef(set_id=scs.set_id, copy_id=copy.copy_id, store=FileStore(**copy.store), source=copy.source)


def _who(caller: Caller) -> str:
    """The RPC-authenticated principal if there is one, else the SMB session's user, and the address."""
    principal = caller.rpc_principal
    user, domain = (principal.user, principal.domain) if principal else (caller.user, caller.domain)
    return f"{domain}\\{user}@{caller.address}"


class FsrvpService:
    """Answers the 13 FSRVP operations; see the module docstring for the order of effects."""

    def __init__(self, config: Config, store: StateStore, backends: dict[str, Backend], front_door: FrontDoor,
                 clock: Callable[[], float] = time.time, extra_host_names: frozenset[str] = frozenset(),
                 observer: Observer | None = None, authorizer: Authorizer | None = None,
                 share_lookup: Callable[[str], ShareConfig | None] | None = None):
        """`share_lookup` finds a base share by name (default: the configuration's shares; Samba's in
        samba mode, where smbd serves them)."""
        self.authorizer = authorizer or Authorizer([*config.users, *config.allowed])
        self._share_lookup = share_lookup
        self.store = store
        self.backends = backends
        self.front_door = front_door
        self.clock = clock
        self.extra_host_names = frozenset(name.casefold() for name in extra_host_names)
        self.observer = observer or Observer()
        self.machine = ShadowCopyMachine(config.sequence_timeout, config.sequence_timeout_long)
        self.reconfigure(config)
        self.lock = asyncio.Lock()
        self.removal_pending = False  # some storage could not be removed yet: sweep soon
        self.handlers = {
            m.GetSupportedVersionRequest: self.get_supported_version,
            m.SetContextRequest: self.set_context,
            m.StartShadowCopySetRequest: self.start_shadow_copy_set,
            m.AddToShadowCopySetRequest: self.add_to_shadow_copy_set,
            m.PrepareShadowCopySetRequest: self.prepare_shadow_copy_set,
            m.CommitShadowCopySetRequest: self.commit_shadow_copy_set,
            m.ExposeShadowCopySetRequest: self.expose_shadow_copy_set,
            m.RecoveryCompleteShadowCopySetRequest: self.recovery_complete_shadow_copy_set,
            m.AbortShadowCopySetRequest: self.abort_shadow_copy_set,
            m.IsPathSupportedRequest: self.is_path_supported,
            m.IsPathShadowCopiedRequest: self.is_path_shadow_copied,
            m.GetShareMappingRequest: self.get_share_mapping,
            m.DeleteShareMappingRequest: self.delete_share_mapping,
        }

    # -- life cycle ---------------------------------------------------------------------------
    def reconfigure(self, config: Config) -> None:
        """Take a (re)loaded configuration: shares, host names and timer values apply to the next call."""
        self.config = config
        self.host_names = config.own_host_names() | self.extra_host_names
        self.machine.set_timeouts(config.sequence_timeout, config.sequence_timeout_long)
        self.machine.max_shares_per_set = config.limits.max_shares_per_set

    async def start(self) -> None:
        """Reload the durable state, undo what a crash interrupted, republish exposures, sweep."""
        self.machine.restore(self.store.load_sets(), self.store.load_setting(GLOBALS_KEY))
        async with self.lock:
            for scs in list(self.machine.sets.values()):
                if scs.status is Status.COMMITTED and any(c.exposed_name for c in scs.copies):
                    log.warning("set %s was being exposed when fsrvpd stopped; withdrawing its exposures",
                                scs.set_id)
                    await self._withdraw(scs)
                    self.machine.end_expose(scs.set_id, ok=False, now=self.clock())
                    self._persist(scs)
                if scs.status is Status.CREATION_IN_PROGRESS:
                    log.warning("set %s was being committed when fsrvpd stopped; undoing the commit", scs.set_id)
                    await self._remove_storage(scs, scs.copies)
                    self.machine.end_commit(scs.set_id, ok=False, now=self.clock())
                    self._persist(scs)
            for scs in self.machine.sets.values():
                for copy in scs.copies:
                    if copy.exposed_path:
                        try:
                            await self._publish(copy)
                        except FrontDoorError as exc:
                            log.error("cannot republish %s: %s", copy.exposed_name, exc)
        log.info("state reloaded: %d shadow copy set(s)", len(self.machine.sets))
        await self._remove_orphaned_shares()
        await self.expire()
        await self.sweep()

    async def run_timers(self) -> None:
        """Fire the Message Sequence Timer when due, and sweep orphans now and then."""
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.config.sequence_timeout / 4))
            await self.expire()
            since_sweep = time.monotonic() - last_sweep
            if since_sweep >= self.config.sweep_interval or (self.removal_pending and since_sweep >= RETRY_REMOVAL_SECONDS):
                last_sweep = time.monotonic()
                await self.sweep()

    async def expire(self) -> list[ShadowCopySet]:
        async with self.lock:
            expired = self.machine.expire(self.clock())
            if not expired:
                return []
            for scs in expired:
                log.warning("sequence timer expired: removing set %s (%s) of %s and its snapshots", scs.set_id,
                            scs.status.value, scs.client_address, extra=set_fields(scs))
            self._persist(deleted=expired)
            for scs in expired:
                await self._destroy(scs, scs.copies)
            self.observer.timer_expired(len(expired))
            return expired

    async def _remove_orphaned_shares(self) -> None:
        """Withdraw snapshot shares the front door still has but no set in the state exposes."""
        async with self.lock:
            live = {c.exposed_name for s in self.machine.sets.values() for c in s.copies if c.exposed_name}
            for name in self.front_door.share_names():
                if is_exposed_share_name(name) and name not in live:
                    log.warning("removing orphaned snapshot share %s", name)
                    await self._unpublish(name)

    async def sweep(self) -> int:
        """Remove shares and storage objects carrying our tags that no set in the state owns any more;
        count the storage objects.

        Only in the pools of the configured shares and of the sets: another fsrvpd on the host (a
        test's, say) keeps its own objects elsewhere, and they are not ours to judge.
        """
        await self._remove_orphaned_shares()
        await self._withdraw_failing()
        removed = 0
        scope = {(store.backend, store.group) for _, store in await self._configured_stores()}
        async with self.lock:
            self.removal_pending = False
            scope |= {(c.store["backend"], c.store["group"]) for s in self.machine.sets.values() for c in s.copies}
            for backend in self.backends.values():
                try:
                    owned = await asyncio.to_thread(backend.owned)
                except BackendError as exc:
                    log.error("cannot list %s objects to sweep: %s", backend.name, exc)
                    continue
                orphans = left = 0
                for obj in owned:
                    if obj.group is not None and (backend.name, obj.group) not in scope:
                        continue
                    scs = self.machine.sets.get(obj.set_id)
                    if scs is not None and (obj.copy_id is None or scs.copy(obj.copy_id) is not None):
                        continue
                    orphans += 1
                    log.warning("removing orphaned %s %s (set %s)", obj.kind, obj.name, obj.set_id)
                    try:
                        await asyncio.to_thread(backend.remove_owned, obj)
                    except BackendError as exc:
                        left += 1
                        log.error("cannot remove orphaned %s %s yet: %s", obj.kind, obj.name, exc)
                        self.removal_pending = True
                self.observer.swept(backend.name, orphans, left)
                removed += orphans - left
        return removed

    async def _withdraw_failing(self) -> None:
        """Unpublish exposed copies whose snapshot cannot be served any more (an overflowed COW
        snapshot): clients get a clean "no such share" instead of read errors. The copy stays in the
        state until the client deletes it."""
        async with self.lock:
            published = self.front_door.share_names()
            exposed: dict[str, list[tuple[ShadowCopySet, ShadowCopy]]] = {}
            for scs in self.machine.sets.values():
                for copy in scs.copies:
                    if copy.exposed_name in published:
                        exposed.setdefault(copy.store["backend"], []).append((scs, copy))
            for backend_name, pairs in exposed.items():
                try:
                    broken = await asyncio.to_thread(self.backends[backend_name].failing,
                                                     [copy_ref(scs, copy) for scs, copy in pairs])
                except BackendError as exc:
                    log.error("cannot check the exposed %s snapshots: %s", backend_name, exc)
                    continue
                for scs, copy in pairs:
                    if copy.copy_id in broken:
                        log.error("set %s: withdrawing share %s: %s", scs.set_id, copy.exposed_name,
                                  broken[copy.copy_id], extra=set_fields(scs))
                        self.observer.snapshot_failed(copy.store["backend"])
                        await self._unpublish(copy.exposed_name)

    # -- dispatch -----------------------------------------------------------------------------
    async def handle(self, request, caller: Caller):
        """Answer one decoded request; refusals become HRESULTs, never exceptions."""
        handler = self.handlers[type(request)]
        if changes_state(request) and not self.authorizer.allows(caller):
            log.warning("%s from %s refused: E_ACCESSDENIED (not in Administrators, Backup Operators or the "
                        "configured allow list)", type(request).__name__.removesuffix("Request"), _who(caller))
            return m.failure_response(request, int(HResult.E_ACCESSDENIED))
        try:
            return await handler(request, caller)
        except Refused as refused:
            log.info("%s from %s refused: %s", type(request).__name__.removesuffix("Request"), _who(caller), refused,
                     extra={HRESULT_FIELD: f"{int(refused.result):#010x}"})
            return m.failure_response(request, int(refused.result))

    def _persist(self, *changed: ShadowCopySet, deleted: list[ShadowCopySet] = ()) -> None:
        """Write the changed sets and the server-wide context in one transaction."""
        self.store.save([scs.to_dict() for scs in changed], [str(scs.set_id) for scs in deleted],
                        {GLOBALS_KEY: self.machine.globals_record()})

    def _share(self, unc: str) -> ShareConfig:
        try:
            parsed = parse_unc(unc, self.host_names)
        except BadUnc as exc:
            raise Refused(HResult.E_INVALIDARG, str(exc)) from None
        share = (self._share_lookup or self.config.share)(parsed.share)
        if share is None:
            raise Refused(HResult.FSRVP_E_OBJECT_NOT_FOUND, f"no share {parsed.share!r} is configured")
        return share

    async def _configured_stores(self) -> list[tuple[ShareConfig, FileStore]]:
        """The file store of every configured share that has one (those that cannot be shadow-copied left out)."""
        found = []
        for share in self.config.shares.values():
            try:
                found.append((share, await self._file_store(share)))
            except Refused:
                continue
        return found

    async def _file_store(self, share: ShareConfig) -> FileStore:
        backend = self.backends[share.backend]
        try:
            return await asyncio.to_thread(backend.file_store, share.path, share.store)
        except NotSupported as exc:
            raise Refused(HResult.FSRVP_E_NOT_SUPPORTED, f"share {share.name}: {exc}") from None
        except BackendError as exc:
            raise Refused(HResult.E_UNEXPECTED, f"share {share.name}: {exc}") from None

    # -- operations ---------------------------------------------------------------------------
    async def get_supported_version(self, request, caller):
        return m.GetSupportedVersionResponse(result=0, min_version=FSRVP_MIN_VERSION, max_version=FSRVP_MAX_VERSION)

    async def set_context(self, request, caller):
        async with self.lock:
            try:
                discarded = self.machine.set_context(request.context, caller.address, self.clock())
            except Refused as refused:
                await self._discard(refused.discarded, caller)
                raise
            await self._discard(discarded, caller)
        log.info("context %#x set by %s", request.context, _who(caller))
        return m.failure_response(request, 0)

    async def _discard(self, discarded: list[ShadowCopySet], caller: Caller) -> None:
        """A client starting over drops its unfinished sets (the state is persisted either way)."""
        for scs in discarded:
            log.warning("set %s (%s) dropped: %s started over", scs.set_id, scs.status.value, _who(caller))
        self._persist(deleted=discarded)
        for scs in discarded:
            await self._destroy(scs, scs.copies)

    async def start_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.start_set(request.client_set_id, caller.address, _who(caller), self.clock())
            self._persist(scs)
        log.info("set %s started by %s, context %#x", scs.set_id, _who(caller), scs.context)
        return m.StartShadowCopySetResponse(result=0, set_id=scs.set_id)

    async def add_to_shadow_copy_set(self, request, caller):
        share = self._share(request.share_name)
        store = await self._file_store(share)
        async with self.lock:
            copy = self.machine.add(request.set_id, request.client_copy_id, share.name, request.share_name,
                                    dataclasses.asdict(store), self.clock())
            self._persist(self.machine.sets[request.set_id])
        log.info("set %s: %s added share %s (%s %s) as copy %s", request.set_id, _who(caller), share.name,
                 store.backend, store.name, copy.copy_id)
        return m.AddToShadowCopySetResponse(result=0, copy_id=copy.copy_id)

    async def prepare_shadow_copy_set(self, request, caller):
        async with self.lock:
            self._persist(self.machine.prepare(request.set_id, self.clock()))
        return m.failure_response(request, 0)

    async def commit_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.begin_commit(request.set_id, self.clock())
            self._persist(scs)  # intent: snapshots named after this set are about to exist
            result = await self._snapshot(scs, request.timeout_ms)
            self.machine.end_commit(scs.set_id, ok=result == HResult.S_OK, now=self.clock())
            self._persist(scs)
        if result == HResult.S_OK:
            log.info("set %s committed by %s: %s", scs.set_id, _who(caller), ", ".join(c.share for c in scs.copies))
        return m.failure_response(request, int(result))

    async def _snapshot(self, scs: ShadowCopySet, timeout_ms: int) -> HResult:
        """Snapshot every copy, one backend call per backend; undo all of it on failure or timeout."""
        refs_by_backend: dict[str, list[ShadowCopyRef]] = {}
        for copy in scs.copies:
            refs_by_backend.setdefault(copy.store["backend"], []).append(copy_ref(scs, copy))
        started = time.monotonic()
        try:
            for backend_name, refs in refs_by_backend.items():
                await asyncio.to_thread(self.backends[backend_name].snapshot, refs)
        except BackendError as exc:
            log.error("commit of set %s failed: %s", scs.set_id, exc)
            await self._remove_storage(scs, scs.copies)
            return HResult.E_OUTOFMEMORY if exc.out_of_space else HResult.FSRVP_E_WAIT_FAILED
        elapsed_ms = (time.monotonic() - started) * 1000
        if _over(elapsed_ms, timeout_ms):
            log.error("commit of set %s took %.0f ms, over the client's %d ms; undoing it", scs.set_id, elapsed_ms,
                      timeout_ms)
            await self._remove_storage(scs, scs.copies)
            return HResult.FSSAGENT_E_TIMEOUT
        log.info("set %s: %d snapshot(s) in %.0f ms", scs.set_id, len(scs.copies), elapsed_ms)
        return HResult.S_OK

    async def expose_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.begin_expose(request.set_id, self.clock())
            started = time.monotonic()
            result = HResult.S_OK
            try:
                for copy in scs.copies:
                    self.machine.expose_copy(scs.set_id, copy.copy_id)
                    self._persist(scs)  # intent: the clone and share of this copy are about to exist
                    backend = self.backends[copy.store["backend"]]
                    copy.exposed_path = await asyncio.to_thread(backend.expose, copy_ref(scs, copy),
                                                                not copy.read_only)
                    self._persist(scs)
                    await self._publish(copy)
            except (BackendError, FrontDoorError) as exc:
                log.error("expose of set %s failed: %s", scs.set_id, exc)
                result = HResult.FSRVP_E_WAIT_FAILED
            elapsed_ms = (time.monotonic() - started) * 1000
            if result == HResult.S_OK and _over(elapsed_ms, request.timeout_ms):
                log.error("expose of set %s took %.0f ms, over the client's %d ms; withdrawing it", scs.set_id,
                          elapsed_ms, request.timeout_ms)
                result = HResult.FSRVP_E_WAIT_TIMEOUT
            if result != HResult.S_OK:
                await self._withdraw(scs)
            self.machine.end_expose(scs.set_id, ok=result == HResult.S_OK, now=self.clock())
            self._persist(scs)
        if result == HResult.S_OK:
            log.info("set %s exposed by %s as %s", scs.set_id, _who(caller),
                     ", ".join(f"{c.exposed_name} ({'read-only' if c.read_only else 'writable'})" for c in scs.copies))
        return m.failure_response(request, int(result))

    async def recovery_complete_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.recovery_complete(request.set_id, self.clock())
            self._persist(scs)
            if scs.auto_recovery:
                for copy in scs.copies:
                    try:
                        await self._publish(copy)  # the share refuses writes first, then the storage too
                    except FrontDoorError as exc:
                        log.error("share %s stays writable at the share level (the storage is made read-only "
                                  "all the same): %s", copy.exposed_name, exc)
                    await asyncio.to_thread(self.backends[copy.store["backend"]].make_read_only, copy_ref(scs, copy))
        log.info("set %s recovered (read-only from now on), said %s", scs.set_id, _who(caller))
        return m.failure_response(request, 0)

    async def abort_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.abort(request.set_id, self.clock())
            self._persist(deleted=[scs])
            await self._destroy(scs, scs.copies)
        log.info("set %s (%s) aborted by %s", scs.set_id, scs.status.value, _who(caller))
        return m.failure_response(request, 0)

    async def is_path_supported(self, request, caller):
        share = self._share(request.share_name)
        await self._file_store(share)
        return m.IsPathSupportedResponse(result=0, supported=True, owner_machine_name=self.config.netbios_name)

    async def is_path_shadow_copied(self, request, caller):
        share = self._share(request.share_name)
        store = await self._file_store(share)
        present = self.machine.shadow_copied(store.backend, store.name)
        return m.IsPathShadowCopiedResponse(result=0, present=present, compatibility=0)

    async def get_share_mapping(self, request, caller):
        share = self._share(request.share_name)
        async with self.lock:
            scs, copy = self.machine.share_mapping(request.set_id, request.copy_id, share.name, request.level,
                                                   self.clock())
            self._persist(scs)
        host = parse_unc(copy.unc, self.host_names).host
        mapping = m.ShareMapping1(
            set_id=scs.set_id, copy_id=copy.copy_id, share_name_unc=copy.unc,
            shadow_copy_share_name=f"\\\\{host}\\{copy.exposed_name}",
            creation_timestamp=m.filetime_from_unix(copy.created_at))
        return m.GetShareMappingResponse(result=0, level=request.level, mapping=mapping)

    async def delete_share_mapping(self, request, caller):
        share = self._share(request.share_name)
        async with self.lock:
            scs, copy = self.machine.delete_mapping(request.set_id, request.copy_id, share.name, self.clock())
            if scs.set_id in self.machine.sets:
                self._persist(scs)
            else:
                self._persist(deleted=[scs])
            await self._destroy(scs, [copy])
        log.info("set %s: copy %s of %s deleted by %s", scs.set_id, copy.copy_id, share.name, _who(caller))
        return m.failure_response(request, 0)

    # -- administration (fsrvpctl) -------------------------------------------------------------
    async def delete_set(self, set_id: uuid.UUID) -> ShadowCopySet:
        """An admin removes a set with its shares and storage, whatever its status (Refused if unknown)."""
        async with self.lock:
            scs = self.machine.discard(set_id)
            self._persist(deleted=[scs])
            await self._destroy(scs, scs.copies)
        log.warning("set %s (%s) deleted by the administrator", scs.set_id, scs.status.value, extra=set_fields(scs))
        return scs

    async def expose_snapshot(self, snapshot: str) -> ShadowCopySet:
        """Publish an existing snapshot of a configured share read-only, e.g. for a restore.

        It becomes a Recovered set of one copy whose share is `share@{GUID}`; deleting the set
        removes the clone and the share, never the snapshot.  Refused(OBJECT_NOT_FOUND) names the
        shares when no configured share's file store has that snapshot's name.
        """
        store_name = snapshot.partition("@")[0]
        stores = await self._configured_stores()
        match = next(((share, store) for share, store in stores if store.name == store_name and "@" in snapshot),
                     None)
        if match is None:
            raise Refused(HResult.FSRVP_E_OBJECT_NOT_FOUND,
                          f"{snapshot!r} is not a snapshot of a configured share's file store ("
                          + ", ".join(f"{share.name}: {store.name}" for share, store in stores) + ")")
        share, store = match
        async with self.lock:
            scs = self.machine.restore_set(share.name, f"\\\\{self.config.netbios_name}\\{share.name}\\",
                                           dataclasses.asdict(store), snapshot, self.clock())
            self._persist(scs)  # intent: the clone and the share are about to exist
            copy = scs.copies[0]
            try:
                copy.exposed_path = await asyncio.to_thread(self.backends[store.backend].expose,
                                                            copy_ref(scs, copy), False)
            except BackendError as exc:
                self.machine.discard(scs.set_id)
                self._persist(deleted=[scs])
                await self._remove_storage(scs, scs.copies)
                raise Refused(HResult.FSRVP_E_WAIT_FAILED, str(exc)) from None
            self._persist(scs)
            await self._publish(copy)
        log.info("snapshot %s exposed read-only as share %s by the administrator", snapshot, copy.exposed_name,
                 extra=set_fields(scs))
        return scs

    async def prune(self) -> dict[str, int]:
        """Now rather than on the timers' schedule: drop expired sets and remove orphaned storage."""
        return {"expired_sets": len(await self.expire()), "orphans_removed": await self.sweep()}

    # -- effects ------------------------------------------------------------------------------
    async def _publish(self, copy: ShadowCopy) -> None:
        await self.front_door.publish_share(ShareSpec(name=copy.exposed_name, path=copy.exposed_path,
                                                      read_only=copy.read_only,
                                                      comment=f"shadow copy of {copy.share}", base=copy.share))

    async def _withdraw(self, scs: ShadowCopySet) -> None:
        """Undo a half-made exposure: shares first, then the clones (snapshots stay)."""
        for copy in scs.copies:
            if copy.exposed_name:
                await self._unpublish(copy.exposed_name)
        await self._remove_storage(scs, scs.copies, exposures_only=True)

    async def _destroy(self, scs: ShadowCopySet, copies: list[ShadowCopy]) -> None:
        """Withdraw shares and remove storage of copies the state no longer holds."""
        for copy in copies:
            if copy.exposed_name:
                await self._unpublish(copy.exposed_name)
        await self._remove_storage(scs, copies)

    async def _unpublish(self, name: str) -> None:
        """A share that cannot be withdrawn now is an orphan: the sweep withdraws it later."""
        try:
            await self.front_door.unpublish_share(name)
        except FrontDoorError as exc:
            log.error("could not withdraw share %s yet (the sweep retries): %s", name, exc)

    async def _remove_storage(self, scs: ShadowCopySet, copies: list[ShadowCopy],
                              exposures_only: bool = False) -> None:
        """Storage that cannot go now (busy) carries our tags: the sweep removes it later."""
        for copy in copies:
            backend = self.backends[copy.store["backend"]]
            remove = backend.remove_exposure if exposures_only else backend.remove
            try:
                await asyncio.to_thread(remove, copy_ref(scs, copy))
            except BackendError as exc:
                log.error("could not remove storage of copy %s yet (the sweep retries): %s", copy.copy_id, exc)
                self.removal_pending = True


def _over(elapsed_ms: float, timeout_ms: int) -> bool:
    """TimeOutInMilliseconds; 0 (which no Windows client sends) means no limit."""
    return bool(timeout_ms) and elapsed_ms > timeout_ms

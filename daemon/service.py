"""The FSRVP service: decoded requests in, responses out, storage and shares changed in between.

It ties the pure state machine (state.py) to the durable store, the storage backends and the
front door.  Every state-changing call goes: check and change the machine, write the changed
sets to the store (intent), act on storage and shares, write the outcome, answer.  A crash
between any two steps (crashpoints.py names each such point) leaves a record that reconciliation
(reconcile.py, at start-up and every `timers.reconcile_seconds`) finishes or undoes.  Storage
commands block, so they run in worker threads; one lock serialises state changes so calls from
several clients never interleave half-way.  Commit and Expose answer by the client's
TimeOutInMilliseconds even while a storage command hangs; the command, bounded by the
per-command timeout, then finishes and is undone in the background, still holding the lock.
The removal of a deleted copy's storage, which nobody waits for, is queued and done after the
answer, once the client's calls pause (`_do_after_answer`).

What it does besides answering calls -- timer expiries, TTL reaping, repairs, retention
pruning -- it reports to the `observer` (metrics.py counts it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import time
import uuid
from typing import Awaitable, Callable, Iterable, Sequence

from . import messages as m
from .authz import Authorizer
from .backends.base import Backend, BackendError, FileStore, NotSupported, ShadowCopyRef
from .backends.host import sync_symlink_tree
from .config import Config, ShareConfig
from .constants import FSRVP_MAX_VERSION, FSRVP_MIN_VERSION, HResult
from .crashpoints import crash_point
from .logs import HRESULT as HRESULT_FIELD, set_fields
from .observer import Observer
from .reconcile import Reconciliation
from .retention import PREVIOUS_VERSIONS_DIR, RetainedCopy, RetentionPolicy, previous_versions, retained_copy, to_prune
from .state import Refused, ShadowCopy, ShadowCopyMachine, ShadowCopySet
from .store import REMOVING, RETAINED, SETS, StateStore
from .transports.base import Caller, FrontDoor, FrontDoorError, ShareSpec
from .unc import BadUnc, parse_unc

log = logging.getLogger("fsrvpd.service")
audit = logging.getLogger("fsrvpd.audit")

RETRY_REMOVAL_SECONDS = 5.0  # storage that was busy when it should have gone is tried again this soon
MAX_DEFER_SECONDS = 5.0  # a removal queued after an answer waits no longer for the calls to pause
GLOBALS_KEY = "globals"


def copy_ref(scs: ShadowCopySet, copy: ShadowCopy) -> ShadowCopyRef:
    return ShadowCopyRef.of(scs.set_id, copy.copy_id, copy.store, copy.source)


def _refs_by_backend(scs: ShadowCopySet) -> dict[str, list[ShadowCopyRef]]:
    refs: dict[str, list[ShadowCopyRef]] = {}
    for copy in scs.copies:
        refs.setdefault(copy.store["backend"], []).append(copy_ref(scs, copy))
    return refs


def _audit(caller: Caller, request, decision, result: int) -> None:
    """One line per call: who (SMB session and RPC principal), from where, what, on which share,
    whether authorization let it through and why, and the HRESULT it got."""
    principal = caller.rpc_principal or "-"
    share = getattr(request, "share_name", "-") or "-"
    level = logging.INFO if decision.allowed else logging.WARNING
    audit.log(level, "%s by %s (rpc %s) from %s share=%s authz=%s (%s) result=%#010x",
              type(request).__name__.removesuffix("Request"), f"{caller.domain}\\{caller.user}", principal,
              caller.address, share, "allowed" if decision.allowed else "denied", decision.why, result,
              extra={HRESULT_FIELD: f"{result:#010x}"})


def _who(caller: Caller) -> str:
    """The RPC-authenticated principal if there is one, else the SMB session's user, and the address."""
    principal = caller.rpc_principal
    user, domain = (principal.user, principal.domain) if principal else (caller.user, caller.domain)
    return f"{domain}\\{user}@{caller.address}"


class FsrvpService(Reconciliation):
    """Answers the 13 FSRVP operations; see the module docstring for the order of effects."""

    def __init__(self, config: Config, store: StateStore, backends: dict[str, Backend], front_door: FrontDoor,
                 clock: Callable[[], float] = time.time, extra_host_names: frozenset[str] = frozenset(),
                 observer: Observer | None = None, authorizer: Authorizer | None = None,
                 share_lookup: Callable[[str], ShareConfig | None] | None = None):
        """`share_lookup` finds a base share by name (default: the configuration's shares; Samba's in
        samba mode, where smbd serves them)."""
        self.authorizer = authorizer or Authorizer([*config.users, *config.allowed], config.allowed_clients,
                                                   config.open_queries)
        self._share_lookup = share_lookup
        self.store = store
        self.backends = backends
        self.front_door = front_door
        self.clock = clock
        self.extra_host_names = frozenset(name.casefold() for name in extra_host_names)
        self.observer = observer or Observer()
        self.machine = ShadowCopyMachine(config.sequence_timeout, config.sequence_timeout_long)
        self.reconfigure(config)
        self.retained: dict[uuid.UUID, RetainedCopy] = {}
        self.removing: dict[uuid.UUID, dict] = {}  # copy id -> its removal record (see _persist)
        self.lock = asyncio.Lock()
        self.removal_pending = False  # some storage could not be removed yet: reconcile soon
        self._jobs: set[asyncio.Task] = set()  # Commit/Expose storage work (a late one runs on, holding the lock)
        self._after_answer: collections.deque[tuple[float, Callable[[], Awaitable[None]]]] = collections.deque()
        self._after_answer_queued = asyncio.Event()
        self._after_answer_worker: asyncio.Task | None = None
        self._last_call = time.monotonic()
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
        """Take a (re)loaded configuration: shares, host names, timer values and retention policies
        apply to the next call."""
        self.config = config
        self.host_names = config.own_host_names() | self.extra_host_names
        self.machine.set_timeouts(config.sequence_timeout, config.sequence_timeout_long)
        self.machine.max_shares_per_set = config.limits.max_shares_per_set

    async def start(self) -> None:
        """Reload the durable state, fire overdue timers, then reconcile (see reconcile.py)."""
        self.machine.restore(self.store.load(SETS), self.store.load_setting(GLOBALS_KEY))
        self.retained = {r.copy_id: r for r in map(RetainedCopy.from_dict, self.store.load(RETAINED))}
        self.removing = {uuid.UUID(body["copy_id"]): body for body in self.store.load(REMOVING)}
        log.info("state reloaded: %d shadow copy set(s), %d retained cop%s", len(self.machine.sets),
                 len(self.retained), "y" if len(self.retained) == 1 else "ies")
        await self.tick()
        await self.reconcile(starting=True)
        self._after_answer_worker = asyncio.create_task(self._work_after_answers())

    async def stop(self) -> None:
        """Stop the queue of work after answers, finishing what it holds first: an admin who stops
        fsrvpd right after a backup expects its snapshots gone.  Each piece is bounded by the
        per-command timeout; one that fails is recorded or tagged, and the next start finishes it."""
        if self._after_answer_worker is not None:
            async with self.lock:
                self._after_answer_worker.cancel()
                await asyncio.gather(self._after_answer_worker, return_exceptions=True)
                if self._after_answer:
                    log.info("finishing %d storage clean-up(s) before stopping", len(self._after_answer))
                await self._finish_queued_work()

    async def run_timers(self) -> None:
        """Fire the Message Sequence Timer and the exposure TTL when due; reconcile now and then, and
        soon after a removal failed (a clone smbd kept busy for a moment, say)."""
        last_reconcile = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.config.sequence_timeout / 4))
            await self.tick()
            since = time.monotonic() - last_reconcile
            if since >= self.config.reconcile_interval or (self.removal_pending and since >= RETRY_REMOVAL_SECONDS):
                last_reconcile = time.monotonic()
                await self._withdraw_failing()
                await self.reconcile()

    async def tick(self) -> list[ShadowCopySet]:
        """Delete the sets the sequence timer or the exposure TTL doomed, with their snapshots and
        shares; returns them."""
        async with self.lock:
            now = self.clock()
            expired = self.machine.expire(now)
            reaped = self.machine.reap(now, self.config.exposure_ttl)
            if not expired and not reaped:
                return []
            for scs in expired:
                log.warning("sequence timer expired: removing set %s (%s) of %s and its snapshots", scs.set_id,
                            scs.status.value, scs.client_address, extra=set_fields(scs))
            for scs in reaped:
                log.warning("exposure TTL: removing set %s (%s, context %#x) of %s, exposed %.0f s ago and never "
                            "deleted by its client", scs.set_id, scs.status.value, scs.context, scs.client_address,
                            now - (scs.exposed_at or scs.started_at), extra=set_fields(scs))
            self._persist(deleted=expired + reaped)
            crash_point("expire.intent" if expired else "reap.intent")
            for scs in expired + reaped:
                await self._destroy(scs, scs.copies)
            if expired:
                self.observer.timer_expired(len(expired))
            if reaped:
                self.observer.sets_reaped(len(reaped))
            return expired + reaped

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
        self._last_call = time.monotonic()
        decision = self.authorizer.decide(caller, request)
        if not decision.allowed:
            response = m.failure_response(request, int(HResult.E_ACCESSDENIED))
        else:
            try:
                response = await handler(request, caller)
            except Refused as refused:
                log.info("%s from %s refused: %s", type(request).__name__.removesuffix("Request"), _who(caller),
                         refused, extra={HRESULT_FIELD: f"{int(refused.result):#010x}"})
                response = m.failure_response(request, int(refused.result))
        _audit(caller, request, decision, response.result)
        return response

    def _persist(self, *changed: ShadowCopySet, deleted: Sequence[ShadowCopySet] = (),
                 removed: Sequence[tuple[ShadowCopySet, ShadowCopy]] = (), retained: Sequence[RetainedCopy] = (),
                 unretained: Sequence[RetainedCopy] = (), synced: bool = True) -> None:
        """Write changed and deleted sets, retained copies and the server-wide context in one transaction;
        `synced=False` where no storage action depends on the write (store.py).

        Every copy that leaves the state -- those of deleted sets, `removed` ones, `unretained`
        ones -- is recorded as being removed until its storage is confirmed gone (`_removed`), so
        reconciliation knows what it may delete.
        """
        leaving = ([_removal(scs.set_id, copy) for scs in deleted for copy in scs.copies]
                   + [_removal(scs.set_id, copy) for scs, copy in removed]
                   + [_removal(copy.set_id, copy) for copy in unretained])
        self.store.save({SETS: [scs.to_dict() for scs in changed], RETAINED: [r.to_dict() for r in retained],
                         REMOVING: leaving},
                        {SETS: [str(scs.set_id) for scs in deleted], RETAINED: [str(r.copy_id) for r in unretained]},
                        {GLOBALS_KEY: self.machine.globals_record()}, synced=synced)
        self.removing.update((uuid.UUID(body["copy_id"]), body) for body in leaving)

    def _removed(self, copy_ids: Iterable[uuid.UUID]) -> None:
        """The storage of these copies is confirmed gone: forget that they were being removed."""
        done = [copy_id for copy_id in copy_ids if self.removing.pop(copy_id, None) is not None]
        if done:
            self.store.save(delete={REMOVING: [str(copy_id) for copy_id in done]})

    def _persist_set(self, scs: ShadowCopySet, **retention) -> None:
        """Write a set that may have lost its last copy (then it is deleted)."""
        if scs.set_id in self.machine.sets:
            self._persist(scs, **retention)
        else:
            self._persist(deleted=[scs], **retention)

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
        crash_point("set_context.persisted")
        for scs in discarded:
            await self._destroy(scs, scs.copies)

    async def start_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.start_set(request.client_set_id, caller.address, _who(caller), self.clock())
            self._persist(scs, synced=False)
            crash_point("start.persisted")
        log.info("set %s started by %s, context %#x", scs.set_id, _who(caller), scs.context)
        return m.StartShadowCopySetResponse(result=0, set_id=scs.set_id)

    async def add_to_shadow_copy_set(self, request, caller):
        share = self._share(request.share_name)
        store = await self._file_store(share)
        async with self.lock:
            copy = self.machine.add(request.set_id, request.client_copy_id, share.name, request.share_name,
                                    dataclasses.asdict(store), self.clock())
            self._persist(self.machine.sets[request.set_id], synced=False)
            crash_point("add.persisted")
        log.info("set %s: %s added share %s (%s %s) as copy %s", request.set_id, _who(caller), share.name,
                 store.backend, store.name, copy.copy_id)
        return m.AddToShadowCopySetResponse(result=0, copy_id=copy.copy_id)

    async def prepare_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.prepare(request.set_id, self.clock())
            self._persist(scs, synced=False)
            crash_point("prepare.persisted")
            for backend_name, refs in _refs_by_backend(scs).items():
                await asyncio.to_thread(self.backends[backend_name].prepare, refs)
        return m.failure_response(request, 0)

    async def _bounded(self, begin: Callable[[], ShadowCopySet],
                       work: Callable[[ShadowCopySet, _Deadline], Awaitable[HResult]],
                       timeout_ms: int) -> tuple[ShadowCopySet, HResult | None]:
        """Under the state lock: `begin` (checks, intent), then storage `work` within TimeOutInMilliseconds.

        Returns the set and the work's result, or None if the time ran out first.  Then the call is
        answered at once, while the work goes on holding the lock -- no other call may touch the
        state while a storage command runs -- until its command returns (each is bounded by the
        per-command timeout) and it has undone what it did.
        """
        await self.lock.acquire()
        try:
            scs = begin()
        except BaseException:
            self.lock.release()
            raise
        deadline = _Deadline(timeout_ms)

        async def holding_the_lock() -> HResult:
            try:
                return await work(scs, deadline)
            finally:
                deadline.in_time()  # an unexpected error answers the call at once, too
                self.lock.release()

        job = asyncio.create_task(holding_the_lock())
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        if await deadline.answered_in_time():
            return scs, await job
        job.add_done_callback(_log_failure)
        return scs, None

    async def commit_shadow_copy_set(self, request, caller):
        def begin() -> ShadowCopySet:
            scs = self.machine.begin_commit(request.set_id, self.clock())
            self._persist(scs)  # intent: snapshots named after this set are about to exist
            crash_point("commit.intent")
            return scs

        scs, result = await self._bounded(begin, self._commit, request.timeout_ms)
        if result is None:
            log.error("commit of set %s still running after the client's %d ms: answered FSSAGENT_E_TIMEOUT; "
                      "the snapshots are removed once the storage command returns", scs.set_id, request.timeout_ms)
            result = HResult.FSSAGENT_E_TIMEOUT
        elif result == HResult.S_OK:
            log.info("set %s committed by %s: %s", scs.set_id, _who(caller), ", ".join(c.share for c in scs.copies))
        return m.failure_response(request, int(result))

    async def _commit(self, scs: ShadowCopySet, deadline: _Deadline) -> HResult:
        result = await self._snapshot(scs)
        crash_point("commit.snapshotted")
        if not deadline.in_time():
            if result == HResult.S_OK:
                log.error("set %s: snapshots taken after the client's deadline; removing them", scs.set_id)
                await self._remove_storage(scs, scs.copies)
            result = HResult.FSSAGENT_E_TIMEOUT
        self.machine.end_commit(scs.set_id, ok=result == HResult.S_OK, now=self.clock())
        self._persist(scs)
        crash_point("commit.persisted")
        return result

    async def _snapshot(self, scs: ShadowCopySet) -> HResult:
        """Snapshot every copy, one backend call per backend; undo all of it on failure.  What the
        backends leave for after the answer is queued (`_do_after_answer`)."""
        started = time.monotonic()
        left: list[Callable[[], None] | None] = []
        try:
            for backend_name, refs in _refs_by_backend(scs).items():
                left.append(await asyncio.to_thread(self.backends[backend_name].snapshot, refs))
        except BackendError as exc:
            log.error("commit of set %s failed: %s", scs.set_id, exc)
            await self._remove_storage(scs, scs.copies)
            return _failure_result(exc)
        finally:
            for work in filter(None, left):
                self._do_after_answer(functools.partial(self._finish_snapshots, work))
        log.info("set %s: %d snapshot(s) in %.0f ms", scs.set_id, len(scs.copies),
                 (time.monotonic() - started) * 1000)
        return HResult.S_OK

    async def _remove_deleted(self, scs: ShadowCopySet, copy: ShadowCopy) -> None:
        """The storage of a copy whose DeleteShareMapping is answered (its removal is recorded)."""
        crash_point("answered.cleanup")
        await self._remove_storage(scs, [copy])

    @staticmethod
    async def _finish_snapshots(work: Callable[[], None]) -> None:
        """What a backend's `snapshot` left for after the Commit's answer."""
        crash_point("answered.commit")
        await asyncio.to_thread(work)

    async def expose_shadow_copy_set(self, request, caller):
        scs, result = await self._bounded(lambda: self.machine.begin_expose(request.set_id, self.clock()),
                                          self._expose, request.timeout_ms)
        if result is None:
            log.error("expose of set %s still running after the client's %d ms: answered FSRVP_E_WAIT_TIMEOUT; "
                      "it is withdrawn once the storage command returns", scs.set_id, request.timeout_ms)
            result = HResult.FSRVP_E_WAIT_TIMEOUT
        elif result == HResult.S_OK:
            log.info("set %s exposed by %s as %s", scs.set_id, _who(caller),
                     ", ".join(f"{c.exposed_name} ({'read-only' if c.read_only else 'writable'})" for c in scs.copies))
        return m.failure_response(request, int(result))

    async def _expose(self, scs: ShadowCopySet, deadline: _Deadline) -> HResult:
        result = HResult.S_OK
        for copy in scs.copies:
            self.machine.expose_copy(scs.set_id, copy.copy_id)
        # Intent: every copy's clone and share are about to exist.  Their paths are recorded with the
        # outcome: a crash before it withdraws the whole exposure (reconcile.py), so one write serves.
        self._persist(scs)
        crash_point("expose.intent")
        try:
            for copy in scs.copies:
                if deadline.late:
                    break
                backend = self.backends[copy.store["backend"]]
                copy.exposed_path = await asyncio.to_thread(backend.expose, copy_ref(scs, copy), not copy.read_only)
                crash_point("expose.cloned")
                await self._publish(copy)
                crash_point("expose.published")
        except (BackendError, FrontDoorError) as exc:
            log.error("expose of set %s failed: %s", scs.set_id, exc)
            result = _failure_result(exc)
        if not deadline.in_time():
            result = HResult.FSRVP_E_WAIT_TIMEOUT
        if result != HResult.S_OK:
            await self._withdraw(scs)
        self.machine.end_expose(scs.set_id, ok=result == HResult.S_OK, now=self.clock())
        self._persist(scs)
        crash_point("expose.persisted")
        if result == HResult.FSRVP_E_OBJECT_NOT_FOUND:
            await self._reconcile()  # forget the copies whose snapshots vanished
        return result

    async def recovery_complete_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.recovery_complete(request.set_id, self.clock())
            self._persist(scs)  # intent: Recovered, so a crash from here on finishes the job at start-up
            crash_point("recovery.intent")
            result = await self.make_read_only(scs)
            if result != HResult.S_OK:
                await self._reconcile()
        log.info("set %s recovered (read-only from now on), said %s", scs.set_id, _who(caller))
        return m.failure_response(request, int(result))

    async def make_read_only(self, scs: ShadowCopySet) -> HResult:
        """Turn the set's writable copies read-only: the share refuses writes first, then the storage."""
        for copy in scs.copies:
            if copy.read_only or not copy.exposed_path:
                continue
            try:
                await self._publish(copy, read_only=True)
            except FrontDoorError as exc:
                log.error("share %s stays writable at the share level (the storage is made read-only all the "
                          "same): %s", copy.exposed_name, exc)
            try:
                await asyncio.to_thread(self.backends[copy.store["backend"]].make_read_only, copy_ref(scs, copy))
            except BackendError as exc:
                log.error("set %s: cannot make copy %s read-only: %s", scs.set_id, copy.copy_id, exc)
                return _failure_result(exc)
            crash_point("recovery.read_only")
            copy.read_only = True
            self._persist(scs)
        return HResult.S_OK

    async def abort_shadow_copy_set(self, request, caller):
        async with self.lock:
            scs = self.machine.abort(request.set_id, self.clock())
            self._persist(deleted=[scs])
            crash_point("abort.intent")
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
            self._persist(synced=False)  # the set is as it was; the sequence timer restarted
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
            kept = retained_copy(scs, copy, share.retention, self.clock()) if share.retention else None
            self._persist_set(scs, removed=[] if kept else [(scs, copy)], retained=[kept] if kept else [])
            crash_point("delete.intent")
            if copy.exposed_name:
                await self._unpublish(copy.exposed_name)
            crash_point("delete.unpublished")
            if kept is None:
                self._do_after_answer(functools.partial(self._remove_deleted, scs, copy))
            else:
                self.retained[kept.copy_id] = kept
                if not kept.keeps_exposure:
                    await self._remove_storage(scs, [copy], exposures_only=True)
                await self.prune_retained()
        log.info("set %s: copy %s of %s deleted by %s%s", scs.set_id, copy.copy_id, share.name, _who(caller),
                 f"; its snapshot is retained ({_describe(share.retention)})" if kept else "")
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
        """Now rather than on the timers' schedule: drop expired sets and reconcile (orphans removed)."""
        expired = await self.tick()
        return {"expired_sets": len(expired), "orphans_removed": await self.reconcile()}

    # -- retention (the admin API; see retention.py) -------------------------------------------
    def retained_copies(self) -> list[RetainedCopy]:
        """Every copy kept by retention, oldest first."""
        return sorted(self.retained.values(), key=lambda r: (r.created_at, str(r.copy_id)))

    async def remove_retained(self, copy_id: uuid.UUID) -> RetainedCopy:
        """Delete one retained copy now, storage and all (Refused if there is no such copy)."""
        async with self.lock:
            doomed = self.retained.get(copy_id)
            if doomed is None:
                raise Refused(HResult.FSRVP_E_OBJECT_NOT_FOUND, f"no retained copy {copy_id}")
            log.info("retained copy %s of %s (from %s) removed on request", copy_id, doomed.share,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doomed.created_at)))
            await self._unretain([doomed])
            self._show_previous_versions()
        return doomed

    async def prune_retained(self) -> None:
        """Delete the retained copies their share's policy no longer keeps (the caller holds the lock)."""
        doomed = to_prune(self.retained.values(), self._retention_policy, self.clock())
        for copy in doomed:
            log.info("retention: pruning copy %s of %s (set %s, from %s)", copy.copy_id, copy.share, copy.set_id,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(copy.created_at)))
        await self._unretain(doomed)
        if doomed:
            self.observer.retention_pruned(len(doomed))
        self._show_previous_versions()

    def _show_previous_versions(self) -> None:
        """The `@GMT-...` symlinks vfs_shadow_copy2 lists: one per exposed retained copy (retention.py)."""
        views = previous_versions(self.retained.values(), self._retention_policy)
        try:
            sync_symlink_tree(os.path.join(self.config.mount_root, PREVIOUS_VERSIONS_DIR), views)
        except OSError as exc:
            log.error("cannot update the Previous Versions links: %s", exc)

    async def _unretain(self, doomed: list[RetainedCopy]) -> None:
        if not doomed:
            return
        for copy in doomed:
            del self.retained[copy.copy_id]
        self._persist(unretained=doomed)
        crash_point("prune.intent")
        for copy in doomed:
            await self._remove_refs([ShadowCopyRef.of(copy.set_id, copy.copy_id, copy.store)])

    def _retention_policy(self, share: str) -> RetentionPolicy | None:
        config = self.config.share(share)
        return config.retention if config else None

    # -- storage work the caller need not wait for ----------------------------------------------
    def _do_after_answer(self, work: Callable[[], Awaitable[None]]) -> None:
        """Queue storage work for after the call is answered: a backup application waits for each
        DeleteShareMapping, but not for the `zfs destroy` of the copy (its removal is recorded),
        and its writers, frozen during the Commit, not for what `snapshot` leaves (backends/base.py)."""
        self._after_answer.append((time.monotonic(), work))
        self._after_answer_queued.set()

    async def _work_after_answers(self) -> None:
        """One queued piece at a time, each under the lock, once no call has come for
        `timers.cleanup_quiet_seconds`: a requester's calls come in bursts (a DeleteShareMapping per
        share), each of which would otherwise wait for the removal before it.  Under a steady
        stream of calls a piece waits MAX_DEFER_SECONDS at most.  A call that comes while a piece
        runs waits for that one piece."""
        while True:
            await self._after_answer_queued.wait()
            self._after_answer_queued.clear()
            while self._after_answer:
                queued_at = self._after_answer[0][0]
                quiet_in = min(self._last_call + self.config.cleanup_quiet, queued_at + MAX_DEFER_SECONDS) \
                    - time.monotonic()
                if quiet_in > 0:
                    await asyncio.sleep(quiet_in)
                    continue
                async with self.lock:
                    if self._after_answer:
                        await self._run_queued()

    async def _finish_queued_work(self) -> None:
        """Everything queued after answers, now (the caller holds the lock)."""
        while self._after_answer:
            await self._run_queued()

    async def _run_queued(self) -> None:
        _, work = self._after_answer.popleft()
        try:
            await work()
        except Exception:  # noqa: BLE001 -- the queue must go on; what is left is recorded or tagged
            log.exception("storage work after an answer failed (reconciliation retries)")
            self.removal_pending = True

    # -- effects ------------------------------------------------------------------------------
    async def _publish(self, copy: ShadowCopy, read_only: bool | None = None) -> None:
        await self.front_door.publish_share(ShareSpec(name=copy.exposed_name, path=copy.exposed_path,
                                                      read_only=copy.read_only if read_only is None else read_only,
                                                      comment=f"shadow copy of {copy.share}", base=copy.share))

    async def _withdraw(self, scs: ShadowCopySet) -> None:
        """Undo a half-made exposure: shares first (of the copies exposed on storage: only those may
        have been published), then the clones (snapshots stay)."""
        for copy in scs.copies:
            if copy.exposed_path:
                await self._unpublish(copy.exposed_name)
        await self._remove_storage(scs, scs.copies, exposures_only=True)

    async def _destroy(self, scs: ShadowCopySet, copies: list[ShadowCopy]) -> None:
        """Withdraw shares and remove storage of copies the state no longer holds."""
        for copy in copies:
            if copy.exposed_name:
                await self._unpublish(copy.exposed_name)
        await self._remove_storage(scs, copies)

    async def _unpublish(self, name: str) -> None:
        """A share that cannot be withdrawn now is an orphan: reconciliation withdraws it later."""
        try:
            await self.front_door.unpublish_share(name)
        except FrontDoorError as exc:
            log.error("could not withdraw share %s yet (reconciliation retries): %s", name, exc)

    async def _remove_storage(self, scs: ShadowCopySet, copies: list[ShadowCopy],
                              exposures_only: bool = False) -> None:
        await self._remove_refs([copy_ref(scs, copy) for copy in copies], exposures_only)

    async def _remove_refs(self, refs: list[ShadowCopyRef], exposures_only: bool = False) -> None:
        """Storage that cannot go now (busy) carries our tags: reconciliation removes it later."""
        gone = []
        for ref in refs:
            backend = self.backends[ref.store.backend]
            remove = backend.remove_exposure if exposures_only else backend.remove
            try:
                await asyncio.to_thread(remove, ref)
            except BackendError as exc:
                log.error("could not remove storage of copy %s yet (reconciliation retries): %s", ref.copy_id, exc)
                self.removal_pending = True
            else:
                gone.append(ref.copy_id)
        if not exposures_only:
            self._removed(gone)


class _Deadline:
    """A client's TimeOutInMilliseconds for storage work, decided exactly once.

    The call is answered when the work reports back or the time is up, whichever comes first; the
    work, once its storage commands have returned, asks `in_time` whether to keep what it did or
    undo it.  Neither side awaits between looking and deciding, so the two always agree.
    """

    def __init__(self, timeout_ms: int):
        self.seconds = timeout_ms / 1000 if timeout_ms else None  # 0, which no Windows client sends: no limit
        self.late = False
        self._reported = asyncio.Event()

    def in_time(self) -> bool:
        if not self.late:
            self._reported.set()
        return not self.late

    async def answered_in_time(self) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reported.wait(), self.seconds)
        self.late = not self._reported.is_set()
        return not self.late


def _removal(set_id: uuid.UUID, copy: ShadowCopy | RetainedCopy) -> dict:
    """The record of a copy being removed: enough to know its objects on storage as ours."""
    return {"copy_id": str(copy.copy_id), "set_id": str(set_id), "store": copy.store}


def _failure_result(exc: BackendError | FrontDoorError) -> HResult:
    """The HRESULT for a failed storage or share step: MS-FSRVP passes the shadow copy utility's error on."""
    if getattr(exc, "out_of_space", False):
        return HResult.E_OUTOFMEMORY  # Windows' text for it: "Not enough storage is available ..."
    if getattr(exc, "missing", False):
        return HResult.FSRVP_E_OBJECT_NOT_FOUND
    return HResult.FSRVP_E_WAIT_FAILED


def _log_failure(job: asyncio.Task) -> None:
    """Late storage work has no caller left to tell: log what went wrong."""
    if not job.cancelled() and job.exception() is not None:
        log.error("storage work finishing after its deadline failed", exc_info=job.exception())


def _describe(policy: RetentionPolicy) -> str:
    rules = ([f"last {policy.keep_last}"] if policy.keep_last else []) + \
        ([f"{policy.keep_days:g} days"] if policy.keep_days else [])
    return "keep " + " or ".join(rules)

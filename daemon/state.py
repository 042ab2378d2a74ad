"""The FSRVP shadow-copy-set state machine: pure rules, no I/O, time passed in.

The rules, after MS-FSRVP 3.1.1-3.1.5 (what we add is marked *):

* A shadow copy set moves Started -> Added -> CreationInProgress -> Committed -> Exposed ->
  Recovered.  Each operation on a set is allowed only in the statuses the table RULES lists for
  it; in any other status it answers FSRVP_E_BAD_STATE and changes nothing.
* A NULL (all-zero) GUID argument answers E_INVALIDARG.  A set GUID that is not in the table
  answers FSRVP_E_SHADOWCOPYSET_ID_MISMATCH (DeleteShareMapping: FSRVP_E_OBJECT_NOT_FOUND); a
  copy GUID or share that is not in the set answers E_INVALIDARG (GetShareMapping) or
  FSRVP_E_OBJECT_NOT_FOUND (DeleteShareMapping).
* Server-wide there is a context (ContextSet, CurrentContext, the client address that set it,
  a retry count) and one Message Sequence Timer.  SetContext while ContextSet from another
  address answers FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS; from the same address it is a retry: the
  sets not Recovered are deleted and the retry count goes up (above MAX_RETRIES the call fails
  with IN_PROGRESS, the deletion standing).  StartShadowCopySet needs ContextSet (else BAD_STATE)
  and no set that is not Recovered (else IN_PROGRESS): one set in creation at a time.
  RecoveryComplete, Abort and the timer clear ContextSet.
* The timer restarts on success with the value RULES gives (SHORT 180 s, LONG 1800 s, or STOP);
  a failed Commit/Expose restarts it SHORT.  When it fires, every set that is not Recovered is
  deleted -- with its snapshots and shares* (Samba leaves them behind) -- and ContextSet clears.
* One shadow copy per file store per set (FSRVP_E_OBJECT_ALREADY_EXISTS, timer SHORT); at most
  max_shares_per_set copies* (E_INVALIDARG; MAX_SHARES_PER_SET, 64 as in Windows, by default).
* Commit and Expose are two-phase (`begin_*`, then `end_*`) because storage work happens in
  between, outside this module.  A failed commit is undone and the set goes back to Added*.
* Persistent contexts* (NAS_ROLLBACK, APP_ROLLBACK: ATTR_PERSISTENT) keep a Recovered set until
  the client deletes it.  Non-persistent ones (BACKUP, FILE_SHARE_BACKUP) are auto-release: a set
  still exposed `ttl` seconds after its exposure (its client crashed before DeleteShareMapping)
  is reaped*.  Persistence starts at RecoveryComplete: the sequence timer deletes a set that is
  not Recovered whatever its context, as MS-FSRVP 3.1.5 says -- a rollback set never recovered
  is an unfinished creation, not a copy the client decided to keep.
* A copy whose storage vanished (its dataset destroyed behind our back) is forgotten*; a set
  left without copies goes with it.

Every method returns its result or raises Refused(hresult) having changed nothing -- except
SetContext's retry limit, whose Refused carries the sets it deleted, and a duplicate Add, whose
refusal restarts the timer SHORT (as 3.1.4.4 requires).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import uuid
from typing import Callable

from .constants import ATTR_AUTO_RECOVERY, ATTR_PERSISTENT, CONTEXT_ATTRIBUTES, Context, HResult

MAX_SHARES_PER_SET = 64
MAX_RETRIES = 5  # Windows' value for ShadowCopyClientRetryCount
NULL_GUID = uuid.UUID(int=0)


class Status(str, enum.Enum):
    STARTED = "Started"
    ADDED = "Added"
    CREATION_IN_PROGRESS = "CreationInProgress"
    COMMITTED = "Committed"
    EXPOSED = "Exposed"
    RECOVERED = "Recovered"


class Timer(enum.Enum):
    SHORT = "short"
    LONG = "long"
    STOP = "stop"
    KEEP = "keep"  # leave the timer as it is


@dataclasses.dataclass(frozen=True)
class Rule:
    allowed: frozenset[Status]
    after: Status | None  # None: status unchanged
    timer: Timer


S = Status
ALL = frozenset(Status)
# operation -> statuses it is allowed in, status after success, sequence timer after success
RULES: dict[str, Rule] = {
    "add": Rule(frozenset({S.STARTED, S.ADDED}), S.ADDED, Timer.LONG),
    "prepare": Rule(frozenset({S.ADDED}), None, Timer.LONG),
    "commit": Rule(frozenset({S.ADDED, S.CREATION_IN_PROGRESS}), S.CREATION_IN_PROGRESS, Timer.STOP),
    "expose": Rule(frozenset({S.COMMITTED}), None, Timer.STOP),
    "recovery_complete": Rule(frozenset({S.EXPOSED}), S.RECOVERED, Timer.STOP),
    # A commit in flight cannot be interrupted*; everything else can be thrown away.  Aborting an old
    # Recovered set leaves the timer and context of the set in creation alone* (3.1.4.8 stops no timer).
    "abort": Rule(ALL - {S.CREATION_IN_PROGRESS}, None, Timer.STOP),
    # The spec says Exposed only (SHOULD); Recovered copies still exist and are still mapped*.
    "get_mapping": Rule(frozenset({S.EXPOSED, S.RECOVERED}), None, Timer.LONG),
    "delete_mapping": Rule(frozenset({S.EXPOSED, S.RECOVERED}), None, Timer.KEEP),
}
IN_CREATION = ALL - {S.RECOVERED}
HOLDS_SNAPSHOTS = frozenset({S.COMMITTED, S.EXPOSED, S.RECOVERED})


class Refused(Exception):
    """The call fails with this HRESULT; nothing changed but the `discarded` sets (and the timer
    after a duplicate Add)."""

    def __init__(self, result: HResult, why: str, discarded: list[ShadowCopySet] | None = None):
        super().__init__(f"{result.name}: {why}")
        self.result = result
        self.why = why
        self.discarded = discarded or []


@dataclasses.dataclass
class ShadowCopy:
    copy_id: uuid.UUID
    client_copy_id: uuid.UUID
    share: str  # base share name as configured
    unc: str  # the share's UNC as the client sent it (GetShareMapping echoes it)
    store: dict  # backends.base.FileStore fields
    created_at: float | None = None  # unix time of the commit
    exposed_name: str | None = None  # share name `share@{GUID}` once exposure began
    exposed_path: str | None = None
    read_only: bool = True  # what the exposure is on storage (recorded after the storage change)
    source: str | None = None  # an admin's restore: the existing snapshot exposed (never removed)


@dataclasses.dataclass
class ShadowCopySet:
    set_id: uuid.UUID
    client_set_id: uuid.UUID
    context: int
    status: Status
    client_address: str
    principal: str
    started_at: float
    copies: list[ShadowCopy] = dataclasses.field(default_factory=list)
    exposed_at: float | None = None  # unix time ExposeShadowCopySet succeeded, for the exposure TTL

    @property
    def auto_recovery(self) -> bool:
        return bool(self.context & ATTR_AUTO_RECOVERY)

    @property
    def persistent(self) -> bool:
        return bool(self.context & ATTR_PERSISTENT)

    def copy(self, copy_id: uuid.UUID) -> ShadowCopy | None:
        return next((c for c in self.copies if c.copy_id == copy_id), None)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (GUIDs as strings), field by field: a set is saved at every step, and
        dataclasses.asdict deep-copies every value (for 64 copies, a quarter of the daemon's time)."""
        body = _plain(self)
        body["status"] = self.status.value
        body["copies"] = [_plain(copy) for copy in self.copies]
        return body

    @classmethod
    def from_dict(cls, body: dict) -> ShadowCopySet:
        copies = [ShadowCopy(**{**c, "copy_id": uuid.UUID(c["copy_id"]),
                                "client_copy_id": uuid.UUID(c["client_copy_id"])})
                  for c in body["copies"]]
        return cls(**{**body, "set_id": uuid.UUID(body["set_id"]), "client_set_id": uuid.UUID(body["client_set_id"]),
                      "status": Status(body["status"]), "copies": copies})


def _plain(record) -> dict:
    """A dataclass's fields one level deep, GUIDs as strings, dictionaries (a copy's store) copied."""
    body = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        body[field.name] = str(value) if isinstance(value, uuid.UUID) else dict(value) if isinstance(value, dict) \
            else value
    return body


def valid_context(context: int) -> bool:
    """One of the four contexts, with at most one of the two recovery attributes."""
    base = context & ~CONTEXT_ATTRIBUTES
    attributes = context & CONTEXT_ATTRIBUTES
    return base in set(Context) and attributes != CONTEXT_ATTRIBUTES


def exposed_share_name(share: str, copy_id: uuid.UUID) -> str:
    """`share@{GUID}`; a hidden base share (`name$`) gives a hidden snapshot share."""
    suffix = "$" if share.endswith("$") else ""
    return f"{share}@{{{copy_id}}}{suffix}"


_EXPOSED_SHARE_NAME = re.compile(r"^.+@\{[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\}\$?$")


def is_exposed_share_name(name: str) -> bool:
    """Whether `name` has the form exposed_share_name gives (base share names cannot contain '@')."""
    return _EXPOSED_SHARE_NAME.match(name) is not None


def _require_guid(value: uuid.UUID, what: str) -> None:
    if value == NULL_GUID:
        raise Refused(HResult.E_INVALIDARG, f"{what} is NULL")


class ShadowCopyMachine:
    """All shadow copy sets, the server-wide context and the sequence timer; see the module rules."""

    def __init__(self, short_timeout: float = 180.0, long_timeout: float = 1800.0,
                 new_id: Callable[[], uuid.UUID] = uuid.uuid4, max_shares_per_set: int = MAX_SHARES_PER_SET):
        self.set_timeouts(short_timeout, long_timeout)
        self.max_shares_per_set = max_shares_per_set  # a reload may change it, for the next Add
        self.new_id = new_id
        self.sets: dict[uuid.UUID, ShadowCopySet] = {}
        self.context_set = False
        self.context = int(Context.BACKUP)
        self.context_client: str | None = None
        self.retries = 0
        self.deadline: float | None = None  # the Message Sequence Timer, as unix time

    # -- helpers ------------------------------------------------------------------------------
    def set_timeouts(self, short_timeout: float, long_timeout: float) -> None:
        """The timer's two values (a reload may change them; a running timer keeps its deadline)."""
        self.timeouts = {Timer.SHORT: short_timeout, Timer.LONG: long_timeout}

    def in_creation(self) -> ShadowCopySet | None:
        return next((s for s in self.sets.values() if s.status in IN_CREATION), None)

    def _timer(self, timer: Timer, now: float) -> None:
        if timer is Timer.STOP:
            self.deadline = None
        elif timer is not Timer.KEEP:
            self.deadline = now + self.timeouts[timer]

    def _clear_context(self) -> None:
        self.context_set = False
        self.context_client = None

    def _find(self, set_id: uuid.UUID, operation: str,
              missing: HResult = HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH) -> ShadowCopySet:
        _require_guid(set_id, "ShadowCopySetId")
        scs = self.sets.get(set_id)
        if scs is None:
            raise Refused(missing, f"no shadow copy set {set_id}")
        if scs.status not in RULES[operation].allowed:
            raise Refused(HResult.FSRVP_E_BAD_STATE, f"set {set_id} is {scs.status.value}")
        return scs

    def _apply(self, scs: ShadowCopySet, operation: str, now: float) -> None:
        rule = RULES[operation]
        if rule.after is not None:
            scs.status = rule.after
        self._timer(rule.timer, now)

    def _delete_unrecovered(self) -> list[ShadowCopySet]:
        doomed = [s for s in self.sets.values() if s.status in IN_CREATION]
        for scs in doomed:
            del self.sets[scs.set_id]
        return doomed

    # -- operations ---------------------------------------------------------------------------
    def set_context(self, context: int, client: str, now: float) -> list[ShadowCopySet]:
        """Returns the sets a retry deleted, for their storage to be removed."""
        if not valid_context(context):
            raise Refused(HResult.FSRVP_E_UNSUPPORTED_CONTEXT, f"context {context:#x}")
        discarded: list[ShadowCopySet] = []
        if self.context_set:
            if client != self.context_client:
                raise Refused(HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS,
                              f"{self.context_client} is creating a shadow copy set")
            discarded = self._delete_unrecovered()
            self._clear_context()
            self.retries += 1
            if self.retries > MAX_RETRIES:
                raise Refused(HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS,
                              f"{client} retried {self.retries} times", discarded)
        else:
            self.retries = 0
        self.context, self.context_client, self.context_set = context, client, True
        self._timer(Timer.SHORT, now)
        return discarded

    def start_set(self, client_set_id: uuid.UUID, client: str, principal: str, now: float) -> ShadowCopySet:
        _require_guid(client_set_id, "ClientShadowCopySetId")
        if not self.context_set:
            raise Refused(HResult.FSRVP_E_BAD_STATE, "SetContext must come first")
        busy = self.in_creation()
        if busy is not None:
            raise Refused(HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS,
                          f"set {busy.set_id} of {busy.client_address} is {busy.status.value}")
        scs = ShadowCopySet(set_id=self.new_id(), client_set_id=client_set_id, context=self.context,
                            status=S.STARTED, client_address=client, principal=principal, started_at=now)
        self.sets[scs.set_id] = scs
        self._timer(Timer.SHORT, now)
        return scs

    def add(self, set_id: uuid.UUID, client_copy_id: uuid.UUID, share: str, unc: str, store: dict,
            now: float) -> ShadowCopy:
        _require_guid(client_copy_id, "ClientShadowCopyId")
        scs = self._find(set_id, "add")
        if any(c.store["name"] == store["name"] and c.store["backend"] == store["backend"] for c in scs.copies):
            self._timer(Timer.SHORT, now)
            raise Refused(HResult.FSRVP_E_OBJECT_ALREADY_EXISTS, f"{store['name']} already has a copy in this set")
        if len(scs.copies) >= self.max_shares_per_set:
            raise Refused(HResult.E_INVALIDARG, f"a set holds at most {self.max_shares_per_set} shares "
                                                f"(limits.max_shares_per_set)")
        copy = ShadowCopy(copy_id=self.new_id(), client_copy_id=client_copy_id, share=share, unc=unc, store=store)
        scs.copies.append(copy)
        self._apply(scs, "add", now)
        return copy

    def prepare(self, set_id: uuid.UUID, now: float) -> ShadowCopySet:
        scs = self._find(set_id, "prepare")
        self._apply(scs, "prepare", now)
        return scs

    def begin_commit(self, set_id: uuid.UUID, now: float) -> ShadowCopySet:
        scs = self._find(set_id, "commit")
        self._apply(scs, "commit", now)
        return scs

    def end_commit(self, set_id: uuid.UUID, ok: bool, now: float) -> ShadowCopySet:
        scs = self.sets[set_id]
        scs.status = S.COMMITTED if ok else S.ADDED
        for copy in scs.copies:
            copy.created_at = now if ok else None
        self._timer(Timer.SHORT, now)
        return scs

    def begin_expose(self, set_id: uuid.UUID, now: float) -> ShadowCopySet:
        scs = self._find(set_id, "expose")
        self._apply(scs, "expose", now)
        return scs

    def expose_copy(self, set_id: uuid.UUID, copy_id: uuid.UUID) -> ShadowCopy:
        """Record one exposure before it is made, so a failure half-way knows what to withdraw."""
        scs = self.sets[set_id]
        copy = scs.copy(copy_id)
        copy.exposed_name = exposed_share_name(copy.share, copy.copy_id)
        copy.read_only = not scs.auto_recovery
        return copy

    def end_expose(self, set_id: uuid.UUID, ok: bool, now: float) -> ShadowCopySet:
        scs = self.sets[set_id]
        if ok:
            scs.status = S.EXPOSED
            scs.exposed_at = now
        else:
            for copy in scs.copies:
                copy.exposed_name = copy.exposed_path = None
        self._timer(Timer.SHORT, now)
        return scs

    def recovery_complete(self, set_id: uuid.UUID, now: float) -> ShadowCopySet:
        """Writable copies stay marked writable until the service has made them read-only on storage."""
        scs = self._find(set_id, "recovery_complete")
        self._apply(scs, "recovery_complete", now)
        self._clear_context()
        return scs

    def abort(self, set_id: uuid.UUID, now: float) -> ShadowCopySet:
        scs = self._find(set_id, "abort")
        del self.sets[set_id]
        if self.in_creation() is None:  # aborting an old Recovered set leaves the one in creation alone*
            self._apply(scs, "abort", now)
            self._clear_context()
        return scs

    def share_mapping(self, set_id: uuid.UUID, copy_id: uuid.UUID, share: str, level: int,
                      now: float) -> tuple[ShadowCopySet, ShadowCopy]:
        if level != 1:
            raise Refused(HResult.E_INVALIDARG, f"mapping level {level}")
        _require_guid(copy_id, "ShadowCopyId")
        scs = self._find(set_id, "get_mapping")
        copy = self._mapped_copy(scs, copy_id, share, HResult.E_INVALIDARG)
        if scs.status is not S.RECOVERED:
            self._apply(scs, "get_mapping", now)
        return scs, copy

    def delete_mapping(self, set_id: uuid.UUID, copy_id: uuid.UUID, share: str,
                       now: float) -> tuple[ShadowCopySet, ShadowCopy]:
        """Remove one copy; the set goes when its last copy does (check `set_id in sets`)."""
        _require_guid(copy_id, "ShadowCopyId")
        scs = self._find(set_id, "delete_mapping", missing=HResult.FSRVP_E_OBJECT_NOT_FOUND)
        copy = self._mapped_copy(scs, copy_id, share, HResult.FSRVP_E_OBJECT_NOT_FOUND)
        scs.copies.remove(copy)
        if not scs.copies:
            del self.sets[set_id]
        self._apply(scs, "delete_mapping", now)
        return scs, copy

    @staticmethod
    def _mapped_copy(scs: ShadowCopySet, copy_id: uuid.UUID, share: str, missing: HResult) -> ShadowCopy:
        copy = scs.copy(copy_id)
        if copy is None or copy.share.casefold() != share.casefold():
            raise Refused(missing, f"no copy {copy_id} of share {share} in set {scs.set_id}")
        return copy

    def restore_set(self, share: str, unc: str, store: dict, source: str, now: float) -> ShadowCopySet:
        """An admin's read-only exposure of an existing snapshot*: a Recovered set of one copy, with a
        persistent context so that nothing but the admin removes it."""
        scs = ShadowCopySet(set_id=self.new_id(), client_set_id=NULL_GUID, context=int(Context.NAS_ROLLBACK),
                            status=S.RECOVERED, client_address="local", principal="fsrvpctl", started_at=now)
        copy = ShadowCopy(copy_id=self.new_id(), client_copy_id=NULL_GUID, share=share, unc=unc, store=store,
                          created_at=now, source=source)
        copy.exposed_name = exposed_share_name(share, copy.copy_id)
        scs.copies.append(copy)
        self.sets[scs.set_id] = scs
        return scs

    def discard(self, set_id: uuid.UUID) -> ShadowCopySet:
        """An admin deletes a set in any status but while its commit runs*; the set a client was
        creating also releases the context, as Abort does."""
        scs = self.sets.get(set_id)
        if scs is None:
            raise Refused(HResult.FSRVP_E_OBJECT_NOT_FOUND, f"no shadow copy set {set_id}")
        if scs.status is S.CREATION_IN_PROGRESS:
            raise Refused(HResult.FSRVP_E_BAD_STATE, f"set {set_id} is being committed; try again when it is done")
        del self.sets[set_id]
        if scs.status in IN_CREATION:
            self._clear_context()
            self._timer(Timer.STOP, 0)
        return scs

    def expire(self, now: float) -> list[ShadowCopySet]:
        """Fire the sequence timer if it is due: returns the deleted sets, for cleanup."""
        if self.deadline is None or now < self.deadline:
            return []
        self.deadline = None
        self._clear_context()
        return self._delete_unrecovered()

    def reap(self, now: float, ttl: float) -> list[ShadowCopySet]:
        """Delete non-persistent sets exposed for `ttl` seconds or more (0: never); returns them, for cleanup."""
        if not ttl:
            return []
        doomed = [s for s in self.sets.values() if s.status in (S.EXPOSED, S.RECOVERED) and not s.persistent
                  and (s.exposed_at if s.exposed_at is not None else s.started_at) + ttl <= now]
        for scs in doomed:
            del self.sets[scs.set_id]
        if any(scs.status is not S.RECOVERED for scs in doomed):  # the set in creation: its sequence ends too
            self.deadline = None
            self._clear_context()
        return doomed

    def forget_copy(self, set_id: uuid.UUID, copy_id: uuid.UUID) -> ShadowCopySet:
        """Drop a copy whose storage is gone; the set goes with its last copy (check `set_id in sets`)."""
        scs = self.sets[set_id]
        scs.copies.remove(scs.copy(copy_id))
        if not scs.copies:
            del self.sets[set_id]
        return scs

    def shadow_copied(self, backend: str, store_name: str) -> bool:
        """IsPathShadowCopied: a copy of this store exists in a Committed/Exposed/Recovered set."""
        return any(c.store["backend"] == backend and c.store["name"] == store_name
                   for s in self.sets.values() if s.status in HOLDS_SNAPSHOTS for c in s.copies)

    # -- persistence --------------------------------------------------------------------------
    def restore(self, bodies: list[dict], globals_: dict | None) -> None:
        self.sets = {scs.set_id: scs for scs in map(ShadowCopySet.from_dict, bodies)}
        if globals_:
            self.context_set, self.context = globals_["context_set"], globals_["context"]
            self.context_client, self.retries = globals_["client"], globals_["retries"]
            self.deadline = globals_["deadline"]

    def globals_record(self) -> dict:
        return {"context_set": self.context_set, "context": self.context, "client": self.context_client,
                "retries": self.retries, "deadline": self.deadline}

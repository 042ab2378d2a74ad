"""Tests of the pure shadow-copy-set state machine (daemon/state.py) against MS-FSRVP 3.1.4.

The machine takes the time as an argument and its GUIDs from `new_id`, so every test uses a fake
clock (plain floats) and numbered GUIDs, and can state exact deadlines and identifiers.  The
timeouts are small, odd values so a test notices if the defaults (180 s / 1800 s) were used
instead of the configured ones.
"""

from __future__ import annotations

import itertools
import json
import uuid

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fsrvpd.constants import ATTR_AUTO_RECOVERY, ATTR_NO_AUTO_RECOVERY, Context, HResult
from fsrvpd.state import (
    MAX_RETRIES,
    MAX_SHARES_PER_SET,
    NULL_GUID,
    RULES,
    Refused,
    ShadowCopyMachine,
    ShadowCopySet,
    Status,
    exposed_share_name,
    valid_context,
)

S = Status
SHORT, LONG = 7.0, 70.0
T0 = 1_000_000.0
CLIENT, OTHER_CLIENT = "192.0.2.10", "192.0.2.20"
STRANGER = uuid.UUID("deadbeef-0000-4000-8000-000000000000")  # a GUID the server never issued
CLIENT_SET_ID = uuid.UUID("c0000000-0000-4000-8000-000000000001")
CLIENT_COPY_ID = uuid.UUID("c0000000-0000-4000-8000-000000000002")
PATH = [S.STARTED, S.ADDED, S.CREATION_IN_PROGRESS, S.COMMITTED, S.EXPOSED, S.RECOVERED]
SNAPSHOTS_EXIST = {S.COMMITTED, S.EXPOSED, S.RECOVERED}  # 3.1.4.10
VALID_CONTEXTS = [int(base) | attribute for base in Context
                  for attribute in (0, ATTR_NO_AUTO_RECOVERY, ATTR_AUTO_RECOVERY)]


# -- helpers ----------------------------------------------------------------------------------
def numbered_ids():
    """A `new_id` that hands out 00000000-...-0001, -0002, ... so tests can name server GUIDs."""
    counter = itertools.count(1)
    return lambda: uuid.UUID(int=next(counter))


def new_machine() -> ShadowCopyMachine:
    return ShadowCopyMachine(short_timeout=SHORT, long_timeout=LONG, new_id=numbered_ids())


def store(name: str, backend: str = "zfs") -> dict:
    return {"backend": backend, "name": name}


def unc(share: str) -> str:
    return f"\\\\fileserver\\{share}"


def snapshot(machine: ShadowCopyMachine) -> tuple[dict, dict]:
    """Everything the machine persists: what a refused call must leave alone."""
    return {str(k): s.to_dict() for k, s in machine.sets.items()}, machine.globals_record()


def refused(machine: ShadowCopyMachine, result: HResult, call, *args) -> Refused:
    """Call, expect Refused(result), and check the call changed nothing at all."""
    before = snapshot(machine)
    with pytest.raises(Refused) as info:
        call(*args)
    assert info.value.result is result, info.value
    assert snapshot(machine) == before
    return info.value


def make_set(machine: ShadowCopyMachine, status: Status, *, now: float = T0, client: str = CLIENT,
             context: int = Context.BACKUP, shares=(("data", "tank/data"),)) -> ShadowCopySet:
    """Drive a new set along the happy path until it reaches `status` (one second per call)."""
    clock = itertools.count(now)
    machine.set_context(context, client, next(clock))
    scs = machine.start_set(CLIENT_SET_ID, client, "DOM\\backup", next(clock))
    steps = [
        (S.ADDED, lambda: [machine.add(scs.set_id, CLIENT_COPY_ID, share, unc(share), store(name), next(clock))
                           for share, name in shares]),
        (S.CREATION_IN_PROGRESS, lambda: machine.begin_commit(scs.set_id, next(clock))),
        (S.COMMITTED, lambda: machine.end_commit(scs.set_id, True, next(clock))),
        (S.EXPOSED, lambda: expose(machine, scs, True, next(clock))),
        (S.RECOVERED, lambda: machine.recovery_complete(scs.set_id, next(clock))),
    ]
    for reached, step in steps:
        if scs.status is status:
            break
        step()
        assert scs.status is reached
    assert scs.status is status
    return scs


def expose(machine: ShadowCopyMachine, scs: ShadowCopySet, ok: bool, now: float) -> ShadowCopySet:
    """ExposeShadowCopySet as the service runs it: begin, record each copy, end."""
    machine.begin_expose(scs.set_id, now)
    for copy in scs.copies:
        machine.expose_copy(scs.set_id, copy.copy_id).exposed_path = f"/clones/{copy.copy_id}"
    return machine.end_expose(scs.set_id, ok, now)


def call_operation(machine: ShadowCopyMachine, operation: str, scs: ShadowCopySet, now: float):
    """Call `operation` (as named in state.RULES) on `scs`, with otherwise valid arguments."""
    copy = scs.copies[0] if scs.copies else None
    copy_id = copy.copy_id if copy else STRANGER
    share = copy.share if copy else "data"
    return {
        "add": lambda: machine.add(scs.set_id, CLIENT_COPY_ID, "logs", unc("logs"), store("tank/logs"), now),
        "prepare": lambda: machine.prepare(scs.set_id, now),
        "commit": lambda: machine.begin_commit(scs.set_id, now),
        "expose": lambda: machine.begin_expose(scs.set_id, now),
        "recovery_complete": lambda: machine.recovery_complete(scs.set_id, now),
        "abort": lambda: machine.abort(scs.set_id, now),
        "get_mapping": lambda: machine.share_mapping(scs.set_id, copy_id, share, 1, now),
        "delete_mapping": lambda: machine.delete_mapping(scs.set_id, copy_id, share, now),
    }[operation]()


# -- the happy path and the Message Sequence Timer ---------------------------------------------
def test_happy_path_moves_through_every_status_and_restarts_the_timer():
    """3.1.4.2-3.1.4.7: 180 s after SetContext/Start/Commit/Expose, 1800 s after Add/Prepare/
    GetShareMapping, stopped while Commit/Expose work and by RecoveryComplete."""
    m = new_machine()
    assert m.deadline is None and not m.context_set

    assert m.set_context(Context.BACKUP, CLIENT, T0) == []
    assert (m.context_set, m.context_client, m.retries, m.deadline) == (True, CLIENT, 0, T0 + SHORT)

    scs = m.start_set(CLIENT_SET_ID, CLIENT, "DOM\\backup", T0 + 1)
    assert scs.set_id == uuid.UUID(int=1) and scs.client_set_id == CLIENT_SET_ID
    assert (scs.status, scs.client_address, scs.principal, scs.started_at) == (S.STARTED, CLIENT, "DOM\\backup", T0 + 1)
    assert m.sets == {scs.set_id: scs} and m.deadline == T0 + 1 + SHORT

    copy = m.add(scs.set_id, CLIENT_COPY_ID, "data", unc("data"), store("tank/data"), T0 + 2)
    assert copy.copy_id == uuid.UUID(int=2) and copy.client_copy_id == CLIENT_COPY_ID
    assert (copy.share, copy.unc, copy.store, copy.created_at) == ("data", unc("data"), store("tank/data"), None)
    assert scs.status is S.ADDED and scs.copies == [copy] and m.deadline == T0 + 2 + LONG

    assert m.prepare(scs.set_id, T0 + 3) is scs
    assert scs.status is S.ADDED and m.deadline == T0 + 3 + LONG

    assert m.begin_commit(scs.set_id, T0 + 4) is scs
    assert scs.status is S.CREATION_IN_PROGRESS and m.deadline is None
    m.end_commit(scs.set_id, True, T0 + 5)
    assert scs.status is S.COMMITTED and copy.created_at == T0 + 5 and m.deadline == T0 + 5 + SHORT

    assert m.begin_expose(scs.set_id, T0 + 6) is scs
    assert scs.status is S.COMMITTED and m.deadline is None
    assert m.expose_copy(scs.set_id, copy.copy_id) is copy
    assert copy.exposed_name == exposed_share_name("data", copy.copy_id) and copy.read_only
    m.end_expose(scs.set_id, True, T0 + 7)
    assert scs.status is S.EXPOSED and m.deadline == T0 + 7 + SHORT

    assert m.share_mapping(scs.set_id, copy.copy_id, "data", 1, T0 + 8) == (scs, copy)
    assert m.deadline == T0 + 8 + LONG

    assert m.recovery_complete(scs.set_id, T0 + 9) is scs
    assert scs.status is S.RECOVERED and m.deadline is None
    assert (m.context_set, m.context_client) == (False, None)
    assert m.in_creation() is None


def test_default_timeouts_are_the_spec_values():
    """3.1.2: 180 s and 1800 s unless configured otherwise."""
    m = ShadowCopyMachine()
    m.set_context(Context.BACKUP, CLIENT, T0)
    assert m.deadline == T0 + 180
    scs = m.start_set(CLIENT_SET_ID, CLIENT, "p", T0)
    m.add(scs.set_id, CLIENT_COPY_ID, "data", unc("data"), store("tank/data"), T0)
    assert m.deadline == T0 + 1800


def test_abort_deletes_the_set_stops_the_timer_and_clears_the_context():
    """3.1.4.8: Abort removes the set and sets ContextSet to FALSE."""
    m = new_machine()
    scs = make_set(m, S.ADDED)
    assert m.abort(scs.set_id, T0 + 50) is scs
    assert m.sets == {} and m.deadline is None
    assert (m.context_set, m.context_client) == (False, None)


def test_get_share_mapping_of_a_recovered_set_leaves_the_timer_alone():
    """Recovered sets may be mapped (our extension); that must not restart a timer they no longer own."""
    m = new_machine()
    scs = make_set(m, S.RECOVERED)
    m.set_context(Context.BACKUP, CLIENT, T0 + 100)
    m.share_mapping(scs.set_id, scs.copies[0].copy_id, "data", 1, T0 + 200)
    assert m.deadline == T0 + 100 + SHORT


def test_failed_commit_goes_back_to_added_and_may_be_retried():
    """3.1.4.5: a failed wait sets Status back to "Added" and restarts the timer at 180 s."""
    m = new_machine()
    scs = make_set(m, S.CREATION_IN_PROGRESS)
    m.end_commit(scs.set_id, False, T0 + 50)
    assert scs.status is S.ADDED and m.deadline == T0 + 50 + SHORT
    assert all(copy.created_at is None for copy in scs.copies)
    m.begin_commit(scs.set_id, T0 + 60)
    m.end_commit(scs.set_id, True, T0 + 61)
    assert scs.status is S.COMMITTED and scs.copies[0].created_at == T0 + 61


def test_failed_expose_stays_committed_and_forgets_the_exposures():
    """3.1.4.6: a failed expose restarts the timer at 180 s; nothing half-exposed stays recorded."""
    m = new_machine()
    scs = make_set(m, S.COMMITTED, shares=(("data", "tank/data"), ("logs", "tank/logs")))
    expose(m, scs, False, T0 + 50)
    assert scs.status is S.COMMITTED and m.deadline == T0 + 50 + SHORT
    assert all(c.exposed_name is None and c.exposed_path is None for c in scs.copies)
    expose(m, scs, True, T0 + 60)
    assert scs.status is S.EXPOSED
    assert [c.exposed_name for c in scs.copies] == [exposed_share_name(c.share, c.copy_id) for c in scs.copies]


@pytest.mark.parametrize("attribute, writable", [(0, False), (ATTR_NO_AUTO_RECOVERY, False),
                                                 (ATTR_AUTO_RECOVERY, True)])
def test_auto_recovery_exposes_writable_until_recovery_complete(attribute, writable):
    """3.1.4.6/3.1.4.7: ATTR_AUTO_RECOVERY makes the exposed copy writable until RecoveryComplete.  The
    machine leaves the flag alone: the service sets it once the storage is read-only (intent, then outcome)."""
    m = new_machine()
    scs = make_set(m, S.EXPOSED, context=Context.FILE_SHARE_BACKUP | attribute)
    assert scs.context == Context.FILE_SHARE_BACKUP | attribute and scs.auto_recovery is writable
    assert scs.copies[0].read_only is not writable
    m.recovery_complete(scs.set_id, T0 + 50)
    assert scs.status is S.RECOVERED and scs.copies[0].read_only is not writable


@pytest.mark.parametrize("status", [S.EXPOSED, S.RECOVERED])
def test_delete_share_mapping_removes_copies_then_the_set(status):
    """3.1.4.12: the copy goes; the set goes with its last copy; the timer is not touched."""
    m = new_machine()
    scs = make_set(m, status, shares=(("data", "tank/data"), ("logs", "tank/logs")))
    data, logs = scs.copies
    deadline = m.deadline
    assert m.delete_mapping(scs.set_id, data.copy_id, "DATA", T0 + 50) == (scs, data)
    assert scs.copies == [logs] and scs.set_id in m.sets and m.deadline == deadline
    m.delete_mapping(scs.set_id, logs.copy_id, "logs", T0 + 60)
    assert scs.set_id not in m.sets and m.deadline == deadline


# -- every status against every operation --------------------------------------------------------
STOPPED, KEPT = "stopped", "kept"
# Written out from the spec (3.1.4.4-3.1.4.13) rather than taken from state.RULES, so a slip in the
# table shows: operation -> (statuses it is allowed in, status after it, the timer after it).
ALLOWED = {
    "add": ({S.STARTED, S.ADDED}, S.ADDED, LONG),
    "prepare": ({S.ADDED}, S.ADDED, LONG),
    "commit": ({S.ADDED, S.CREATION_IN_PROGRESS}, S.CREATION_IN_PROGRESS, STOPPED),  # until end_commit
    "expose": ({S.COMMITTED}, S.COMMITTED, STOPPED),  # until end_expose
    "recovery_complete": ({S.EXPOSED}, S.RECOVERED, STOPPED),
    "abort": (set(PATH) - {S.CREATION_IN_PROGRESS}, None, STOPPED),  # ours: a commit in flight stays
    "get_mapping": ({S.EXPOSED, S.RECOVERED}, None, LONG),  # ours: Recovered too (the spec: SHOULD refuse)
    "delete_mapping": ({S.EXPOSED, S.RECOVERED}, None, KEPT),
}


@pytest.mark.parametrize("status", PATH)
@pytest.mark.parametrize("operation", sorted(ALLOWED))
def test_operations_are_allowed_exactly_in_their_statuses(operation, status):
    """In any other status FSRVP_E_BAD_STATE, changing nothing; in an allowed one the status and
    the timer move as the spec says."""
    assert set(RULES) == set(ALLOWED)
    allowed, after, timer = ALLOWED[operation]
    m = new_machine()
    scs = make_set(m, status)
    now = T0 + 500
    if status not in allowed:
        refused(m, HResult.FSRVP_E_BAD_STATE, call_operation, m, operation, scs, now)
        return
    deadline = m.deadline
    call_operation(m, operation, scs, now)
    if operation in ("abort", "delete_mapping"):
        assert scs.set_id not in m.sets  # (delete_mapping: the only copy went, and the set with it)
    else:
        assert scs.status is (after or status)
    if operation == "get_mapping" and status is S.RECOVERED:
        timer = KEPT  # the timer belongs to the set in creation, if any
    assert m.deadline == (None if timer == STOPPED else deadline if timer == KEPT else now + timer)


# -- error codes ----------------------------------------------------------------------------------
NULL_ARGUMENT_CALLS = {
    "StartShadowCopySet": lambda m, s, c: m.start_set(NULL_GUID, CLIENT, "p", T0),
    "Add ClientShadowCopyId": lambda m, s, c: m.add(s, NULL_GUID, "logs", unc("logs"), store("tank/logs"), T0),
    "Add ShadowCopySetId": lambda m, s, c: m.add(NULL_GUID, CLIENT_COPY_ID, "logs", unc("logs"), store("tank/logs"),
                                                 T0),
    "Prepare": lambda m, s, c: m.prepare(NULL_GUID, T0),
    "Commit": lambda m, s, c: m.begin_commit(NULL_GUID, T0),
    "Expose": lambda m, s, c: m.begin_expose(NULL_GUID, T0),
    "RecoveryComplete": lambda m, s, c: m.recovery_complete(NULL_GUID, T0),
    "Abort": lambda m, s, c: m.abort(NULL_GUID, T0),
    "GetShareMapping ShadowCopyId": lambda m, s, c: m.share_mapping(s, NULL_GUID, "data", 1, T0),
    "GetShareMapping ShadowCopySetId": lambda m, s, c: m.share_mapping(NULL_GUID, c, "data", 1, T0),
    "DeleteShareMapping ShadowCopyId": lambda m, s, c: m.delete_mapping(s, NULL_GUID, "data", T0),
    "DeleteShareMapping ShadowCopySetId": lambda m, s, c: m.delete_mapping(NULL_GUID, c, "data", T0),
}


@pytest.mark.parametrize("status", [S.ADDED, S.EXPOSED])
@pytest.mark.parametrize("call", NULL_ARGUMENT_CALLS.values(), ids=list(NULL_ARGUMENT_CALLS))
def test_null_guids_are_invalid_arguments(call, status):
    """3.1.4: a NULL parameter fails with E_INVALIDARG, whatever the state."""
    m = new_machine()
    scs = make_set(m, status)
    refused(m, HResult.E_INVALIDARG, call, m, scs.set_id, scs.copies[0].copy_id)


UNKNOWN_SET_CALLS = {
    "Add": (lambda m, c: m.add(STRANGER, CLIENT_COPY_ID, "logs", unc("logs"), store("tank/logs"), T0),
            HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH),
    "Prepare": (lambda m, c: m.prepare(STRANGER, T0), HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH),
    "Commit": (lambda m, c: m.begin_commit(STRANGER, T0), HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH),
    "Expose": (lambda m, c: m.begin_expose(STRANGER, T0), HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH),
    "RecoveryComplete": (lambda m, c: m.recovery_complete(STRANGER, T0), HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH),
    "Abort": (lambda m, c: m.abort(STRANGER, T0), HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH),
    "GetShareMapping": (lambda m, c: m.share_mapping(STRANGER, c, "data", 1, T0),
                        HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH),
    "DeleteShareMapping": (lambda m, c: m.delete_mapping(STRANGER, c, "data", T0), HResult.FSRVP_E_OBJECT_NOT_FOUND),
}


@pytest.mark.parametrize("call, result", UNKNOWN_SET_CALLS.values(), ids=list(UNKNOWN_SET_CALLS))
def test_unknown_set_ids(call, result):
    """3.1.4.4-3.1.4.13: a set GUID not in the table is ID_MISMATCH (DeleteShareMapping: NOT_FOUND)."""
    m = new_machine()
    scs = make_set(m, S.EXPOSED)
    refused(m, result, call, m, scs.copies[0].copy_id)


@pytest.mark.parametrize("level", [0, 2, 0xFFFFFFFF])
@pytest.mark.parametrize("set_id", [NULL_GUID, STRANGER, None], ids=["null-set", "unknown-set", "started-set"])
def test_get_share_mapping_checks_the_level_first(level, set_id):
    """3.1.4.11: an invalid Level is E_INVALIDARG before the set is even looked up."""
    m = new_machine()
    scs = make_set(m, S.STARTED)
    refused(m, HResult.E_INVALIDARG, m.share_mapping, set_id or scs.set_id, NULL_GUID, "data", level, T0)


def test_share_mapping_of_an_unknown_copy_or_share():
    """3.1.4.11: unknown copy or share is E_INVALIDARG; 3.1.4.12: it is OBJECT_NOT_FOUND."""
    m = new_machine()
    old = make_set(m, S.RECOVERED)  # its copy exists, but in another set
    scs = make_set(m, S.EXPOSED, now=T0 + 100, shares=(("data", "tank/data2"),))
    copy = scs.copies[0]
    for copy_id, share in [(STRANGER, "data"), (old.copies[0].copy_id, "data"), (copy.copy_id, "logs")]:
        refused(m, HResult.E_INVALIDARG, m.share_mapping, scs.set_id, copy_id, share, 1, T0 + 200)
        refused(m, HResult.FSRVP_E_OBJECT_NOT_FOUND, m.delete_mapping, scs.set_id, copy_id, share, T0 + 200)
    assert m.share_mapping(scs.set_id, copy.copy_id, "Data", 1, T0 + 200) == (scs, copy)  # names are case-blind


def test_second_copy_of_a_file_store_already_exists_and_restarts_the_timer_short():
    """3.1.4.4: one shadow copy per file store per set; the refusal starts the 180 s timer."""
    m = new_machine()
    scs = make_set(m, S.ADDED)
    sets_before, globals_before = snapshot(m)
    with pytest.raises(Refused) as info:
        m.add(scs.set_id, CLIENT_COPY_ID, "data2", unc("data2"), store("tank/data"), T0 + 50)
    assert info.value.result is HResult.FSRVP_E_OBJECT_ALREADY_EXISTS
    assert snapshot(m) == (sets_before, {**globals_before, "deadline": T0 + 50 + SHORT})
    # the same name on another backend is another file store
    m.add(scs.set_id, CLIENT_COPY_ID, "data3", unc("data3"), store("tank/data", backend="lvm"), T0 + 60)
    assert len(scs.copies) == 2


def test_a_set_holds_at_most_max_shares():
    """Our limit (as Windows and NetApp): the 65th share is E_INVALIDARG."""
    m = new_machine()
    scs = make_set(m, S.STARTED)
    for n in range(MAX_SHARES_PER_SET):
        m.add(scs.set_id, CLIENT_COPY_ID, f"s{n}", unc(f"s{n}"), store(f"tank/s{n}"), T0 + 10)
    refused(m, HResult.E_INVALIDARG, m.add, scs.set_id, CLIENT_COPY_ID, "one-more", unc("one-more"),
            store("tank/one-more"), T0 + 20)


@pytest.mark.parametrize("context", [0x1, 0x5, 0x8, 0x11, 0x20, ATTR_AUTO_RECOVERY | ATTR_NO_AUTO_RECOVERY,
                                     Context.NAS_ROLLBACK | ATTR_AUTO_RECOVERY | ATTR_NO_AUTO_RECOVERY,
                                     0x00000004 | Context.BACKUP, 0x80000000, 0xFFFFFFFF],
                         ids=hex)
def test_invalid_contexts_are_unsupported(context):
    """3.1.4.2: anything but the four contexts with at most one recovery attribute."""
    m = new_machine()
    assert not valid_context(context)
    refused(m, HResult.FSRVP_E_UNSUPPORTED_CONTEXT, m.set_context, context, CLIENT, T0)
    make_set(m, S.STARTED)  # also while a context is set, from its own client
    refused(m, HResult.FSRVP_E_UNSUPPORTED_CONTEXT, m.set_context, context, CLIENT, T0 + 50)


@pytest.mark.parametrize("context", VALID_CONTEXTS, ids=hex)
def test_valid_contexts_are_accepted_and_given_to_the_next_set(context):
    """2.2.2.2: each of the four contexts, alone or with either recovery attribute."""
    m = new_machine()
    assert m.set_context(context, CLIENT, T0) == []
    assert m.context == context
    assert m.start_set(CLIENT_SET_ID, CLIENT, "p", T0).context == context


# -- SetContext and StartShadowCopySet: one client, one set in creation at a time -------------------
def test_set_context_from_another_address_is_in_progress():
    """3.1.4.2: ContextSet belongs to the address that set it."""
    m = new_machine()
    m.set_context(Context.BACKUP, CLIENT, T0)
    refused(m, HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS, m.set_context, Context.BACKUP, OTHER_CLIENT, T0 + 1)
    make_set(m, S.RECOVERED, now=T0 + 2)
    assert m.set_context(Context.BACKUP, OTHER_CLIENT, T0 + 50) == []  # free again after RecoveryComplete
    assert m.context_client == OTHER_CLIENT


def test_set_context_again_from_the_same_address_discards_the_unfinished_set():
    """3.1.4.2: a retry removes the sets not Recovered and counts itself."""
    m = new_machine()
    kept = make_set(m, S.RECOVERED)
    dropped = make_set(m, S.COMMITTED, now=T0 + 100, shares=(("logs", "tank/logs"),))
    assert m.set_context(Context.NAS_ROLLBACK, CLIENT, T0 + 200) == [dropped]
    assert m.sets == {kept.set_id: kept}
    assert (m.context_set, m.context, m.context_client, m.retries) == (True, Context.NAS_ROLLBACK, CLIENT, 1)
    assert m.deadline == T0 + 200 + SHORT
    assert m.set_context(Context.BACKUP, CLIENT, T0 + 201) == []
    assert m.retries == 2


def test_set_context_retry_limit():
    """3.1.4.2: beyond ShadowCopyClientRetryCount the retry fails IN_PROGRESS, its deletions standing."""
    m = new_machine()
    m.set_context(Context.BACKUP, CLIENT, T0)
    for retry in range(1, MAX_RETRIES + 1):
        scs = m.start_set(CLIENT_SET_ID, CLIENT, "p", T0 + retry)
        assert m.set_context(Context.BACKUP, CLIENT, T0 + retry) == [scs]
        assert m.retries == retry
    scs = m.start_set(CLIENT_SET_ID, CLIENT, "p", T0 + 10)
    with pytest.raises(Refused) as info:
        m.set_context(Context.BACKUP, CLIENT, T0 + 11)
    assert info.value.result is HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS
    assert info.value.discarded == [scs]
    assert m.sets == {} and (m.context_set, m.context_client, m.retries) == (False, None, MAX_RETRIES + 1)
    # ContextSet is FALSE now, so the next SetContext starts counting afresh
    assert m.set_context(Context.BACKUP, CLIENT, T0 + 12) == [] and m.retries == 0


def test_retry_count_resets_when_the_context_was_not_set():
    """3.1.4.2: SetContext while ContextSet is FALSE sets ShadowCopyClientRetryCount to 0."""
    m = new_machine()
    m.set_context(Context.BACKUP, CLIENT, T0)
    m.set_context(Context.BACKUP, CLIENT, T0 + 1)
    assert m.retries == 1
    make_set(m, S.RECOVERED, now=T0 + 2)  # its own SetContext is another retry
    assert m.retries == 2
    m.set_context(Context.BACKUP, CLIENT, T0 + 50)
    assert m.retries == 0


def test_start_needs_a_context():
    """3.1.4.3: StartShadowCopySet without SetContext is BAD_STATE (also after RecoveryComplete/Abort)."""
    m = new_machine()
    refused(m, HResult.FSRVP_E_BAD_STATE, m.start_set, CLIENT_SET_ID, CLIENT, "p", T0)
    make_set(m, S.RECOVERED)
    refused(m, HResult.FSRVP_E_BAD_STATE, m.start_set, CLIENT_SET_ID, CLIENT, "p", T0 + 50)
    m.abort(make_set(m, S.STARTED, now=T0 + 100).set_id, T0 + 150)
    refused(m, HResult.FSRVP_E_BAD_STATE, m.start_set, CLIENT_SET_ID, CLIENT, "p", T0 + 160)


@pytest.mark.parametrize("status", PATH[:-1])
def test_start_while_a_set_is_not_recovered_is_in_progress(status):
    """3.1.4.3: one set in creation at a time, Recovered sets do not count."""
    m = new_machine()
    make_set(m, S.RECOVERED)
    make_set(m, status, now=T0 + 100, shares=(("logs", "tank/logs"),))
    refused(m, HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS, m.start_set, CLIENT_SET_ID, CLIENT, "p", T0 + 200)


def test_abort_of_an_old_set_leaves_the_set_in_creation_alone():
    """Abort of an old Recovered set while another set is unfinished keeps that set's context and
    timer (a deliberate narrowing of 3.1.4.8's ContextSet = FALSE), so it cannot linger untimed
    and no other client can slip in beside it."""
    m = new_machine()
    old = make_set(m, S.RECOVERED)
    unfinished = make_set(m, S.ADDED, now=T0 + 100, shares=(("logs", "tank/logs"),))
    deadline = m.deadline
    m.abort(old.set_id, T0 + 200)
    assert m.context_set and m.deadline == deadline
    assert m.expire(deadline) == [unfinished] and m.sets == {}


def test_another_client_waits_for_an_orphaned_set_until_its_timer_fires():
    m = new_machine()
    old = make_set(m, S.RECOVERED)
    orphan = make_set(m, S.ADDED, now=T0 + 100, shares=(("logs", "tank/logs"),))
    deadline = m.deadline
    m.abort(old.set_id, T0 + 200)
    refused(m, HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS, m.set_context, Context.BACKUP, OTHER_CLIENT, T0 + 201)
    assert m.expire(deadline) == [orphan]
    m.set_context(Context.BACKUP, OTHER_CLIENT, T0 + 300)
    assert m.start_set(CLIENT_SET_ID, OTHER_CLIENT, "p", T0 + 301).status is S.STARTED


# -- the timer firing ----------------------------------------------------------------------------
def test_expire_before_the_deadline_does_nothing():
    m = new_machine()
    make_set(m, S.ADDED)
    before = snapshot(m)
    assert m.expire(m.deadline - 0.001) == []
    assert snapshot(m) == before


def test_expire_without_a_timer_does_nothing():
    """The timer is stopped between RecoveryComplete and the next SetContext."""
    m = new_machine()
    make_set(m, S.RECOVERED)
    before = snapshot(m)
    assert m.expire(T0 + 10**9) == []
    assert snapshot(m) == before


@pytest.mark.parametrize("status", [S.STARTED, S.ADDED, S.COMMITTED, S.EXPOSED])
def test_expire_deletes_what_is_not_recovered(status):
    """3.1.5: every set not Recovered is deleted (and returned for cleanup); ContextSet goes FALSE."""
    m = new_machine()
    kept = make_set(m, S.RECOVERED)
    doomed = make_set(m, status, now=T0 + 100, shares=(("logs", "tank/logs"),))
    assert m.expire(m.deadline) == [doomed]
    assert m.sets == {kept.set_id: kept}
    assert (m.context_set, m.context_client, m.deadline) == (False, None, None)
    assert m.expire(T0 + 10**9) == []


def test_expire_after_set_context_alone_clears_the_context():
    m = new_machine()
    m.set_context(Context.BACKUP, CLIENT, T0)
    assert m.expire(T0 + SHORT) == []
    assert not m.context_set and m.deadline is None
    m.set_context(Context.BACKUP, OTHER_CLIENT, T0 + SHORT + 1)  # free for anyone now


# -- IsPathShadowCopied ---------------------------------------------------------------------------
@pytest.mark.parametrize("status", PATH)
def test_shadow_copied_only_once_committed(status):
    """3.1.4.10: only Committed, Exposed and Recovered sets hold shadow copies."""
    m = new_machine()
    make_set(m, status)
    assert m.shadow_copied("zfs", "tank/data") is (status in SNAPSHOTS_EXIST)
    assert not m.shadow_copied("lvm", "tank/data")
    assert not m.shadow_copied("zfs", "tank/other")


# -- names and persistence ------------------------------------------------------------------------
def test_exposed_share_name():
    """3.1.4.6: `share@{ShadowCopyId}`; a hidden base share gives a hidden snapshot share."""
    copy_id = uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")
    assert exposed_share_name("data", copy_id) == "data@{01234567-89ab-cdef-0123-456789abcdef}"
    assert exposed_share_name("admin$", copy_id) == "admin$@{01234567-89ab-cdef-0123-456789abcdef}$"


@pytest.mark.parametrize("status", PATH)
def test_set_round_trips_through_json(status):
    m = new_machine()
    scs = make_set(m, status, context=Context.APP_ROLLBACK | ATTR_AUTO_RECOVERY,
                   shares=(("data", "tank/data"), ("hidden$", "tank/hidden")))
    body = json.loads(json.dumps(scs.to_dict()))
    assert body["status"] == status.value and body["set_id"] == str(scs.set_id)
    assert ShadowCopySet.from_dict(body) == scs


def test_machine_round_trips_through_restore():
    """What the service persists (sets and globals) rebuilds an equal machine that acts the same."""
    m = new_machine()
    make_set(m, S.RECOVERED)
    make_set(m, S.EXPOSED, now=T0 + 100, shares=(("logs", "tank/logs"),))
    bodies = json.loads(json.dumps([s.to_dict() for s in m.sets.values()]))
    globals_ = json.loads(json.dumps(m.globals_record()))
    restored = new_machine()
    restored.restore(bodies, globals_)
    assert snapshot(restored) == snapshot(m) and restored.sets == m.sets
    assert [s.set_id for s in restored.expire(restored.deadline)] == [s.set_id for s in m.expire(m.deadline)]


def test_restore_without_globals_keeps_the_initial_context():
    m = new_machine()
    m.restore([], None)
    assert m.globals_record() == {"context_set": False, "context": Context.BACKUP, "client": None,
                                  "retries": 0, "deadline": None}


# -- property: any sequence of calls ----------------------------------------------------------------
TRANSITIONS = {
    (S.STARTED, S.ADDED), (S.ADDED, S.CREATION_IN_PROGRESS), (S.CREATION_IN_PROGRESS, S.COMMITTED),
    (S.CREATION_IN_PROGRESS, S.ADDED),  # a failed commit is undone
    (S.COMMITTED, S.EXPOSED), (S.EXPOSED, S.RECOVERED),
}
REMOVES_RECOVERED = {"abort", "delete_mapping"}  # nothing else may delete a Recovered set
SET_ERRORS = {HResult.E_INVALIDARG, HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH, HResult.FSRVP_E_BAD_STATE}
REFUSALS = {
    "set_context": {HResult.FSRVP_E_UNSUPPORTED_CONTEXT, HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS},
    "start_set": {HResult.E_INVALIDARG, HResult.FSRVP_E_BAD_STATE, HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS},
    "add": SET_ERRORS | {HResult.FSRVP_E_OBJECT_ALREADY_EXISTS},
    "prepare": SET_ERRORS, "begin_commit": SET_ERRORS, "begin_expose": SET_ERRORS,
    "recovery_complete": SET_ERRORS, "abort": SET_ERRORS, "share_mapping": SET_ERRORS,
    "delete_mapping": {HResult.E_INVALIDARG, HResult.FSRVP_E_OBJECT_NOT_FOUND, HResult.FSRVP_E_BAD_STATE},
}

# Arguments lean towards the right ones (the set in creation, its copies, its shares) so that
# sequences get far along the happy path; wrong ones (NULL, unknown, stale, mismatched) stay common.
CURRENT = "current"  # resolved when the rule runs: the set in creation, one of its copies, its share
set_refs = st.one_of(st.sampled_from([CURRENT, CURRENT, CURRENT, NULL_GUID, STRANGER]), st.integers(0, 5))
copy_refs = st.one_of(st.sampled_from([CURRENT, CURRENT, CURRENT, NULL_GUID, STRANGER]), st.integers(0, 5))
share_refs = st.sampled_from([CURRENT, CURRENT, CURRENT, "data", "DATA", "logs", "hidden$"])
clients = st.sampled_from([CLIENT, CLIENT, CLIENT, OTHER_CLIENT])
contexts = st.one_of(st.sampled_from(VALID_CONTEXTS), st.integers(0, 0xFFFFFFFF))
client_guids = st.sampled_from([CLIENT_SET_ID, CLIENT_SET_ID, CLIENT_SET_ID, NULL_GUID])
shares = st.sampled_from(["data", "logs", "hidden$"])
STORES = [store("tank/data"), store("tank/logs"), store("tank/data", backend="lvm")]
stores = st.sampled_from(STORES)
outcomes = st.sampled_from([True, True, True, False])  # does the storage work of Commit/Expose succeed
levels = st.sampled_from([1, 1, 1, 1, 0, 2])


class AnySequence(RuleBasedStateMachine):
    """Drives the machine with arbitrary calls, right and wrong.  Any exception but Refused fails the
    test; every call goes through `attempt`, which checks what it may change; the invariants (one
    set in creation at most, among others) run after every step."""

    def __init__(self):
        super().__init__()
        self.m = new_machine()
        self.now = T0
        self.issued_sets: list[uuid.UUID] = []  # every GUID the server handed out, deleted or not
        self.issued_copies: list[uuid.UUID] = []

    # -- arguments ------------------------------------------------------------------------------
    def set_id(self, ref) -> uuid.UUID:
        if ref == CURRENT:
            current = self.m.in_creation() or next(reversed(self.m.sets.values()), None)
            return current.set_id if current else STRANGER
        if isinstance(ref, int):  # an issued GUID, counted from the newest: maybe stale
            return self.issued_sets[-1 - ref % len(self.issued_sets)] if self.issued_sets else STRANGER
        return ref

    def copy_id(self, ref, set_id: uuid.UUID) -> uuid.UUID:
        if ref == CURRENT:
            scs = self.m.sets.get(set_id)
            return scs.copies[0].copy_id if scs and scs.copies else STRANGER
        if isinstance(ref, int):
            return self.issued_copies[-1 - ref % len(self.issued_copies)] if self.issued_copies else STRANGER
        return ref

    def share(self, ref, copy_id: uuid.UUID) -> str:
        if ref == CURRENT:
            copy = next((c for s in self.m.sets.values() for c in s.copies if c.copy_id == copy_id), None)
            return copy.share if copy else "data"
        return ref

    # -- the check around every call ----------------------------------------------------------
    def attempt(self, operation: str, call, *args):
        """Run one call: a refusal must be an expected code and change nothing (with the two
        exceptions of the module rules); a success may only move statuses along TRANSITIONS."""
        m = self.m
        sets_before, globals_before = snapshot(m)
        statuses = {set_id: scs.status for set_id, scs in m.sets.items()}
        unrecovered = [scs for scs in m.sets.values() if scs.status is not S.RECOVERED]
        retry_limit = (operation == "set_context" and valid_context(args[0]) and m.context_set
                       and args[1] == m.context_client and m.retries >= MAX_RETRIES)
        try:
            result = call(*args)
        except Refused as refusal:
            assert refusal.result in REFUSALS[operation], (operation, refusal)
            if retry_limit:
                assert refusal.result is HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS
                assert refusal.discarded == unrecovered
                assert m.in_creation() is None and not m.context_set and m.retries == MAX_RETRIES + 1
            elif refusal.result is HResult.FSRVP_E_OBJECT_ALREADY_EXISTS:
                assert snapshot(m) == (sets_before, {**globals_before, "deadline": self.now + SHORT})
            else:
                assert not refusal.discarded
                assert snapshot(m) == (sets_before, globals_before), (operation, refusal)
            return None
        assert not retry_limit, "the retry limit was not enforced"
        for set_id, old in statuses.items():
            scs = m.sets.get(set_id)
            if scs is None:
                assert old is not S.RECOVERED or operation in REMOVES_RECOVERED, (operation, old)
            else:
                assert scs.status is old or (old, scs.status) in TRANSITIONS, (operation, old, scs.status)
        for set_id in m.sets.keys() - statuses.keys():
            assert operation == "start_set" and m.sets[set_id].status is S.STARTED
        return result

    # -- rules -----------------------------------------------------------------------------------
    @rule(choices=st.lists(st.integers(0, 2), min_size=1, max_size=6), ok=outcomes)
    def proceed(self, choices, ok):
        """A few right calls in a row for the set in creation, so that sequences get far enough to
        matter (`choices` picks among the right calls where there are several)."""
        for choice in choices:
            scs = self.m.in_creation()
            if scs is None and not self.m.context_set:
                self.set_context(VALID_CONTEXTS[choice], CLIENT)
            elif scs is None:
                self.start_set(CLIENT_SET_ID, self.m.context_client)
            elif scs.status is S.STARTED or (scs.status is S.ADDED and choice == 0):
                used = [c.store for c in scs.copies]
                self.add(CURRENT, CLIENT_COPY_ID, "logs", next((s for s in STORES if s not in used), STORES[0]))
            elif scs.status is S.ADDED:
                self.prepare(CURRENT) if choice == 1 else self.commit(CURRENT, ok)
            elif scs.status is S.COMMITTED:
                self.expose(CURRENT, ok)
            elif scs.status is S.EXPOSED and choice == 0:
                self.share_mapping(CURRENT, CURRENT, CURRENT, 1)
            elif scs.status is S.EXPOSED and choice == 1:
                self.delete_mapping(CURRENT, CURRENT, CURRENT)
            elif scs.status is S.EXPOSED:
                self.recovery_complete(CURRENT)

    @rule(times=st.integers(1, MAX_RETRIES + 2), context=st.sampled_from(VALID_CONTEXTS))
    def start_over(self, times, context):
        """A client calling SetContext again and again (3.1.4.2 retries, up to the limit and past it)."""
        for _ in range(times):
            self.set_context(context, self.m.context_client or CLIENT)

    @rule()
    def restart(self):
        """Persist and reload, as the service does across a restart, and carry on with the copy."""
        restored = ShadowCopyMachine(short_timeout=SHORT, long_timeout=LONG, new_id=self.m.new_id)
        restored.restore(json.loads(json.dumps([s.to_dict() for s in self.m.sets.values()])),
                         json.loads(json.dumps(self.m.globals_record())))
        assert restored.sets == self.m.sets and restored.globals_record() == self.m.globals_record()
        self.m = restored

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, SHORT - 1, SHORT, LONG - 1, LONG, 10 * LONG]))
    def tick(self, dt):
        self.now += dt

    @rule(context=contexts, client=clients)
    def set_context(self, context, client):
        retry = self.m.context_set
        if self.attempt("set_context", self.m.set_context, context, client, self.now) is not None:
            assert (self.m.context_set, self.m.context, self.m.context_client) == (True, context, client)
            assert self.m.deadline == self.now + SHORT
            assert self.m.in_creation() is None or not retry

    @rule(client_set_id=client_guids, client=clients)
    def start_set(self, client_set_id, client):
        scs = self.attempt("start_set", self.m.start_set, client_set_id, client, "DOM\\backup", self.now)
        if scs:
            self.issued_sets.append(scs.set_id)

    @rule(set_ref=set_refs, client_copy_id=client_guids, share=shares, file_store=stores)
    def add(self, set_ref, client_copy_id, share, file_store):
        copy = self.attempt("add", self.m.add, self.set_id(set_ref), client_copy_id, share, unc(share),
                            dict(file_store), self.now)
        if copy:
            self.issued_copies.append(copy.copy_id)

    @rule(set_ref=set_refs)
    def prepare(self, set_ref):
        self.attempt("prepare", self.m.prepare, self.set_id(set_ref), self.now)

    @rule(set_ref=set_refs, ok=outcomes)
    def commit(self, set_ref, ok):
        set_id = self.set_id(set_ref)
        if self.attempt("begin_commit", self.m.begin_commit, set_id, self.now):
            self.attempt("end_commit", self.m.end_commit, set_id, ok, self.now)

    @rule(set_ref=set_refs, ok=outcomes)
    def expose(self, set_ref, ok):
        set_id = self.set_id(set_ref)
        scs = self.attempt("begin_expose", self.m.begin_expose, set_id, self.now)
        if scs:
            for copy in scs.copies:
                self.attempt("expose_copy", self.m.expose_copy, set_id, copy.copy_id)
            self.attempt("end_expose", self.m.end_expose, set_id, ok, self.now)

    @rule(set_ref=set_refs)
    def recovery_complete(self, set_ref):
        if self.attempt("recovery_complete", self.m.recovery_complete, self.set_id(set_ref), self.now):
            assert not self.m.context_set and self.m.deadline is None

    @rule(set_ref=set_refs)
    def abort(self, set_ref):
        if self.attempt("abort", self.m.abort, self.set_id(set_ref), self.now):
            # The set in creation, if any, keeps its context and timer; otherwise both are cleared.
            in_creation = self.m.in_creation() is not None
            assert self.m.context_set == in_creation
            assert in_creation or self.m.deadline is None

    @rule(set_ref=set_refs, copy_ref=copy_refs, share_ref=share_refs, level=levels)
    def share_mapping(self, set_ref, copy_ref, share_ref, level):
        set_id = self.set_id(set_ref)
        copy_id = self.copy_id(copy_ref, set_id)
        self.attempt("share_mapping", self.m.share_mapping, set_id, copy_id, self.share(share_ref, copy_id), level,
                     self.now)

    @rule(set_ref=set_refs, copy_ref=copy_refs, share_ref=share_refs)
    def delete_mapping(self, set_ref, copy_ref, share_ref):
        set_id = self.set_id(set_ref)
        copy_id = self.copy_id(copy_ref, set_id)
        self.attempt("delete_mapping", self.m.delete_mapping, set_id, copy_id, self.share(share_ref, copy_id),
                     self.now)

    @rule()
    def expire(self):
        due = self.m.deadline is not None and self.now >= self.m.deadline
        expired = self.attempt("expire", self.m.expire, self.now)
        if due:
            assert not self.m.context_set and self.m.in_creation() is None and self.m.deadline is None
        else:
            assert expired == []


    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def path_shadow_copied_once_committed(self):
        for file_store in STORES:
            assert self.m.shadow_copied(file_store["backend"], file_store["name"]) == any(
                c.store == file_store for s in self.m.sets.values() if s.status in SNAPSHOTS_EXIST for c in s.copies)

    @invariant()
    def one_set_in_creation(self):
        assert sum(scs.status is not S.RECOVERED for scs in self.m.sets.values()) <= 1

    @invariant()
    def the_set_in_creation_is_timed(self):
        """3.1.5: an unfinished set is always under the Message Sequence Timer, so it cannot be orphaned."""
        assert self.m.in_creation() is None or self.m.deadline is not None

    @invariant()
    def context_has_an_owner_exactly_when_set(self):
        assert (self.m.context_client is not None) == self.m.context_set
        assert valid_context(self.m.context)

    @invariant()
    def sets_are_well_formed(self):
        for set_id, scs in self.m.sets.items():
            assert scs.set_id == set_id
            assert (scs.status is S.STARTED) == (not scs.copies)
            assert len(scs.copies) <= MAX_SHARES_PER_SET
            file_stores = [(c.store["backend"], c.store["name"]) for c in scs.copies]
            assert len(set(file_stores)) == len(file_stores)
            assert all((c.created_at is not None) == (scs.status in SNAPSHOTS_EXIST) for c in scs.copies)



AnySequence.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestAnySequence = AnySequence.TestCase

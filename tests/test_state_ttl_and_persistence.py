"""The pure state machine's own rules that the end-to-end tests cannot reach cheaply: exposure TTL,
persistence, forgetting lost copies.  No I/O: time is passed in."""

from __future__ import annotations

import uuid

import pytest

from fsrvpd.constants import ATTR_AUTO_RECOVERY, Context
from fsrvpd.state import ShadowCopyMachine, Status

STORE = {"backend": "zfs", "name": "tank/vms", "group": "tank", "mountpoint": "/tank/vms"}
TTL = 3600.0


def exposed(machine: ShadowCopyMachine, context: int, now: float, client: str = "10.0.0.1", recover: bool = True):
    """A set taken through Expose at `now` (and RecoveryComplete when `recover`)."""
    machine.set_context(context, client, now)
    scs = machine.start_set(uuid.uuid4(), client, "backup", now)
    for index in range(2):
        machine.add(scs.set_id, uuid.uuid4(), f"share{index}", f"\\\\fs\\share{index}\\",
                    {**STORE, "name": f"tank/share{index}"}, now)
    machine.begin_commit(scs.set_id, now)
    machine.end_commit(scs.set_id, ok=True, now=now)
    machine.begin_expose(scs.set_id, now)
    for copy in scs.copies:
        machine.expose_copy(scs.set_id, copy.copy_id)
    machine.end_expose(scs.set_id, ok=True, now=now)
    if recover:
        machine.recovery_complete(scs.set_id, now)
    return scs


@pytest.mark.parametrize("context", [Context.BACKUP, Context.FILE_SHARE_BACKUP])
def test_non_persistent_sets_are_reaped_once_exposed_for_the_ttl(context):
    machine = ShadowCopyMachine()
    scs = exposed(machine, context, now=1000.0)
    assert scs.exposed_at == 1000.0
    assert machine.reap(1000.0 + TTL - 1, TTL) == []
    assert machine.reap(1000.0 + TTL, TTL) == [scs]
    assert machine.sets == {}


@pytest.mark.parametrize("context", [Context.NAS_ROLLBACK, Context.APP_ROLLBACK,
                                     Context.APP_ROLLBACK | ATTR_AUTO_RECOVERY])
def test_persistent_sets_are_never_reaped(context):
    machine = ShadowCopyMachine()
    scs = exposed(machine, context, now=0.0)
    assert scs.persistent
    assert machine.reap(100 * 365 * 86400.0, TTL) == []
    assert list(machine.sets) == [scs.set_id]


def test_ttl_zero_reaps_nothing():
    machine = ShadowCopyMachine()
    exposed(machine, Context.BACKUP, now=0.0)
    assert machine.reap(1e12, 0) == []


def test_reaping_the_set_in_creation_ends_its_sequence():
    machine = ShadowCopyMachine()
    scs = exposed(machine, Context.BACKUP, now=0.0, recover=False)
    assert machine.context_set and machine.deadline is not None
    assert machine.reap(TTL, TTL) == [scs]
    assert not machine.context_set and machine.deadline is None
    machine.set_context(Context.BACKUP, "10.0.0.2", TTL)  # another client may start


def test_sequence_timer_deletes_an_unrecovered_persistent_set():
    """Persistence starts at RecoveryComplete (MS-FSRVP 3.1.5 deletes every set not Recovered)."""
    machine = ShadowCopyMachine(short_timeout=180)
    scs = exposed(machine, Context.NAS_ROLLBACK, now=0.0, recover=False)
    assert machine.expire(180.0) == [scs]
    recovered = exposed(machine, Context.NAS_ROLLBACK, now=200.0)
    assert machine.expire(1e9) == []
    assert list(machine.sets) == [recovered.set_id]


def test_recovery_complete_leaves_writable_copies_marked_writable_until_storage_says_otherwise():
    machine = ShadowCopyMachine()
    scs = exposed(machine, Context.BACKUP | ATTR_AUTO_RECOVERY, now=0.0, recover=False)
    assert [copy.read_only for copy in scs.copies] == [False, False]
    machine.recovery_complete(scs.set_id, 1.0)
    assert scs.status is Status.RECOVERED
    assert [copy.read_only for copy in scs.copies] == [False, False]


def test_forgetting_copies_deletes_the_set_with_its_last_copy():
    machine = ShadowCopyMachine()
    scs = exposed(machine, Context.BACKUP, now=0.0)
    first, second = scs.copies
    machine.forget_copy(scs.set_id, first.copy_id)
    assert scs.copies == [second] and scs.set_id in machine.sets
    machine.forget_copy(scs.set_id, second.copy_id)
    assert scs.set_id not in machine.sets


def test_exposure_time_survives_a_restart():
    machine = ShadowCopyMachine()
    scs = exposed(machine, Context.BACKUP, now=42.0)
    reloaded = ShadowCopyMachine()
    reloaded.restore([scs.to_dict()], machine.globals_record())
    assert reloaded.sets[scs.set_id].exposed_at == 42.0
    assert reloaded.reap(42.0 + TTL, TTL)[0].set_id == scs.set_id

"""The kill matrix: a backup killed (SIGKILL) at every crash point, restarted, checked and finished.

`KILL_CASES` says, for each crash point (daemon/crashpoints.py) and the flow that reaches it,
what the restarted daemon must hold: the set's status and copies, or nothing.  `run_kill_case`
drives one case against a real daemon on a real pool: arm the point, run the flow until the
daemon kills itself, restart it unarmed, compare state with storage, mounts and shares
(consistency.problems), finish the set as its client would (so a committed set is shown usable:
its share serves the committed bytes), run the next full cycle, and check nothing is left.
tests/test_crash_safety.py runs each case once; bench/kill_matrix.py runs them in rounds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from typing import Callable

import yaml

from fsrvpd.client import FsrvpClient
from fsrvpd.constants import ATTR_AUTO_RECOVERY
from fsrvpd.crashpoints import ENVIRONMENT_VARIABLE
from tests.support.consistency import problems
from tests.support.daemon import NETBIOS_NAME, PASSWORD, USER, FsrvpDaemon, ours_on_storage, wait_until
from tests.support.zfs import zfs

SHARES = ("vms", "sql")
COMMITTED_TEXT = "as committed\n"
WAIT_FOR_DEATH_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class KillCase:
    point: str  # the FSRVPD_CRASH_AT value
    flow: str  # a key of FLOWS
    status: str | None  # the set's status after the restart; None: no set is left
    copies: int = 2  # copies the set still holds
    retained: int = 0  # copies kept by retention

    @property
    def name(self) -> str:
        return self.point if self.flow == "backup" else f"{self.flow}-{self.point}"


KILL_CASES = [
    KillCase("set_context.persisted", "backup", None),
    KillCase("start.persisted", "backup", "Started", copies=0),
    KillCase("add.persisted", "backup", "Added", copies=1),
    KillCase("prepare.persisted", "backup", "Added"),
    KillCase("commit.intent", "backup", "Added"),
    KillCase("commit.snapshotted", "backup", "Added"),  # the snapshots exist, the state does not say so
    KillCase("commit.persisted", "backup", "Committed"),
    KillCase("expose.intent", "backup", "Committed"),
    KillCase("expose.cloned", "backup", "Committed"),  # the clone exists, the state does not say so
    KillCase("expose.cloned:2", "backup", "Committed"),  # one copy fully exposed, the second cloned
    KillCase("expose.published", "backup", "Committed"),
    KillCase("expose.persisted", "backup", "Exposed"),
    KillCase("recovery.intent", "backup", "Recovered"),  # Recovered, but still writable on storage
    KillCase("recovery.read_only", "backup", "Recovered"),
    KillCase("delete.intent", "backup", "Recovered", copies=1),
    KillCase("delete.unpublished", "backup", "Recovered", copies=1),
    KillCase("delete.intent:2", "backup", None),
    KillCase("answered.commit", "backup", "Committed"),  # the Commit answered, zfs-fuse's extra snapshots still there
    KillCase("answered.cleanup", "backup", "Recovered", copies=1),  # a Delete answered, its copy's storage still there
    KillCase("answered.cleanup:2", "backup", None),  # the set's last Delete answered, its storage still there
    KillCase("abort.intent", "abort", None),
    KillCase("set_context.persisted:2", "retry", None),  # the retry dropped the committed set
    KillCase("expire.intent", "timer", None),
    KillCase("reap.intent", "ttl", None),
    KillCase("delete.intent", "retention", "Recovered", copies=1, retained=1),
    KillCase("prune.intent", "retention", "Recovered", copies=1, retained=1),
    KillCase("reconcile.repair", "startup", "Added"),  # killed again while repairing commit.snapshotted
    KillCase("reload.shares_synced", "reload", "Exposed"),  # SIGHUP with a new share and a retention policy
]


def write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


class Backup:
    """One backup as a Windows client runs it, a step at a time, remembering what the server answered."""

    def __init__(self, daemon: FsrvpDaemon, client: FsrvpClient, context: int = ATTR_AUTO_RECOVERY):
        self.daemon, self.client, self.context = daemon, client, context
        self.set_id: uuid.UUID | None = None
        self.copy_ids: dict[str, uuid.UUID] = {}

    def steps(self, until: str = "end") -> list[Callable[[], object]]:
        """The calls of a backup in order, up to (and including) the step named `until`."""
        client = self.client
        named = [
            ("context", lambda: client.set_context(self.context)),
            ("start", self._start),
            *((f"add {share}", lambda share=share: self._add(share)) for share in SHARES),
            ("prepare", lambda: client.prepare(self.set_id)),
            ("commit", lambda: client.commit(self.set_id)),
            ("change the live data", lambda: write(os.path.join(self.daemon.paths["vms"], "f"), "changed\n")),
            ("expose", lambda: client.expose(self.set_id)),
            *((f"map {share}", lambda share=share: client.get_share_mapping(self.set_id, self.copy_ids[share], share))
              for share in SHARES),
            ("recovery complete", lambda: client.recovery_complete(self.set_id)),
            *((f"delete {share}", lambda share=share: client.delete_share_mapping(self.set_id, self.copy_ids[share],
                                                                                  share)) for share in SHARES),
        ]
        names = [name for name, _ in named]
        return [step for _, step in named[:names.index(until) + 1 if until in names else len(named)]]

    def _start(self) -> None:
        self.set_id = self.client.start_shadow_copy_set()

    def _add(self, share: str) -> None:
        self.copy_ids[share] = self.client.add_to_shadow_copy_set(self.set_id, share)


def _waiting(daemon: FsrvpDaemon) -> Callable[[], object]:
    """A step that waits for the daemon's own timers to reach the armed crash point."""
    return lambda: daemon.process.wait(WAIT_FOR_DEATH_SECONDS)


def _flow_steps(flow: str, daemon: FsrvpDaemon, client: FsrvpClient) -> list[Callable[[], object]]:
    if flow in ("backup", "startup"):
        return Backup(daemon, client).steps()
    if flow == "abort":
        backup = Backup(daemon, client)
        return backup.steps(until="expose") + [lambda: client.abort(backup.set_id)]
    if flow == "retry":
        return Backup(daemon, client).steps(until="commit") + [lambda: client.set_context(ATTR_AUTO_RECOVERY)]
    if flow == "timer":
        return Backup(daemon, client).steps(until="expose") + [_waiting(daemon)]
    if flow == "ttl":
        return Backup(daemon, client).steps(until="recovery complete") + [_waiting(daemon)]
    if flow == "retention":  # keep_last 1 for vms: the second backup's DeleteShareMapping prunes the first's
        return Backup(daemon, client).steps() + Backup(daemon, client).steps()
    if flow == "reload":
        return Backup(daemon, client).steps(until="map sql") + [lambda: reload_changed(daemon), _waiting(daemon)]
    raise ValueError(flow)


def reload_changed(daemon: FsrvpDaemon) -> None:
    """A new share and a retention policy in the file, then SIGHUP (the restart reads the file too)."""
    daemon.datasets["db"], daemon.paths["db"] = daemon.pool.dataset("db")
    daemon.config["shares"]["db"] = {"path": daemon.paths["db"], "backend": "zfs"}
    daemon.config["shares"]["vms"]["retention"] = {"keep_last": 1}
    daemon.config_path.write_text(yaml.safe_dump(daemon.config))
    daemon.process.send_signal(signal.SIGHUP)


def configure(daemon: FsrvpDaemon, flow: str) -> None:
    """The config a flow needs: short timers for the timer flows, a retention policy for retention."""
    if flow == "timer":
        daemon.config["timers"]["sequence_seconds"] = 2
    if flow == "ttl":
        daemon.config["timers"]["exposure_ttl_seconds"] = 2
    if flow == "retention":
        daemon.config["shares"]["vms"]["retention"] = {"keep_last": 1}
    daemon.config["timers"]["cleanup_quiet_seconds"] = 0  # storage work after answers at once: points in order


def run_until_killed(daemon: FsrvpDaemon, point: str, steps: list[Callable[[], object]]) -> None:
    """Run the steps against a daemon armed at `point` until it kills itself there."""
    daemon.env[ENVIRONMENT_VARIABLE] = point
    try:
        daemon.start()
        for step in steps:
            try:
                step()
            except Exception:  # the call that reached the crash point lost its connection
                break
            if daemon.process.poll() is not None:
                break
        status = daemon.wait_for_exit(WAIT_FOR_DEATH_SECONDS)
    finally:
        del daemon.env[ENVIRONMENT_VARIABLE]
    assert status == -signal.SIGKILL, f"fsrvpd did not die at {point} (exit {status}):\n{daemon.log()}"
    assert f"crash point {point.partition(':')[0]} reached" in daemon.log()


def crash_during_start(daemon: FsrvpDaemon, point: str) -> None:
    """Start a daemon armed at `point` that dies while it reconciles, before it listens."""
    daemon.env[ENVIRONMENT_VARIABLE] = point
    try:
        daemon.start()
    except RuntimeError:
        assert daemon.wait_for_exit() == -signal.SIGKILL
    else:
        raise AssertionError(f"fsrvpd started although armed at {point}")
    finally:
        del daemon.env[ENVIRONMENT_VARIABLE]


def finish(daemon: FsrvpDaemon, client: FsrvpClient, scs: dict) -> None:
    """Take a set found after the restart to its end as its client would, checking it serves the
    committed data once exposed (the ids come from the state: the client may have missed an answer)."""
    set_id, status = uuid.UUID(scs["set_id"]), scs["status"]
    copies = {copy["share"]: uuid.UUID(copy["copy_id"]) for copy in scs["copies"]}
    if status in ("Started", "Added"):
        for share in SHARES:
            if share not in copies:
                copies[share] = client.add_to_shadow_copy_set(set_id, share)
        client.prepare(set_id)
        client.commit(set_id)
        write(os.path.join(daemon.paths["vms"], "f"), "changed\n")
    if status in ("Started", "Added", "Committed"):
        client.expose(set_id)
    for share, copy_id in copies.items():
        assert client.get_share_mapping(set_id, copy_id, share).copy_id == copy_id
        listing = daemon.smbclient(f"{share}@{{{copy_id}}}", "get f -" if share == "vms" else "ls")
        assert (COMMITTED_TEXT in listing) if share == "vms" else ("NT_STATUS" not in listing), listing
    if status != "Recovered":
        client.recovery_complete(set_id)
    for share, copy_id in copies.items():
        client.delete_share_mapping(set_id, copy_id, share)


def full_cycle(client: FsrvpClient) -> None:
    mappings = client.backup_cycle(list(SHARES), auto_recovery=True)
    client.recovery_complete(mappings[0].set_id)
    for share, mapping in zip(SHARES, mappings):
        client.delete_share_mapping(mapping.set_id, mapping.copy_id, share)


def run_kill_case(daemon: FsrvpDaemon, case: KillCase) -> None:
    """One case end to end (see the module docstring); raises AssertionError on any inconsistency."""
    timers = dict(daemon.config["timers"])
    configure(daemon, case.flow)
    write(os.path.join(daemon.paths["vms"], "f"), COMMITTED_TEXT)
    client = FsrvpClient("127.0.0.1", daemon.port, USER, PASSWORD, server_name=NETBIOS_NAME, timeout=60)
    steps = _flow_steps(case.flow, daemon, client)
    steps.insert(0, client.connect)
    if case.flow == "startup":
        run_until_killed(daemon, "commit.snapshotted", steps)
        crash_during_start(daemon, case.point)
    else:
        run_until_killed(daemon, case.point, steps)
    client.close()
    daemon.config["timers"] = timers  # short timers would race a slow machine through the rest
    daemon.start()
    sets, retained = daemon.state()
    found = problems(daemon)
    assert found == [], f"after a crash at {case.point}: {found}\n{daemon.log()}"
    held = [(scs["status"], len(scs["copies"])) for scs in sets]
    assert held == ([] if case.status is None else [(case.status, case.copies)]), daemon.log()
    assert len(retained) == case.retained
    with daemon.client() as client:
        for scs in sets:
            finish(daemon, client, scs)
        full_cycle(client)
    assert problems(daemon) == []
    left = ours_on_storage(daemon.pool)
    assert len(left) == (2 if case.flow in ("retention", "reload") else 0), left  # vms's newest retained copy
    if case.flow == "reload":
        with daemon.client() as client:
            assert client.is_path_supported("db")[0]  # the new share of the reloaded file


def destroy_behind_its_back(dataset: str) -> None:
    """`zfs destroy -R -f` as an admin would, retried while zfs-fuse still calls a fresh mount busy."""
    def destroyed() -> bool:
        try:
            zfs("destroy", "-R", "-f", dataset)
        except RuntimeError as exc:
            if "busy" not in str(exc):
                raise
            return False
        return True
    assert wait_until(destroyed), f"{dataset} stayed busy"

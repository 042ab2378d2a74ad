"""fsrvpd under systemd, without systemd as PID 1 (this sandbox has none): each test plays the part
of the service manager with the real mechanism systemd uses.

* Notifications: the test opens the datagram socket itself, names it in $NOTIFY_SOCKET (with
  $WATCHDOG_USEC) as systemd does, and reads what the daemon sends: READY=1 only once the SMB
  port and the admin socket answer, WATCHDOG=1 at half the interval, RELOADING=1/READY=1 around
  a reload, STOPPING=1 at SIGTERM.
* Journal: a real systemd-journald runs in a private mount namespace (tmpfs over its runtime and
  storage directories, nothing of the host's journal touched); the daemon's standard error is a
  journal stream made by systemd-cat, with $JOURNAL_STREAM naming it as systemd would, so fsrvpd
  logs through systemd-python's JournalHandler and `journalctl -o json` shows the fields.
* SIGHUP and SIGTERM are the signals systemd sends (ExecReload, KillSignal).
The unit file itself is checked with `systemd-analyze verify` where fsrvpd is installed from the
Debian package (tests/test_package.py): verify needs the programs it names to exist.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from fsrvpd import messages as m
from fsrvpd.constants import HResult
from fsrvpd.sdnotify import Notifier
from tests.support.daemon import FsrvpDaemon, ours_on_storage

pytestmark = pytest.mark.zfs
WAIT_SECONDS = 30.0


class NotifySocket:
    """The service manager's end of sd_notify: every datagram, with what was true when it came."""

    def __init__(self, path: str, daemon: FsrvpDaemon):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.daemon = daemon
        self.messages: list[tuple[float, dict[str, str], bool]] = []  # time, fields, SMB port answering
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields, self.daemon._listening()))

    def wait_for(self, key: str, count: int = 1) -> list[tuple[float, dict[str, str], bool]]:
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            found = [message for message in self.messages if key in message[1]]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count} x {key} in {self.messages}\n{self.daemon.log()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notified_daemon(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    notify = NotifySocket(str(tmp_path / "notify.sock"), daemon)
    daemon.env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    yield daemon, notify
    daemon.stop()
    notify.close()


def test_ready_only_when_serving_then_watchdog_reload_and_stopping(notified_daemon):
    daemon, notify = notified_daemon
    daemon.start()
    (_, ready, port_answered), = notify.wait_for("READY")
    assert port_answered, "READY=1 came before the SMB port answered"
    assert "serving 1 share(s)" in ready["STATUS"] and ready["MAINPID"] == str(daemon.process.pid)
    assert daemon.ctl("status").returncode == 0
    pings = notify.wait_for("WATCHDOG", count=4)
    gaps = [later[0] - earlier[0] for earlier, later in zip(pings, pings[1:])]
    assert all(0.2 < gap < 1.0 for gap in gaps), gaps  # half of WATCHDOG_USEC, with slack for a busy machine

    daemon.process.send_signal(signal.SIGHUP)
    reloading, = notify.wait_for("RELOADING")
    assert int(reloading[1]["MONOTONIC_USEC"]) > 0
    assert notify.wait_for("READY", count=2)[1][0] > reloading[0]

    assert daemon.stop() == 0
    assert "STOPPING" in notify.wait_for("STOPPING")[0][1]


def test_sighup_adds_and_removes_shares_without_dropping_a_connected_client(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path).start()
    try:
        with daemon.client() as client:
            assert client.get_supported_version() == (1, 1)
            new_dataset, new_path = zfs_pool.dataset("newshare")
            del daemon.config["shares"]["sql"]
            daemon.config["shares"]["newshare"] = {"path": new_path}
            daemon.config_path.write_text(yaml.safe_dump(daemon.config))
            daemon.process.send_signal(signal.SIGHUP)
            wait_for_log(daemon, "configuration reloaded")

            assert client.is_path_supported("newshare") == (True, daemon.config["server"]["netbios_name"])
            refused = client.call(m.IsPathSupportedRequest(client.unc("sql")))
            assert refused.result == HResult.FSRVP_E_OBJECT_NOT_FOUND
            set_id = client.backup_cycle(["newshare"])[0].set_id  # the same connection, a whole backup
            client.abort(set_id)
        shares = subprocess.run(["smbclient", "-p", str(daemon.port), "-U", "backup%backup", "-L", "127.0.0.1"],
                                capture_output=True, text=True, timeout=60).stdout.lower()
        assert "newshare" in shares and "sql" not in shares, shares

        (tmp_path / "fsrvpd.yaml").write_text("shares: [broken\n")
        reload = daemon.ctl("reload")
        assert reload.returncode == 1 and "fsrvpd.yaml:" in reload.stderr, reload
        status = json.loads(daemon.ctl("--json", "status").stdout)
        assert status["last_reload"]["ok"] is False and "newshare" in status["shares"]
        assert daemon.alive()
    finally:
        daemon.stop()
    assert ours_on_storage(zfs_pool) == []


def wait_for_log(daemon: FsrvpDaemon, text: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while text not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)


def added_set(client, share: str) -> uuid.UUID:
    """SetContext, StartShadowCopySet, AddToShadowCopySet: a set ready to commit."""
    client.set_context(0)
    set_id = client.start_shadow_copy_set()
    client.add_to_shadow_copy_set(set_id, share)
    return set_id


def test_sigterm_lets_the_commit_in_flight_finish_and_answer(zfs_pool, tmp_path, samba_clients):
    """A `zfs snapshot` that takes 3 s (a wrapper in front of the real zfs on the daemon's PATH)."""
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    started = tmp_path / "snapshot-started"
    (wrappers / "zfs").write_text(f'#!/bin/sh\nif [ "$1" = snapshot ] && [ "$2" != fsrvpd-probe ]; then\n'
                                  f'    touch {started}; sleep 3\nfi\nexec {shutil.which("zfs")} "$@"\n')
    (wrappers / "zfs").chmod(0o755)
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    daemon.env = {"PATH": f"{wrappers}:{os.environ['PATH']}"}
    daemon.start()
    try:
        with daemon.client() as client:
            set_id = added_set(client, "vms")
            answers = []
            commit = threading.Thread(target=lambda: answers.append(
                client.call(m.CommitShadowCopySetRequest(set_id, 60000)).result))
            commit.start()
            deadline = time.monotonic() + WAIT_SECONDS
            while not started.exists():
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.05)
            daemon.process.send_signal(signal.SIGTERM)
            commit.join(timeout=WAIT_SECONDS)
            assert answers == [HResult.S_OK]
        assert daemon.process.wait(timeout=WAIT_SECONDS) == 0
        daemon.process = None
        daemon.start()  # the committed set is there after the restart, and goes on
        sets = json.loads(daemon.ctl("--json", "sets").stdout)
        assert [(s["set_id"], s["status"]) for s in sets] == [(str(set_id), "Committed")]
        with daemon.client() as client:
            client.expose(set_id)
            client.abort(set_id)
    finally:
        daemon.stop()
    assert ours_on_storage(zfs_pool) == []


JOURNAL_NAMESPACE = r"""
for dir in /run/systemd/journal /run/log /var/log/journal; do
    if [ -d "$dir" ] || [ "$dir" != /var/log/journal ]; then mkdir -p "$dir"; mount -t tmpfs tmpfs "$dir"; fi
done
/lib/systemd/systemd-journald >/dev/null 2>&1 &
echo $! > "$JOURNALD_PID"
while [ ! -S /run/systemd/journal/stdout ]; do sleep 0.05; done
exec systemd-cat -t fsrvpd sh -c 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"' sh "$@"
"""


def journal(pid: int, *match: str) -> list[dict]:
    """journalctl -o json in the daemon's mount namespace (where its journald runs)."""
    out = subprocess.run(["nsenter", "-t", str(pid), "-m", "journalctl", "--no-pager", "-o", "json", *match],
                         capture_output=True, text=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="session")
def journald() -> None:
    """systemd-journald, systemd-cat and journalctl from Debian's systemd package (installed once if missing)."""
    if not (os.path.exists("/lib/systemd/systemd-journald") and shutil.which("systemd-cat")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"], check=True, env=env)


def test_records_reach_journald_with_the_call_fields(zfs_pool, tmp_path, samba_clients, journald):
    import systemd.journal  # noqa: F401 - the test extra installs systemd-python; fail here, not in the daemon
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    daemon.config["logging"]["level"] = "info"
    daemon.env = {"JOURNALD_PID": str(tmp_path / "journald.pid")}
    daemon.wrapper = ["unshare", "--mount", "--propagation", "slave", "sh", "-c", JOURNAL_NAMESPACE, "journal"]
    daemon.start()
    try:
        with daemon.client() as client:
            set_id = added_set(client, "vms")
            assert client.call(m.CommitShadowCopySetRequest(uuid.uuid4(), 1000)).result == \
                HResult.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH
            client.abort(set_id)
        deadline = time.monotonic() + WAIT_SECONDS
        while not (records := journal(daemon.process.pid, f"FSRVP_SET_ID={set_id}")):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.2)
        added = next(r for r in records if "added share vms" in r["MESSAGE"])
        assert added["FSRVP_OPERATION"] == "AddToShadowCopySet"
        assert added["FSRVP_CLIENT"] == "127.0.0.1" and added["FSRVP_PRINCIPAL"].endswith("\\backup")
        assert added["FSRVP_SHARE"].endswith("\\vms\\") and added["SYSLOG_IDENTIFIER"] == "fsrvpd"
        refusals = [r["MESSAGE"] for r in journal(daemon.process.pid, "FSRVP_HRESULT=0x80042501")
                    if r["FSRVP_OPERATION"] == "CommitShadowCopySet"]
        assert any("refused: FSRVP_E_SHADOWCOPYSET_ID_MISMATCH" in message for message in refusals), refusals
        assert daemon.log() == ""  # nothing went to standard error instead
    finally:
        daemon.stop()
        journald = tmp_path / "journald.pid"
        if journald.exists():
            os.kill(int(journald.read_text()), signal.SIGTERM)


def test_notifier_speaks_to_abstract_sockets_and_only_feeds_its_own_watchdog():
    name = f"fsrvpd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
        notifier.ready("serving")
        assert manager.recv(4096).decode().splitlines()[:2] == ["READY=1", "STATUS=serving"]
    assert notifier.watchdog_interval == 1.5
    assert Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval \
        is None  # the watchdog is another process's
    Notifier({}).ready("not under systemd: nothing is sent, nothing fails")


def test_plain_stderr_lines_when_not_under_systemd(daemon):
    """The `daemon` fixture runs fsrvpd with a log file as standard error and no $JOURNAL_STREAM."""
    assert " INFO fsrvpd: fsrvpd " in daemon.log() and "serving" in daemon.log()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))

"""The throwaway VM the LVM tests run in: the build machines' kernel has no device-mapper.

virtme-ng boots Debian's stock kernel (linux-image-amd64) in QEMU on a read-only view of this
machine's own root file system (writable throw-away overlays on /tmp, /etc, /var...), so the guest
has this checkout, its .venv, lvm2, rpcclient and smbclient. It has no network: everything is
installed on the host first (`ensure_vm_tools`, idempotent). QEMU runs in software emulation
(TCG): nested KVM hangs these guests right after boot. In the guest, the device-mapper modules are
loaded and lvm2 gets a configuration for a system without udev (LVM_SYSTEM_DIR), before anything
else runs.

As a pytest plugin: a test marked `vm` does not run on the host. It becomes a `GuestTest` that
reports the outcome of the same test run inside the guest. The first one to run boots ONE VM for
all selected `vm` tests; pytest there appends one JSON line per test phase to a file in a
directory shared with the host (--rwdir), which the host reads back. Inside the guest
(FSRVPD_IN_VM=1) the tests are ordinary tests.

As a command, for trying things by hand (the LVM demo, for one): `python -m tests.support.vm`
opens a shell in the guest, in this checkout; `python -m tests.support.vm 'COMMAND'` runs COMMAND
there and exits with its status.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.daemon import ensure_samba_clients

REPO = Path(__file__).resolve().parents[2]
IN_VM = os.environ.get("FSRVPD_IN_VM") == "1"
RESULTS_ENV = "FSRVPD_VM_RESULTS"
# qemu for the VM, a kernel and busybox for virtme-ng's initramfs, and what the guest tests use.
HOST_PACKAGES = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "linux-image-amd64": None,
    "busybox-static": "/bin/busybox",
    "lvm2": "/sbin/lvm",
    "thin-provisioning-tools": "/usr/sbin/thin_check",
    "xfsprogs": "/sbin/mkfs.xfs",
    "e2fsprogs": "/sbin/mkfs.ext4",
}
MEMORY = "1536M"  # the guest's /tmp (loop files, Python in RAM) lives in it
BOOT_SECONDS = 240  # until the guest runs its first command (about 30 s when the machine is not busy)
OUTPUT_CHARS = 30000  # of each test phase's output sent back from the guest (the daemon's log, mostly)
GUEST_SECONDS = 1200  # a hang inside the guest must not hang the suite
# lvm2 without udev: it creates /dev nodes itself and does not wait for udev events. PVs are only
# ever loop devices there; not probing the rest (a CD drive, 9p) saves time on every command.
GUEST_LVM_CONF = """\
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
devices { obtain_device_list_from_udev = 0 global_filter = [ "a|^/dev/loop[0-9]+$|", "r|.*|" ] }
"""
GUEST_LVM_DIR = "/tmp/fsrvpd-lvm-etc"
PYTHON_IN_RAM = "/tmp/fsrvpd-python"
BOOTED_MARK = "booted"


class NoVm(Exception):
    """No VM can be started on this machine (the tools cannot be installed)."""


def _kernel() -> str | None:
    """The newest kernel in /boot (versions compared number by number)."""
    kernels = sorted(glob.glob("/boot/vmlinuz-*"),
                     key=lambda path: [(0, int(part), "") if part.isdigit() else (1, 0, part)
                                       for part in re.split(r"(\d+)", path)])
    return kernels[-1] if kernels else None


def _vng() -> Path:
    return Path(sys.executable).parent / "vng"


def ensure_vm_tools() -> None:
    """Install what booting the VM and the guest tests need, where missing (apt-get, pip)."""
    missing = [package for package, path in HOST_PACKAGES.items()
               if (path is None and _kernel() is None) or (path is not None and not os.path.exists(path))]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if missing:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
            subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq",
                            "--no-install-recommends", *missing], check=True, env=env)
        if not _vng().exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "virtme-ng"], check=True)
        ensure_samba_clients()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise NoVm(f"cannot install the VM tools ({', '.join(missing) or 'virtme-ng'}): {exc}") from exc
    if _kernel() is None:
        raise NoVm("no kernel in /boot to boot the VM with")


def python_archive(shared_dir: str) -> tuple[str, list[str]]:
    """A tar of this interpreter's standard library and the venv's packages, compiled bytecode included.

    The guest unpacks it into RAM and binds it over the originals: every file lookup on the guest's
    uncached 9p root is a round trip to the host, which makes each Python start in the guest cost
    half a minute; from RAM it is a second or two.
    """
    paths = sysconfig.get_paths()
    directories = sorted({paths["stdlib"], paths["purelib"]})
    archive = os.path.join(shared_dir, "python.tar")
    stdlib = paths["stdlib"].lstrip("/")
    skipped = [f"--exclude={stdlib}/{name}" for name in ("test", "site-packages", "config-*")]  # unused, large
    subprocess.run(["tar", "-cf", archive, "-C", "/", *skipped, *(directory.lstrip("/") for directory in directories)],
                   check=True)
    return archive, directories


def write_guest_script(command: str, shared_dir: str) -> str:
    """The script the guest runs: device-mapper, lvm2 without udev, Python from RAM, a mark that it
    booted, then COMMAND.

    It goes in a file: the guest gets its command on the kernel command line, which is short
    (2 KiB; a longer one panics Debian's kernel at boot).
    """
    archive, python_directories = python_archive(shared_dir)
    path = os.path.join(shared_dir, "guest.sh")
    with open(path, "w") as script:
        script.write("\n".join([
            "set -e",
            "modprobe -a loop dm-mod dm-thin-pool dm-snapshot",
            f"mkdir -p {PYTHON_IN_RAM} && tar -xf {shlex.quote(archive)} -C {PYTHON_IN_RAM}",
            *(f"mount --bind {PYTHON_IN_RAM}{shlex.quote(directory)} {shlex.quote(directory)}"
              for directory in python_directories),
            f"mkdir -p {GUEST_LVM_DIR}",
            f"cat > {GUEST_LVM_DIR}/lvm.conf <<'EOF'\n{GUEST_LVM_CONF}EOF",
            f"export LVM_SYSTEM_DIR={GUEST_LVM_DIR} LVM_SUPPRESS_FD_WARNINGS=1 FSRVPD_IN_VM=1 PYTHONDONTWRITEBYTECODE=1",
            "ip link set lo up 2>/dev/null || true",
            f"touch {shlex.quote(os.path.join(shared_dir, BOOTED_MARK))}",
            "set +e",
            command,
            "",
        ]))
    return path


def vng_command(command: str, shared_dir: str) -> list[str]:
    """--verbose: the kernel's console goes to the log, which tells where a guest got stuck."""
    script = write_guest_script(command, shared_dir)
    return [str(_vng()), "--run", _kernel(), "--disable-kvm", "--disable-microvm", "--memory", MEMORY, "--verbose",
            "--rwdir", shared_dir, "--cwd", str(REPO), "--exec", f"bash {shlex.quote(script)}"]


def _vng_env() -> dict[str, str]:
    """vng runs its helpers (virtme-run) from PATH: put its own directory first."""
    return {**os.environ, "PATH": f"{_vng().parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def run_in_vm(command: str, shared_dir: str, log_path: str, timeout: float = GUEST_SECONDS) -> int:
    """Boot the VM, run COMMAND in the checkout, return its exit status (console output to log_path).

    Emulated guests very rarely stall before their first command; one that has not started it
    within BOOT_SECONDS is killed and booted once more.
    """
    for attempt in range(2):
        with open(log_path, "ab") as log:
            vm = subprocess.Popen(vng_command(command, shared_dir), stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True, env=_vng_env())
        started = time.monotonic()
        while vm.poll() is None:
            elapsed = time.monotonic() - started
            stalled = elapsed > BOOT_SECONDS and not os.path.exists(os.path.join(shared_dir, BOOTED_MARK))
            if stalled or elapsed > timeout:
                os.killpg(vm.pid, signal.SIGKILL)
                vm.wait()
                if stalled and attempt == 0:
                    break
                return -1
            time.sleep(1)
        else:
            return vm.returncode
    return -1


# -- pytest: run the `vm` tests in one guest -------------------------------------------------------

class GuestRun:
    """One VM running pytest on the selected `vm` tests; outcomes per node id, read back once."""

    def __init__(self, nodeids: list[str]):
        self.nodeids = nodeids
        self.phases: dict[str, list[dict]] | None = None
        self.problem = ""
        self.skip_reason = ""
        self.seconds = 0.0

    def summary(self) -> str:
        """How long the VM took, and how much of it went to the tests themselves."""
        in_tests = sum(phase["duration"] for phases in self.phases.values() for phase in phases)
        slowest = sorted(((sum(p["duration"] for p in phases), nodeid) for nodeid, phases in self.phases.items()),
                         reverse=True)[:3]
        return (f"{len(self.phases)} test(s) ran in one VM in {self.seconds:.0f} s: {in_tests:.0f} s in the tests, "
                f"the rest booting and starting pytest; slowest: "
                + ", ".join(f"{nodeid.split('::')[-1]} {seconds:.0f} s" for seconds, nodeid in slowest))

    def outcome(self, nodeid: str) -> list[dict]:
        if self.phases is None:
            self._run()
        return self.phases.get(nodeid, [])

    def _run(self) -> None:
        self.phases = {}
        try:
            ensure_vm_tools()
        except NoVm as exc:
            self.skip_reason = str(exc)
            return
        shared = tempfile.mkdtemp(prefix="fsrvpd-vm-")
        results, guest_log, console = (os.path.join(shared, name) for name in ("results.jsonl", "pytest.log",
                                                                                "console.log"))
        pytest_command = (f"{RESULTS_ENV}={shlex.quote(results)} {shlex.quote(sys.executable)} -m pytest "
                          f"-p no:cacheprovider -q -rA {' '.join(shlex.quote(n) for n in self.nodeids)} "
                          f"> {shlex.quote(guest_log)} 2>&1")
        started = time.monotonic()
        status = run_in_vm(pytest_command, shared, console)
        self.seconds = time.monotonic() - started
        if os.path.exists(results):
            with open(results) as lines:
                for line in lines:
                    phase = json.loads(line)
                    self.phases.setdefault(phase["nodeid"], []).append(phase)
        if not os.path.exists(os.path.join(shared, BOOTED_MARK)):
            self.problem = f"the VM did not boot (exit {status}); its console:\n{_tail(console)}"
        elif status not in (0, 1):
            self.problem = f"pytest in the VM exited {status}; its output:\n{_tail(guest_log)}\n{_tail(console)}"
        if self.problem:
            self.problem += f"\n(everything is kept in {shared})"
        else:
            shutil.rmtree(shared)


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as text:
            return "".join(text.readlines()[-lines:])
    except OSError:
        return f"({path} is missing)"


class GuestFailure(Exception):
    pass


class GuestTest(pytest.Item):
    """The host's stand-in for a `vm` test: the outcome of the same test inside the guest."""

    def __init__(self, *, guest: GuestRun, **kwargs):
        super().__init__(**kwargs)
        self.guest = guest

    def runtest(self) -> None:
        phases = self.guest.outcome(self.nodeid)
        if self.guest.skip_reason:
            pytest.skip(f"NO VM, LVM TESTS DID NOT RUN: {self.guest.skip_reason}")
        failed = [phase for phase in phases if phase["outcome"] == "failed"]
        if failed:
            output = "".join(phase.get("stdout", "") for phase in phases)  # e.g. the daemon's log
            raise GuestFailure("\n".join(f"in the VM, {phase['when']} failed:\n{phase['longrepr']}" for phase in failed)
                               + (f"\n--- the test's output in the VM ---\n{output}" if output else ""))
        skipped = [phase for phase in phases if phase["outcome"] == "skipped"]
        if skipped:
            pytest.skip(f"skipped in the VM: {skipped[0]['longrepr']}")
        if not any(phase["when"] == "call" and phase["outcome"] == "passed" for phase in phases):
            raise GuestFailure(f"no result from the VM for this test. {self.guest.problem}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GuestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, self.name


GUEST_RUN = pytest.StashKey[GuestRun]()


def pytest_terminal_summary(terminalreporter, config):
    guest = config.stash.get(GUEST_RUN, None)
    if guest is not None and guest.phases:
        terminalreporter.write_line(guest.summary())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """On the host, stand in for every selected `vm` test; all of them share one guest run."""
    if IN_VM:
        return
    in_vm = [item for item in items if item.get_closest_marker("vm")]
    if not in_vm:
        return
    guest = config.stash[GUEST_RUN] = GuestRun([item.nodeid for item in in_vm])
    for index, item in enumerate(items):
        if item.get_closest_marker("vm"):
            stand_in = GuestTest.from_parent(item.parent, name=item.name, guest=guest)
            stand_in.own_markers.extend(item.own_markers)
            items[index] = stand_in


def pytest_runtest_logreport(report):
    """In the guest, hand every phase's outcome to the host through the shared directory."""
    results = os.environ.get(RESULTS_ENV)
    if not IN_VM or not results:
        return
    longrepr = report.longreprtext if report.failed else (str(report.longrepr[2]) if report.skipped and
                                                          isinstance(report.longrepr, tuple) else "")
    with open(results, "a") as out:
        out.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                              "longrepr": longrepr, "duration": report.duration,
                              "stdout": report.capstdout[-OUTPUT_CHARS:]}) + "\n")


def main(argv: list[str]) -> int:
    ensure_vm_tools()
    command = " ".join(argv) if argv else "exec bash -i"
    shared = tempfile.mkdtemp(prefix="fsrvpd-vm-")
    try:
        return subprocess.run(vng_command(command, shared), env=_vng_env()).returncode
    finally:
        shutil.rmtree(shared, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

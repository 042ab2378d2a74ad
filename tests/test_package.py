"""The Debian package: `make deb` builds it (and the wheel and sdist), and it installs into a clean
Debian 12 root made by debootstrap, with its dependencies from Debian's own archive.

In that root the installed fsrvpd runs for real: `--version`, `check-config` on the shipped example,
`systemd-analyze verify` of the shipped unit (systemd is installed there for it), and the daemon
itself, on Debian's python3-impacket, answering an FSRVP call from this host and `fsrvpctl status`.
Installing starts and enables nothing; removing and purging leave no program behind.

The minbase root is debootstrapped once per machine and kept as a tarball under /var/cache (about
a minute the first time); each run unpacks a fresh copy and deletes it afterwards.  The archive is
the one this host's apt uses.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fsrvpd.cli import nt_hash
from fsrvpd.client import FsrvpClient
from tests.support.daemon import PASSWORD, USER, free_port

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
CACHE = Path("/var/cache/fsrvpd-tests") / f"{SUITE}-minbase.tar"
START_SECONDS = 60.0
pytestmark = pytest.mark.package


def run(*argv: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def host_mirror() -> str:
    """The Debian archive this host's apt uses for SUITE (deb822 or one-line sources)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split():
                return fields["URIs"].split()[0]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["deb"] and SUITE in parts:
            return next(part for part in parts[1:] if "://" in part)
    raise RuntimeError("no Debian archive for bookworm in this host's apt sources")


def ensure_debootstrap() -> None:
    if shutil.which("debootstrap") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run("apt-get", "update", "-qq", env=env)
        run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap", env=env)


def clean_root(directory: Path) -> Path:
    """A fresh minbase Debian 12 in `directory`/root, from the cached debootstrap tarball."""
    root = directory / "root"
    if not CACHE.exists():
        ensure_debootstrap()
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        staging = directory / "debootstrap"
        run("debootstrap", "--variant=minbase", SUITE, str(staging), host_mirror(), timeout=900)
        run("tar", "-C", str(staging), "-cf", f"{CACHE}.part", ".")
        os.replace(f"{CACHE}.part", CACHE)
        shutil.rmtree(staging)
    root.mkdir()
    run("tar", "-C", str(root), "-xf", str(CACHE))
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    return root


def in_root(root: Path, script: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a shell script inside the root, with its own /proc, in a mount namespace of its own."""
    argv = ["unshare", "--mount", "--fork", "sh", "-c",
            f'mount -t proc proc "{root}/proc" && exec chroot "{root}" /bin/sh -ec "$0"', script]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C",
           **{key: value for key, value in os.environ.items() if key.lower().endswith("_proxy")}}
    if check:
        return run(*argv, timeout=timeout, env=env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def package() -> Path:
    run("make", "deb", cwd=REPO, timeout=900)
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    for built in (f"fsrvpd-{version}-py3-none-any.whl", f"fsrvpd-{version}.tar.gz", f"fsrvpd_{version}-1_all.deb"):
        assert (REPO / "dist" / built).is_file(), built
    return REPO / "dist" / f"fsrvpd_{version}-1_all.deb"


def test_package_installs_into_a_clean_debian_and_its_daemon_serves(package, tmp_path):
    root = clean_root(tmp_path)
    shutil.copy(package, root / "tmp/fsrvpd.deb")
    in_root(root, "apt-get update -qq && apt-get install -y -qq --no-install-recommends /tmp/fsrvpd.deb systemd")

    version = in_root(root, "fsrvpd --version").stdout.strip()
    assert re.fullmatch(r"fsrvpd \d+\.\d+\.\d+", version), version
    assert "OK" in in_root(root, "fsrvpd check-config -c /etc/fsrvpd/fsrvpd.example.yaml").stdout
    in_root(root, "systemd-analyze verify /lib/systemd/system/fsrvpd.service")
    assert in_root(root, "systemctl is-enabled fsrvpd.service", check=False).stdout.strip() == "disabled"
    assert in_root(root, "ls /usr/lib/python3/dist-packages/fsrvpd/__pycache__").stdout  # postinst compiled
    assert in_root(root, "dpkg-query -W -f '${Status}' fsrvpd").stdout == "install ok installed"

    daemon_serves_from_the_package(root)

    in_root(root, "dpkg --purge fsrvpd")
    assert not (root / "usr/bin/fsrvpd").exists()
    assert not (root / "usr/lib/python3/dist-packages/fsrvpd").exists()
    shutil.rmtree(root)


def daemon_serves_from_the_package(root: Path) -> None:
    port = free_port()
    config = {"server": {"netbios_name": "PKGTEST"}, "front_door": {"listen": "127.0.0.1", "port": port},
              "users": {USER: {"nt_hash": nt_hash(PASSWORD)}}, "state_dir": "/var/lib/fsrvpd",
              "admin": {"socket": "/run/fsrvpd/admin.sock"}}
    (root / "etc/fsrvpd/fsrvpd.yaml").write_text(yaml.safe_dump(config))
    log_path = root / "tmp/fsrvpd.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(["unshare", "--mount", "--fork", "sh", "-c",
                                   f'mount -t proc proc "{root}/proc" && echo $$ > "{root}/tmp/fsrvpd.pid" && '
                                   f'exec chroot "{root}" fsrvpd run'],
                                  stdout=log, stderr=subprocess.STDOUT, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        deadline = time.monotonic() + START_SECONDS
        while b"serving" not in log_path.read_bytes():
            assert daemon.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        with FsrvpClient("127.0.0.1", port, USER, PASSWORD, server_name="PKGTEST", timeout=30) as client:
            assert client.get_supported_version() == (1, 1)
        status = in_root(root, "fsrvpctl status")
        assert f"port {port}" in status.stdout, status.stdout
    finally:
        os.kill(int((root / "tmp/fsrvpd.pid").read_text()), signal.SIGTERM)  # fsrvpd itself, after the execs
        assert daemon.wait(timeout=60) == 0, log_path.read_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))

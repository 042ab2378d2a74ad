"""A real ZFS for the tests: zfs-fuse installed and answering, and throw-away pools on sparse files.

Nothing here imitates zfs: tests run the same commands the daemon runs. Setup is idempotent, so a
fresh CI machine (no zfs-fuse yet) and a developer's machine (daemon already running, other pools
imported) both work, and no test touches a pool it did not create.

Fixtures: `zfs_daemon` (session: zfs usable; a zfs-fuse this session started is stopped at the
end) and `zfs_pool` (a fresh 256 MiB pool per test; creating one takes a few tens of ms).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

from fsrvpd.backends.base import ShadowCopyRef
from fsrvpd.backends.host import read_mounts
from fsrvpd.backends.zfs import clone_name, snapshot_name
from tests.support.apt import ensure_tools

__all__ = ["FilePool", "ensure_zfs", "fill", "hanging_zfs", "zfs", "zfs_daemon", "zfs_pool"]

WAIT_SECONDS = 30.0  # for zfs-fuse to answer, a busy pool to go, the daemon to stop


def zfs(*args: str) -> str:
    """Run one zfs command and return its output; raise with zfs's own message when it fails."""
    return _run("zfs", *args)


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _zfs_answers() -> bool:
    return subprocess.run(["zfs", "list", "-H", "-o", "name"], capture_output=True).returncode == 0


def ensure_zfs() -> subprocess.Popen | None:
    """Make `zfs` answer: install zfs-fuse if there is no zfs, start its daemon if none answers.

    Returns the daemon process when this call started it (so the caller can stop it), else None.
    """
    ensure_tools({"zfs": "zfs-fuse"})
    if _zfs_answers():
        return None
    log = tempfile.NamedTemporaryFile(prefix="zfs-fuse-", suffix=".log", delete=False)
    daemon = subprocess.Popen(["zfs-fuse", "--no-daemon"], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + WAIT_SECONDS
    while not _zfs_answers():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            raise RuntimeError(f"zfs-fuse did not come up; its output is in {log.name}")
        time.sleep(0.1)
    return daemon


def fill(directory: str) -> str:
    """Write zeros into `directory` until its pool has no space left (ZFS does not compress by
    default); returns the file, whose removal frees the space again."""
    path = os.path.join(directory, "filler")
    chunk = bytes(1024 * 1024)
    try:
        with open(path, "wb") as filler:
            while True:
                filler.write(chunk)
                filler.flush()
    except OSError as full:
        if full.errno != errno.ENOSPC:
            raise
    os.sync()
    return path


def hanging_zfs(directory: str) -> tuple[str, str]:
    """A `zfs` wrapper for a daemon's PATH: `zfs <subcommand>` hangs while the file
    `<control>/<subcommand>` exists -- before running the real zfs if the file says "before",
    after it otherwise (the command acted, but never returns).  Returns (bin directory, control
    directory).  The hang is `exec sleep`, so killing the command kills the hang."""
    bin_dir, control = os.path.join(directory, "bin"), os.path.join(directory, "hang")
    os.makedirs(bin_dir, exist_ok=True)
    os.makedirs(control, exist_ok=True)
    wrapper = os.path.join(bin_dir, "zfs")
    with open(wrapper, "w") as script:
        script.write(f"""#!/bin/sh
marker="{control}/$1"
if [ -f "$marker" ] && [ "$(cat "$marker")" = before ]; then exec sleep 3600; fi
{shutil.which("zfs")} "$@"
status=$?
if [ -f "$marker" ]; then exec sleep 3600; fi
exit $status
""")
    os.chmod(wrapper, 0o755)
    return bin_dir, control


class FilePool:
    """A uniquely named pool on a sparse file in a temp dir, destroyed with the file on exit.

    Its root dataset and every dataset made by `dataset` mount below the temp dir, never under /.
    """

    def __init__(self, size_mib: int = 256):
        self.size_mib = size_mib  # zfs-fuse wants at least 64

    def __enter__(self) -> FilePool:
        self.directory = tempfile.mkdtemp(prefix="fsrvpd-pool-")
        self.name = f"fsrvpdtest{uuid.uuid4().hex[:10]}"
        self.mountpoint = os.path.join(self.directory, "mnt")
        image = os.path.join(self.directory, "pool.img")
        with open(image, "wb") as sparse:
            sparse.truncate(self.size_mib * 1024 * 1024)
        try:
            _run("zpool", "create", "-f", "-m", self.mountpoint, self.name, image)
        except BaseException:
            shutil.rmtree(self.directory)
            raise
        return self

    def dataset(self, relative_name: str) -> tuple[str, str]:
        """Create `<pool>/<relative_name>` (and its parents); return its name and mountpoint."""
        name = f"{self.name}/{relative_name}"
        zfs("create", "-p", name)
        return name, os.path.join(self.mountpoint, relative_name)

    def ours(self) -> list[str]:
        """Every dataset or snapshot of the pool that fsrvpd made (by name), as `zfs list -t all` shows."""
        return [name for name in zfs("list", "-H", "-t", "all", "-o", "name", "-r", self.name).split()
                if "fsrvpd-" in name]

    def objects_of(self, copy: ShadowCopyRef, exposed: bool) -> set[str]:
        """What `ours` lists of one copy fsrvpd holds: its snapshot, and its clone while exposed."""
        return {snapshot_name(copy), *([clone_name(copy)] if exposed else [])}

    def __exit__(self, *exc_info) -> None:
        """Destroy the pool (waiting out a busy clone), then its directory; never delete through a mount."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                _run("zpool", "destroy", "-f", self.name)
                break
            except RuntimeError as exc:
                if "no such pool" in str(exc):
                    break
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        still_mounted = [m.mountpoint for m in read_mounts() if m.mountpoint.startswith(self.directory + "/")]
        if still_mounted:
            raise RuntimeError(f"not deleting {self.directory}: {', '.join(still_mounted)} still mounted")
        shutil.rmtree(self.directory)


@pytest.fixture(scope="session")
def zfs_daemon():
    """zfs answers for the whole session; a zfs-fuse started here is stopped when the session ends."""
    daemon = ensure_zfs()
    yield
    if daemon is not None:
        daemon.terminate()
        daemon.wait(timeout=WAIT_SECONDS)


@pytest.fixture
def zfs_pool(zfs_daemon) -> FilePool:
    """A fresh 256 MiB pool for one test: nothing a test finds there was left by another."""
    with FilePool() as pool:
        yield pool

"""A real btrfs for the tests: btrfs-progs installed, throw-away file systems on loop-mounted images.

Nothing here imitates btrfs: tests run the same commands the daemon runs. Every file system gets
its own sparse image and temp dir; leaving, it unmounts everything mounted from its loop device
(the backend's top-level and exposure mounts too, if a test left any), so the loop device goes
and no test finds another's snapshots. No other mount or device of the host is touched.

Fixtures: `btrfs_tools` (session: mkfs.btrfs and btrfs usable), `btrfs_fs` (a fresh 256 MiB file
system per test; making one takes a few tens of ms) and `btrfs_daemon` (fsrvpd with shares vms
and sql on subvolumes of one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from fsrvpd.backends.base import ShadowCopyRef
from fsrvpd.backends.btrfs import SNAPSHOT_DIR
from fsrvpd.backends.host import Mount, read_mounts
from tests.support.apt import ensure_tools
from tests.support.daemon import FsrvpDaemon, serving
from tests.support.lvm import run

__all__ = ["BtrfsDaemon", "FileBtrfs", "btrfs_daemon", "btrfs_fs", "btrfs_tools", "ensure_btrfs"]


def ensure_btrfs() -> None:
    """btrfs-progs from Debian, installed once if missing; the kernel must know btrfs."""
    ensure_tools({"btrfs": "btrfs-progs", "mkfs.btrfs": "btrfs-progs"})
    subprocess.run(["modprobe", "btrfs"], capture_output=True)  # built in on most kernels
    with open("/proc/filesystems") as known:
        if "btrfs" not in known.read().split():
            raise RuntimeError("this kernel has no btrfs: the btrfs tests need it")


class FileBtrfs:
    """A btrfs file system on a sparse image, its top-level subvolume mounted below a temp dir."""

    def __init__(self, size_mib: int = 256, mixed: bool = False):
        self.size_mib = size_mib  # mkfs.btrfs wants at least 114 with its default profiles
        self.mixed = mixed  # data and metadata in one pool: a small file system that runs really full

    def __enter__(self) -> FileBtrfs:
        self.directory = tempfile.mkdtemp(prefix="fsrvpd-btrfs-")
        self.mountpoint = os.path.join(self.directory, "mnt")
        image = os.path.join(self.directory, "fs.img")
        os.mkdir(self.mountpoint)
        with open(image, "wb") as sparse:
            sparse.truncate(self.size_mib << 20)
        self.label = f"fsrvpdtest{uuid.uuid4().hex[:8]}"
        try:
            run("mkfs.btrfs", "-q", "-f", "-L", self.label, *(["--mixed"] if self.mixed else []), image)
            self.device = run("losetup", "--find", "--show", image).strip()
        except BaseException:
            shutil.rmtree(self.directory)
            raise
        try:
            run("mount", self.device, self.mountpoint)
        except BaseException:
            self.__exit__()
            raise
        return self

    def subvolume(self, relative_path: str) -> str:
        """Create the subvolume `relative_path` (its parent directories too) and return its path."""
        path = os.path.join(self.mountpoint, relative_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        run("btrfs", "subvolume", "create", path)
        return path

    def snapshots(self) -> str:
        return os.path.join(self.mountpoint, SNAPSHOT_DIR)

    def ours(self) -> list[str]:
        """What fsrvpd keeps on the file system: `set/copy` per snapshot, `set/` per empty set directory,
        and every mount of the file system but the test's own (the backend's top level, exposures)."""
        found = []
        for set_id in sorted(os.listdir(self.snapshots())) if os.path.isdir(self.snapshots()) else []:
            entries = sorted(os.listdir(os.path.join(self.snapshots(), set_id)))
            found += [f"{set_id}/{entry}" for entry in entries] or [f"{set_id}/"]
        return found + [m.mountpoint for m in self._backend_mounts()]

    def objects_of(self, copy: ShadowCopyRef, exposed: bool) -> set[str]:
        """What `ours` lists of one copy fsrvpd holds: its snapshot, the top level mount it needs,
        and its exposure's mount while exposed (a name saying what is missing if there is none)."""
        def mounted(root: str, what: str) -> list[str]:
            return [m.mountpoint for m in self._backend_mounts() if m.root == root] or [f"{what} (not mounted)"]

        snapshot = f"/{SNAPSHOT_DIR}/{copy.set_id}/{copy.copy_id}"
        return {snapshot.removeprefix(f"/{SNAPSHOT_DIR}/"), *mounted("/", f"the top level of {copy.store.group}"),
                *(mounted(snapshot, f"the exposure of {copy.copy_id}") if exposed else [])}

    def mounts(self) -> list[str]:
        """Every mount of this file system (the test's and the backend's), newest first."""
        return [m.mountpoint for m in reversed(read_mounts()) if m.source == self.device]

    def _backend_mounts(self) -> list[Mount]:
        return [m for m in read_mounts() if m.source == self.device and m.mountpoint != self.mountpoint]

    def __exit__(self, *exc_info) -> None:
        """Unmount every mount of the file system, detach the loop device, then delete the directory."""
        for mountpoint in self.mounts():
            subprocess.run(["umount", mountpoint])
        subprocess.run(["losetup", "-d", self.device], capture_output=True)
        still_mounted = [m.mountpoint for m in read_mounts() if m.mountpoint.startswith(self.directory + "/")]
        if still_mounted:
            raise RuntimeError(f"not deleting {self.directory}: {', '.join(still_mounted)} still mounted")
        shutil.rmtree(self.directory)


class BtrfsDaemon(FsrvpDaemon):
    """FsrvpDaemon whose shares are subvolumes of a FileBtrfs (same names)."""

    def create_share(self, name: str) -> dict:
        path = self.pool.subvolume(name)
        self.datasets[name] = f"/{name}"
        return {"path": path, "backend": "btrfs"}


@pytest.fixture(scope="session")
def btrfs_tools():
    ensure_btrfs()


@pytest.fixture
def btrfs_fs(btrfs_tools) -> FileBtrfs:
    """A fresh 256 MiB btrfs for one test: nothing a test finds there was left by another."""
    with FileBtrfs() as filesystem:
        yield filesystem


@pytest.fixture
def btrfs_daemon(request, btrfs_fs, tmp_path: Path, samba_clients):
    """A running fsrvpd with shares vms and sql on a fresh btrfs."""
    yield from serving(request, BtrfsDaemon(btrfs_fs, tmp_path))

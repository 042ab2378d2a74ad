"""Real LVM for the tests, inside the VM (tests.support.vm): a volume group on a loop file with a thin
pool, and volumes holding ext4 or xfs mounted the way a file server has them.

Nothing imitates lvm2: tests run the same commands the daemon runs. One volume group serves the
whole session (creating one costs seconds in the emulated guest); fixture `lvm` gives it to a test
and afterwards unmounts and removes every volume the test made, so each test starts from the
bare thin pool.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

from fsrvpd.backends.host import is_below, read_mounts
from fsrvpd.backends.lvm import NAME_PREFIX, SET_TAG
from tests.support.daemon import FsrvpDaemon

__all__ = ["LvmLab", "LvmDaemon", "Volume", "lvm_lab", "lvm", "run"]

XFS_MIN_MIB = 300  # mkfs.xfs refuses smaller file systems


def run(*argv: str) -> str:
    """Run one command and return its output; raise with the command's own message when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


class Volume(NamedTuple):
    name: str  # VG/LV
    mountpoint: str
    fstype: str


class LvmLab:
    """A uniquely named VG on a sparse loop file, with thin pool `pool`; all removed on exit."""

    def __init__(self, size_mib: int = 2048, pool_mib: int = 640):
        self.size_mib, self.pool_mib = size_mib, pool_mib

    def __enter__(self) -> LvmLab:
        self.directory = tempfile.mkdtemp(prefix="fsrvpd-lvm-")
        self.vg = f"fsrvpdtest{uuid.uuid4().hex[:8]}"
        image = os.path.join(self.directory, "pv.img")
        with open(image, "wb") as sparse:
            sparse.truncate(self.size_mib << 20)
        self.loop = run("losetup", "--find", "--show", image).strip()
        try:
            run("pvcreate", "-q", self.loop)
            run("vgcreate", "-q", self.vg, self.loop)
            run("lvcreate", "-q", "--type", "thin-pool", "-L", f"{self.pool_mib}M", "-n", "pool", self.vg)
        except BaseException:
            self.__exit__()
            raise
        return self

    def volume(self, name: str, fstype: str = "ext4", thin: bool = True, size_mib: int | None = None) -> Volume:
        """Create, format and mount `<vg>/<name>` (thin in the pool, or classic); return it."""
        size = f"{size_mib or (XFS_MIN_MIB + 20 if fstype == 'xfs' else 64)}M"
        if thin:
            run("lvcreate", "-q", "-V", size, "--thinpool", "pool", "-n", name, self.vg)
        else:
            run("lvcreate", "-q", "-L", size, "-n", name, self.vg)
        device = f"/dev/{self.vg}/{name}"
        run(f"mkfs.{fstype}", "-q", "-F" if fstype == "ext4" else "-f", device)
        mountpoint = os.path.join(self.directory, "mnt", name)
        os.makedirs(mountpoint, exist_ok=True)
        run("mount", device, mountpoint)
        return Volume(f"{self.vg}/{name}", mountpoint, fstype)

    def lvs(self, fields: str = "lv_name,lv_attr,lv_tags,lv_size") -> list[list[str]]:
        """Rows of `lvs` for the VG's visible LVs (whitespace-free fields, '|'-separated)."""
        out = run("lvs", "--noheadings", "--separator", "|", "--units", "b", "--nosuffix", "-o", fields, self.vg)
        return [[field.strip() for field in line.split("|")] for line in out.splitlines() if line.strip()]

    def ours(self) -> list[str]:
        """The VG's LVs that fsrvpd's naming or tags would claim: what must be gone after a test."""
        return sorted(name for name, tags in self.lvs("lv_name,lv_tags")
                      if name.startswith(NAME_PREFIX) or SET_TAG in tags)

    def mounts_below(self, directory: str) -> list[str]:
        return [m.mountpoint for m in read_mounts() if is_below(m.mountpoint, directory)]

    def reset(self) -> None:
        """Unmount everything below the lab's directory and remove every LV but the pool."""
        for mountpoint in reversed(self.mounts_below(self.directory)):
            run("umount", mountpoint)
        names = [name for name, _ in self.lvs("lv_name,lv_attr") if name != "pool"]
        if names:
            run("lvremove", "-q", "-y", *(f"{self.vg}/{name}" for name in names))
        shutil.rmtree(os.path.join(self.directory, "mnt"), ignore_errors=True)

    def __exit__(self, *exc_info) -> None:
        for mountpoint in reversed(self.mounts_below(self.directory)):
            subprocess.run(["umount", mountpoint])
        subprocess.run(["vgremove", "-q", "-f", self.vg], capture_output=True)
        subprocess.run(["pvremove", "-q", "-f", self.loop], capture_output=True)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True)
        if self.mounts_below(self.directory):
            raise RuntimeError(f"not deleting {self.directory}: something is still mounted below it")
        shutil.rmtree(self.directory)


class LvmDaemon(FsrvpDaemon):
    """FsrvpDaemon whose shares are LVM volumes: `kinds` maps a share to (fstype, thin)."""

    def __init__(self, lab: LvmLab, directory: Path, kinds: dict[str, tuple[str, bool]], **kwargs):
        self.kinds = kinds
        super().__init__(lab, directory, shares=tuple(kinds), **kwargs)
        self.config["timers"]["sweep_seconds"] = 1

    def create_share(self, name: str) -> dict:
        fstype, thin = self.kinds[name]
        volume = self.pool.volume(name, fstype, thin)
        self.datasets[name] = volume.name
        return {"path": volume.mountpoint, "backend": "lvm", **({} if thin else {"snapshot_size": "8M"})}


@pytest.fixture(scope="session")
def lvm_lab():
    with LvmLab() as lab:
        yield lab


@pytest.fixture
def lvm(lvm_lab):
    """The session's VG, bare but for its thin pool; whatever the test made there is removed after it."""
    yield lvm_lab
    lvm_lab.reset()

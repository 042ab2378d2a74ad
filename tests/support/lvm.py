"""Real LVM for the tests, inside the VM (tests.support.vm): a volume group on a loop file with a thin
pool, and volumes holding ext4 or xfs mounted the way a file server has them.

Nothing imitates lvm2: tests run the same commands the daemon runs. One volume group with its
volumes serves the whole session, since every lvm2 command costs about a second in the emulated
guest: `vms` (thin, ext4), `sql` (thin, xfs) and `files` (classic, ext4, 64 MiB). Fixture `lvm`
gives it to a test and afterwards puts it back as it was: every other LV removed, everything else
unmounted, the volumes mounted and empty.
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
    thin: bool


class LvmLab:
    """A uniquely named VG on a sparse loop file with thin pool `pool` and the `VOLUMES`; removed on exit."""

    VOLUMES = {"vms": ("ext4", True), "sql": ("xfs", True), "files": ("ext4", False)}

    def __init__(self, size_mib: int = 2048, pool_mib: int = 640):
        self.size_mib, self.pool_mib = size_mib, pool_mib
        self.volumes: dict[str, Volume] = {}

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
            for name, (fstype, thin) in self.VOLUMES.items():
                self.volumes[name] = self._volume(name, fstype, thin)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _volume(self, name: str, fstype: str, thin: bool) -> Volume:
        """Create, format and mount `<vg>/<name>` (thin in the pool, or classic)."""
        size = f"{XFS_MIN_MIB + 20 if fstype == 'xfs' else 64}M"
        if thin:
            run("lvcreate", "-q", "-V", size, "--thinpool", "pool", "-n", name, self.vg)
        else:
            run("lvcreate", "-q", "-L", size, "-n", name, self.vg)
        run(f"mkfs.{fstype}", "-q", f"/dev/{self.vg}/{name}")
        volume = Volume(f"{self.vg}/{name}", os.path.join(self.directory, "mnt", name), fstype, thin)
        os.makedirs(volume.mountpoint)
        self.mount(volume)
        return volume

    def mount(self, volume: Volume) -> None:
        run("mount", f"/dev/{volume.name}", volume.mountpoint)

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
        """Back to the state after __enter__: only the volumes (mounted, empty) and the pool."""
        mountpoints = {volume.mountpoint for volume in self.volumes.values()}
        for mountpoint in reversed(self.mounts_below(self.directory)):
            if mountpoint not in mountpoints:
                run("umount", mountpoint)
        others = [name for name, _ in self.lvs("lv_name,lv_attr") if name != "pool" and name not in self.volumes]
        if others:
            run("lvremove", "-q", "-y", *(f"{self.vg}/{name}" for name in others))
        mounted = set(self.mounts_below(self.directory))
        for volume in self.volumes.values():
            if volume.mountpoint not in mounted:
                self.mount(volume)
            for entry in os.scandir(volume.mountpoint):
                if entry.name != "lost+found":
                    shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.remove(entry.path)

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
    """FsrvpDaemon whose shares are the lab's volumes (same names; `files` with an 8 MiB snapshot
    size), and `inner`: a directory inside `vms`, which is not a volume root."""

    start_seconds = 300.0  # importing impacket over the guest's uncached 9p root takes a minute or more

    def __init__(self, lab: LvmLab, directory: Path, **kwargs):
        super().__init__(lab, directory, shares=(*lab.volumes, "inner"), **kwargs)
        self.config["timers"]["reconcile_seconds"] = 5

    def create_share(self, name: str) -> dict:
        if name == "inner":
            path = os.path.join(self.pool.volumes["vms"].mountpoint, "inner")
            os.makedirs(path, exist_ok=True)
            return {"path": path, "backend": "lvm"}
        volume = self.pool.volumes[name]
        self.datasets[name] = volume.name
        return {"path": volume.mountpoint, "backend": "lvm", **({} if volume.thin else {"snapshot_size": "8M"})}


@pytest.fixture(scope="session")
def lvm_lab():
    with LvmLab() as lab:
        yield lab


@pytest.fixture
def lvm(lvm_lab):
    """The session's VG, bare but for its thin pool; whatever the test made there is removed after it."""
    yield lvm_lab
    lvm_lab.reset()

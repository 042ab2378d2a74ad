"""The storage every server is measured on: one file-backed zfs-fuse pool and one loop-mounted btrfs.

Layout (the same datasets/subvolumes serve every server):
  zfs    <pool>/set<N>/s<i>     for N in SET_SIZES; <pool>/samba-clones for Samba's clones
  btrfs  <mount>/set<N>/s<i>    subvolumes
Each set size has its own parent dataset: zfs-fuse takes one snapshot per `zfs snapshot`, so an
atomic set is a `zfs snapshot -r` of the datasets' common parent (see backends/zfs.py), and
datasets under that parent outside the set would be snapshotted with it each time.

`floor` times what the storage itself needs for a set of shares, with no FSRVP around it.
`add_snapshots` makes the pre-existing snapshots of the "many snapshots" runs, away from the shares.
zfs-fuse is left running at the end, as the system service it normally is (other users of the
machine may have pools on it by then); the pool, the btrfs mount and its loop device go.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import time
import uuid

from tests.support.btrfs import FileBtrfs, ensure_btrfs
from tests.support.daemon import wait_until
from tests.support.lvm import run
from tests.support.zfs import FilePool, ensure_zfs, zfs

SET_SIZES = (1, 8, 64)
BACKENDS = ("zfs", "btrfs")
FILLER_CHILDREN = 100  # zfs: pre-existing snapshots are made 100 per call, by `zfs snapshot -r` of a parent
FILLER_SNAPSHOTS = "filler-snapshots"  # btrfs: the directory of the pre-existing snapshots
BUSY_SECONDS = 10.0  # zfs-fuse calls a clone nobody uses busy now and then; a try a few ms later succeeds
DROP_SECONDS = 60.0  # btrfs: the longest the bench waits for deleted subvolumes to be dropped
POLL_SECONDS = 0.02  # how often settling asks the storage: its wait is reported in milliseconds

# BTRFS_IOC_SNAP_CREATE_V2 = _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2), a 4096-byte struct.
_BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417
_BTRFS_SUBVOL_RDONLY = 1 << 1


class _SnapshotArgs(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int64), ("transid", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("unused", ctypes.c_uint64 * 4), ("name", ctypes.c_char * 4040)]


def destroy_when_not_busy(name: str) -> None:
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            zfs("destroy", name)
            return
        except RuntimeError as exc:
            if "busy" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def share_name(size: int, index: int) -> str:
    return f"s{size}-{index:02d}"


class BenchStorage:
    """The pool and the file system, with a dataset/subvolume per share of every set size."""

    def __init__(self, zfs_size_mib: int = 2048, btrfs_size_mib: int = 4096):
        self.zfs_size_mib = zfs_size_mib
        self.btrfs_size_mib = btrfs_size_mib

    def __enter__(self) -> BenchStorage:
        ensure_zfs()  # a zfs-fuse started here stays: it is the machine's service
        ensure_btrfs()
        self.pool = FilePool(self.zfs_size_mib).__enter__()
        try:
            self.btrfs = FileBtrfs(self.btrfs_size_mib).__enter__()
        except BaseException:
            self.pool.__exit__(None, None, None)
            raise
        for directory in (self.pool.directory, self.btrfs.directory):
            os.chmod(directory, 0o755)  # smbd works as the logged-on user, who must reach the shares
        self.paths: dict[str, dict[int, dict[str, str]]] = {backend: {} for backend in BACKENDS}
        for size in SET_SIZES:
            for index in range(1, size + 1):
                name, relative = share_name(size, index), f"set{size}/s{index:02d}"
                created = {"zfs": self.pool.dataset(relative)[1], "btrfs": self.btrfs.subvolume(relative)}
                for backend, path in created.items():
                    os.chmod(path, 0o777)  # the share's users write there
                    with open(os.path.join(path, "disk.vhdx"), "wb") as disk:
                        disk.write(os.urandom(64 * 1024))
                    self.paths[backend].setdefault(size, {})[name] = path
        self.pool.dataset("samba-clones")
        return self

    def shares(self, backend: str, size: int) -> dict[str, str]:
        return self.paths[backend][size]

    def all_shares(self, backend: str) -> dict[str, str]:
        return {name: path for shares in self.paths[backend].values() for name, path in shares.items()}

    def samba_clone_place(self) -> tuple[str, str]:
        """Where Samba's shell_snap script puts its ZFS clones: parent dataset, mount directory."""
        return f"{self.pool.name}/samba-clones", os.path.join(self.pool.mountpoint, "samba-clones")

    # -- what servers left behind -------------------------------------------------------------

    def leftovers(self, backend: str, wait_seconds: float = 15) -> list[str]:
        """Snapshots and clones any server left on the shares once background clean-ups had
        `wait_seconds` (Samba destroys its ZFS clones from a detached retry); removed then."""
        deadline = time.monotonic() + wait_seconds
        while (found := self._left(backend)) and time.monotonic() < deadline:
            time.sleep(1)
        for name in sorted(found, key=lambda name: "@" in name):  # clones before their origins
            if backend == "zfs":
                destroy_when_not_busy(name)
            else:
                run("btrfs", "subvolume", "delete", name)
        return found

    def settle(self, backend: str, size: int, limit_seconds: float = 60) -> float:
        """Seconds until the snapshots and clones of the cycle just measured on the set of `size`
        shares are gone: the removal a server leaves for after its answers (fsrvpd's queue,
        Samba's detached `zfs destroy`). Waited for between cycles, so that no cycle pays for
        the one before it, and reported beside the cycle time."""
        started = time.perf_counter()
        wait_until(lambda: not self._left_of_set(backend, size), limit_seconds, every=POLL_SECONDS)
        if backend == "btrfs":
            self._dropped(limit_seconds - (time.perf_counter() - started))
        return time.perf_counter() - started

    def _dropped(self, limit_seconds: float) -> None:
        """btrfs: wait until the kernel has dropped the deleted subvolumes. A deleted subvolume leaves
        the listing at once, but its trees are freed later by the cleaner, which a transaction commit
        wakes -- and an idle file system may not commit for minutes. Left to run during the next
        cycle, that work slows its snapshots, the more so with many snapshots on the file system.
        (`btrfs subvolume sync` checks once a second: too coarse for a settle time in milliseconds.)"""
        run("btrfs", "filesystem", "sync", self.btrfs.mountpoint)
        wait_until(lambda: not run("btrfs", "subvolume", "list", "-d", self.btrfs.mountpoint).strip(), limit_seconds,
                   every=POLL_SECONDS)

    def _left_of_set(self, backend: str, size: int) -> list[str]:
        """`_left`, listing on zfs only where a cycle of that set leaves objects (not the filler)."""
        if backend != "zfs":
            return self._left(backend)
        clones, _ = self.samba_clone_place()
        listed = zfs("list", "-H", "-t", "all", "-o", "name", "-r", f"{self.pool.name}/set{size}", clones).split()
        listed += zfs("list", "-H", "-t", "filesystem", "-o", "name", "-d", "1", self.pool.name).split()
        return self._left_by_servers(listed)

    def _left(self, backend: str) -> list[str]:
        if backend == "zfs":
            return self._left_by_servers(zfs("list", "-H", "-t", "all", "-o", "name", "-r", self.pool.name).split())
        return [os.path.join(self.btrfs.mountpoint, line.split(" path ", 1)[1])
                for line in run("btrfs", "subvolume", "list", "-s", self.btrfs.mountpoint).splitlines()
                if not line.split(" path ", 1)[1].startswith(FILLER_SNAPSHOTS + "/")]

    def _left_by_servers(self, names: list[str]) -> list[str]:
        """Of zfs `names`, the servers' snapshots and clones (Samba's, fsrvpd's), not the filler."""
        clones, _ = self.samba_clone_place()
        filler = f"{self.pool.name}/filler"
        return [name for name in names if name.startswith((clones + "/", f"{self.pool.name}/fsrvpd-"))
                or ("@" in name and not name.startswith((filler + "/", filler + "@")))]

    # -- the storage alone ------------------------------------------------------------------

    def floor(self, backend: str, size: int) -> dict[str, float]:
        """Seconds the storage alone needs for a set of `size` shares, in the fewest CLI calls.

        "commit": the set's snapshots (zfs: one atomic snapshot -- `zfs snapshot -r` of the set's
        parent, as zfs-fuse takes one name per call; btrfs: one `btrfs subvolume snapshot -r` per
        share). "exposed": the snapshots, then exposing each (zfs: a read-only clone; btrfs:
        nothing, a snapshot is a directory): what must exist before Commit and Expose answer.
        "cycle": that, then removing everything again (btrfs: until the kernel has dropped the
        subvolumes; tags not counted: the fastest cycle any server could run). "tagged" (zfs): the
        "commit" snapshot again, with a user property set as it is taken (`zfs snapshot -o`), as
        fsrvpd tags everything it creates.
        """
        tag = f"floor-{uuid.uuid4().hex[:8]}"
        shares = self.shares(backend, size)
        started = time.perf_counter()
        if backend == "zfs":
            datasets = [f"{self.pool.name}/set{size}/s{index:02d}" for index in range(1, size + 1)]
            snapshot = f"{datasets[0] if size == 1 else f'{self.pool.name}/set{size}'}@{tag}"
            zfs("snapshot", *(["-r"] if size > 1 else []), snapshot)
            committed = time.perf_counter()
            clones = []
            for dataset, name in zip(datasets, shares):
                clones.append(f"{self.pool.name}/{tag}-{name}")
                zfs("clone", "-o", "readonly=on", "-o", f"mountpoint={self.pool.mountpoint}/{tag}/{name}",
                    f"{dataset}@{tag}", clones[-1])
            exposed = time.perf_counter()
            for clone in clones:
                destroy_when_not_busy(clone)
            zfs("destroy", *(["-r"] if size > 1 else []), snapshot)
            for name in shares:  # zfs-fuse leaves the mount points behind
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(os.path.join(self.pool.mountpoint, tag, name))
            os.rmdir(os.path.join(self.pool.mountpoint, tag))
            finished = time.perf_counter()
            tagged = self._tagged_snapshot(snapshot.replace(tag, f"{tag}-tagged"), recursive=size > 1)
        else:
            target = os.path.join(self.btrfs.mountpoint, tag)
            os.mkdir(target)
            for name, path in shares.items():
                run("btrfs", "subvolume", "snapshot", "-r", path, os.path.join(target, name))
            committed = exposed = time.perf_counter()
            run("btrfs", "subvolume", "delete", *(os.path.join(target, name) for name in shares))
            os.rmdir(target)
            self._dropped(DROP_SECONDS)
            finished = time.perf_counter()
            tagged = None
        return {"commit": committed - started, "exposed": exposed - started, "cycle": finished - started,
                **({"tagged": tagged} if tagged is not None else {})}

    @staticmethod
    def _tagged_snapshot(snapshot: str, recursive: bool) -> float:
        """Seconds the snapshot takes with a user property set as it is taken (then destroyed, untimed)."""
        recursion = ["-r"] if recursive else []
        started = time.perf_counter()
        zfs("snapshot", *recursion, "-o", f"fsrvpd-bench:set={uuid.uuid4()}", snapshot)
        seconds = time.perf_counter() - started
        zfs("destroy", *recursion, snapshot)
        return seconds

    def add_snapshots(self, backend: str, count: int) -> float:
        """Make `count` snapshots on the pool / file system, away from every share; returns the seconds.

        zfs: `zfs snapshot -r` of a parent of FILLER_CHILDREN datasets, count / FILLER_CHILDREN
        times. btrfs: the snapshot ioctl straight (what `btrfs subvolume snapshot` does, without
        starting a process 10,000 times).
        """
        started = time.perf_counter()
        if backend == "zfs":
            for child in range(FILLER_CHILDREN - 1):
                self.pool.dataset(f"filler/c{child:02d}")
            for batch in range(count // FILLER_CHILDREN):
                zfs("snapshot", "-r", f"{self.pool.name}/filler@f{batch:04d}")
        else:
            source = os.open(self.btrfs.subvolume("filler"), os.O_RDONLY | os.O_DIRECTORY)
            target_path = os.path.join(self.btrfs.mountpoint, FILLER_SNAPSHOTS)
            os.mkdir(target_path)
            target = os.open(target_path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for index in range(count):
                    args = _SnapshotArgs(fd=source, flags=_BTRFS_SUBVOL_RDONLY, name=f"f{index:05d}".encode())
                    fcntl.ioctl(target, _BTRFS_IOC_SNAP_CREATE_V2, args)
            finally:
                os.close(source)
                os.close(target)
        return time.perf_counter() - started

    def snapshot_count(self, backend: str) -> int:
        if backend == "zfs":
            return len(zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", self.pool.name).splitlines())
        return len(run("btrfs", "subvolume", "list", "-s", self.btrfs.mountpoint).splitlines())

    def __exit__(self, *exc_info) -> None:
        try:
            self.btrfs.__exit__(*exc_info)
        finally:
            self.pool.__exit__(*exc_info)

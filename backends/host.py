"""What every backend needs from the host: the mount table, mount-point directories, and patience
with objects that are busy for a moment (smbd or our own SMB server may still hold a file of a
share it just stopped serving).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Callable, NamedTuple, TypeVar

from fsrvpd.backends.base import BackendError
from fsrvpd.runner import CommandFailed, CommandRunner

log = logging.getLogger("fsrvpd.backends")

BUSY_RETRY_SECONDS = 10.0

T = TypeVar("T")


class StorageCommandError(Exception):
    """A storage command failed; the flags say why in terms that do not depend on the command layer.

    Subclasses give, per tool, the patterns of its messages (stderr) for each flag.
    """

    MISSING = BUSY = OUT_OF_SPACE = EXISTS = r"(?!)"

    def __init__(self, message: str, missing: bool = False, busy: bool = False, out_of_space: bool = False,
                 exists: bool = False):
        super().__init__(message)
        self.missing = missing
        self.busy = busy
        self.out_of_space = out_of_space
        self.exists = exists

    @classmethod
    def from_command(cls, failure: CommandFailed) -> StorageCommandError:
        def says(pattern: str) -> bool:
            return re.search(pattern, failure.stderr, re.I) is not None
        return cls(str(failure), missing=says(cls.MISSING), busy=says(cls.BUSY), out_of_space=says(cls.OUT_OF_SPACE),
                   exists=says(cls.EXISTS))


@contextlib.contextmanager
def failing_as(action: str) -> Iterator[None]:
    """Report a storage command's or the file system's failure to the daemon as BackendError,
    keeping its out-of-space and missing flags."""
    try:
        yield
    except StorageCommandError as exc:
        raise BackendError(f"{action}: {exc}", out_of_space=exc.out_of_space, missing=exc.missing) from exc
    except CommandFailed as exc:
        raise BackendError(f"{action}: {exc}") from exc
    except OSError as exc:
        raise BackendError(f"{action}: {exc}", out_of_space=exc.errno == errno.ENOSPC) from exc


class Mount(NamedTuple):
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor" of the mounted block device (st_dev for others)
    options: frozenset[str]  # per-mount options: "ro" or "rw", ...
    root: str = "/"  # the directory of the file system mounted here (a btrfs subvolume's path)


def read_mounts() -> list[Mount]:
    """This process's mounts in mount order (a later one at the same point is on top)."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            before, _, after = line.partition(" - ")
            fields = before.split()
            fstype, source = after.split()[:2]
            mounts.append(Mount(_unescape(fields[4]), fstype, _unescape(source), fields[2],
                                frozenset(fields[5].split(",")), _unescape(fields[3])))
    return mounts


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes of blanks and backslashes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def is_below(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or inside it."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def remove_empty_directory(path: str) -> None:
    """Remove an exposure's mountpoint directory; one that holds anything stays (and is logged)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("left directory %s in place: %s", path, exc.strerror)


def sync_symlink_tree(root: str, wanted: dict[str, dict[str, str]]) -> None:
    """Make `root/<dir>/<name>` exactly the symlinks `wanted[dir][name]` -> target: missing or
    changed ones are (re)made, others removed, emptied directories too.  Only symlinks are ever
    removed; anything else found there stays (and is logged).  Directories are 0755: smbd follows
    the links as the connected user."""
    if not wanted and not os.path.isdir(root):
        return
    make_mount_root(root)
    for directory in sorted(set(os.listdir(root)) | set(wanted)):
        path = os.path.join(root, directory)
        links = wanted.get(directory, {})
        make_mount_root(path)
        for entry in os.scandir(path):
            if not entry.is_symlink():
                log.warning("left %s in place: not a symlink fsrvpd made", entry.path)
            elif os.readlink(entry.path) != links.get(entry.name):
                os.unlink(entry.path)
        for name, target in links.items():
            if not os.path.islink(os.path.join(path, name)):
                os.symlink(target, os.path.join(path, name))
        if not links:
            remove_empty_directory(path)


def make_mount_root(path: str) -> None:
    """Make `path` and its missing parents, each traversable by every user whatever the daemon's
    umask: smbd reaches exposures (and Previous Versions links) below the mount root as the
    connected user."""
    if os.path.isdir(path):
        return
    make_mount_root(os.path.dirname(path))
    os.mkdir(path)
    os.chmod(path, 0o755)


def retry_while_busy(action: Callable[[], T], busy: Callable[[Exception], bool]) -> T:
    """Run `action`, retrying with a growing pause for up to BUSY_RETRY_SECONDS while it fails busy."""
    deadline = time.monotonic() + BUSY_RETRY_SECONDS
    delay = 0.01  # zfs-fuse calls about every second clone it just unmounted busy; a few ms later it is not
    while True:
        try:
            return action()
        except Exception as exc:
            if not busy(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def mount_busy(exc: Exception) -> bool:
    return isinstance(exc, CommandFailed) and "busy" in exc.stderr


class Mounter:
    """`mount`, `umount` and `blkid`, through the command runner like every storage command."""

    def __init__(self, runner: CommandRunner, timeout: float):
        self.runner = runner
        self.timeout = timeout

    def fstype(self, device: str) -> str:
        """The file system type on `device`, probed from the device itself (no blkid cache)."""
        return self.runner.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], timeout=self.timeout).stdout.strip()

    def mount(self, device: str, mountpoint: str, fstype: str, options: str) -> None:
        self.runner.run(["mount", "-t", fstype, "-o", options, device, mountpoint], timeout=self.timeout)

    def remount_read_only(self, mountpoint: str, this_mount_only: bool = False) -> None:
        """The file system read-only, or (`this_mount_only`) just this one mount of it: a btrfs
        subvolume's mount shares its superblock with every other mount of the file system."""
        options = "remount,bind,ro" if this_mount_only else "remount,ro"
        self.runner.run(["mount", "-o", options, mountpoint], timeout=self.timeout)

    def unmount(self, mountpoint: str) -> None:
        """Unmount, waiting out a file server that still holds a file of it for a moment."""
        retry_while_busy(lambda: self.runner.run(["umount", mountpoint], timeout=self.timeout), mount_busy)

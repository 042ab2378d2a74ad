"""Does what fsrvpd has on storage, in mounts and in shares match exactly what its state owns?

`problems(daemon)` reads the daemon's durable state and compares it, both ways, with the pool
(what its `ours()` lists: ZFS snapshots and clones, btrfs snapshots), the mounts below its mount
root, the shares its SMB server lists, and whether every exposure the state calls read-only
refuses a write.  The crash-safety tests assert it is empty; bench/kill_matrix.py and
bench/soak.py count what it finds.
"""

from __future__ import annotations

import errno
import os
import time
import uuid

from fsrvpd.backends.base import ShadowCopyRef
from fsrvpd.backends.host import read_mounts
from tests.support.daemon import FsrvpDaemon, ours_on_storage

HOLDS_SNAPSHOTS = ("Committed", "Exposed", "Recovered")
REMOVAL_SECONDS = 30.0  # reconciliation retries a busy removal after 5 s


def problems(daemon: FsrvpDaemon) -> list[str]:
    """Every difference between the daemon's state and what exists; [] when they agree.

    A running daemon removes a deleted copy's storage after answering DeleteShareMapping: it first
    gets REMOVAL_SECONDS to finish what it recorded as being removed.
    """
    found: list[str] = []
    if daemon.alive() and not daemon.removals_done(REMOVAL_SECONDS):
        found += [f"copy {copy['copy_id']} of set {copy['set_id']} is still being removed {REMOVAL_SECONDS:.0f} s later"
                  for copy in daemon.being_removed()]
    sets, retained = daemon.state()
    objects: set[str] = set()  # what of the pool's `ours()` the state owns
    mounts: set[str] = set()
    shares: set[str] = set()
    read_only: list[str] = []  # mountpoints
    for scs in sets:
        if scs["status"] == "CreationInProgress":
            found.append(f"set {scs['set_id']} is still CreationInProgress")
        for copy in scs["copies"]:
            ref = ShadowCopyRef.of(uuid.UUID(scs["set_id"]), uuid.UUID(copy["copy_id"]), copy["store"])
            half_exposed = copy["exposed_name"] and scs["status"] not in ("Exposed", "Recovered")
            if scs["status"] in HOLDS_SNAPSHOTS:
                objects |= daemon.pool.objects_of(ref, exposed=bool(copy["exposed_path"]) and not half_exposed)
            if half_exposed:
                found.append(f"set {scs['set_id']} is {scs['status']} with copy {copy['copy_id']} half exposed")
            elif copy["exposed_path"]:
                mounts.add(copy["exposed_path"])
                shares.add(copy["exposed_name"].casefold())
                if copy["read_only"]:
                    read_only.append(copy["exposed_path"])
    for kept in retained:
        ref = ShadowCopyRef.of(uuid.UUID(kept["set_id"]), uuid.UUID(kept["copy_id"]), kept["store"])
        objects |= daemon.pool.objects_of(ref, exposed=kept["keeps_exposure"])
        if kept["keeps_exposure"]:
            mounts.add(kept["exposed_path"])
            read_only.append(kept["exposed_path"])
    present = set(ours_on_storage(daemon.pool))
    found += [f"{name} is on storage, but the state does not own it" for name in sorted(present - objects)]
    found += [f"{name} is in the state, but not on storage" for name in sorted(objects - present)]
    mount_root = daemon.config["mount_root"].rstrip("/") + "/"
    mounted = {m.mountpoint for m in read_mounts() if m.mountpoint.startswith(mount_root)}
    found += [f"{path} is mounted, but the state does not own it" for path in sorted(mounted - mounts - objects)]
    found += [f"{path} is in the state, but not mounted" for path in sorted(mounts - mounted)]
    published = {name.casefold() for name in daemon.published_shares() if "@{" in name}
    found += [f"share {name} is published, but the state does not own it" for name in sorted(published - shares)]
    found += [f"share {name} is in the state, but not published" for name in sorted(shares - published)]
    found += [f"{path} should be read-only on storage, but accepts writes" for path in read_only
              if path in mounted and accepts_writes(path)]
    return found


def accepts_writes(directory: str) -> bool:
    """Try it: zfs-fuse reports `readonly` wrongly for a mounted dataset, and its FUSE mount stays rw."""
    probe = os.path.join(directory, ".fsrvpd-write-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError as refused:
        return refused.errno != errno.EROFS
    os.unlink(probe)
    return True

"""`fsrvpctl doctor SHARE`: can this share be shadow-copied, and if not, why not -- in plain words.

Each check looks at one thing an admin can fix (the configuration, the directory, the dataset
layout, pool space, where clones are mounted, the front door, Samba) and says what it found.
The layout check is the very one IsPathSupported and AddToShadowCopySet run, so the doctor and a
backup client never disagree.  The checks run in the daemon (through the admin socket), so they
see what the daemon sees: its mounts, its permissions, its published shares.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

from .backends.base import BackendError, NotSupported

OK, WARNING, PROBLEM = "ok", "warning", "problem"
LOW_SPACE_FRACTION = 0.10  # below this share of the pool free: warn (snapshots grow as the data changes)
TESTPARM_SECONDS = 10


async def diagnose(service, share_name: str) -> dict:
    """Run every check on one configured share; `can_shadow_copy` is False if any found a problem."""
    return await asyncio.to_thread(_diagnose, service, share_name)


def _diagnose(service, share_name: str) -> dict:
    config = service.config
    checks: list[dict] = []

    def report(name: str, state: str, detail: str) -> None:
        checks.append({"check": name, "state": state, "detail": detail})

    share = config.share(share_name)
    if share is None:
        report("configuration", PROBLEM, f"no share named {share_name!r} is configured in {config.source} "
               f"(configured: {', '.join(s.name for s in config.shares.values()) or 'none'})")
        return _verdict(share_name, checks)
    report("configuration", OK, f"share {share.name} is configured: path {share.path}, backend {share.backend}"
           + (f", {share.backend} store {share.store}" if share.store else ""))
    if os.geteuid() != 0:
        report("privileges", PROBLEM, f"fsrvpd runs as uid {os.geteuid()}; taking snapshots and mounting them "
               "needs root")
    _check_directory(share.path, report)
    store = _check_layout(service, share, report)
    if store is not None:
        _check_space(service.backends[share.backend], store, report)
    _check_mount_root(config.mount_root, report)
    _check_front_door(service, share, report)
    _check_samba(share, report)
    held = [(scs, copy) for scs in list(service.machine.sets.values()) for copy in scs.copies
            if copy.share == share.name]
    report("shadow copies", OK, f"fsrvpd holds {len(held)} shadow cop{'y' if len(held) == 1 else 'ies'} of "
           f"{share.name}" + (": " + ", ".join(f"{copy.copy_id} ({scs.status.value})" for scs, copy in held)
                              if held else ""))
    return _verdict(share.name, checks)


def _verdict(share: str, checks: list[dict]) -> dict:
    return {"share": share, "can_shadow_copy": all(check["state"] != PROBLEM for check in checks),
            "checks": checks}


def _check_directory(path: str, report) -> None:
    if not os.path.isdir(path):
        report("directory", PROBLEM, f"{path} does not exist or is not a directory")
    elif not os.access(path, os.R_OK | os.X_OK):
        report("permissions", PROBLEM, f"fsrvpd may not read {path}")
    else:
        report("directory", OK, f"{path} is a directory fsrvpd can read")


def _check_layout(service, share, report):
    """The store behind the share, as IsPathSupported finds it (None when it cannot be shadow-copied)."""
    try:
        store = service.backends[share.backend].file_store(share.path, share.store)
    except NotSupported as exc:
        report("layout", PROBLEM, str(exc))
        return None
    except BackendError as exc:
        report("layout", PROBLEM, f"cannot ask {share.backend} about {share.path}: {exc}")
        return None
    report("layout", OK, f"{share.path} is the root of {store.backend} {store.name} (pool {store.group}) with "
           "nothing else mounted below it: one snapshot holds the whole share")
    return store


def _check_space(backend, store, report) -> None:
    try:
        space = backend.pool_space(store)
    except BackendError as exc:
        report("pool space", WARNING, f"cannot read the space of pool {store.group}: {exc}")
        return
    if not space:
        return
    total = space["used"] + space["available"]
    free = space["available"] / total if total else 0.0
    detail = f"pool {store.group}: {_size(space['available'])} free of {_size(total)} ({free:.0%})"
    if space["available"] == 0:
        report("pool space", PROBLEM, detail + "; it is full, so no snapshot or clone can be made")
    elif free < LOW_SPACE_FRACTION:
        report("pool space", WARNING, detail + "; snapshots keep old data and grow as the share changes, so "
               "a nearly full pool soon refuses new ones")
    else:
        report("pool space", OK, detail)


def _check_mount_root(mount_root: str, report) -> None:
    existing = mount_root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    writable = os.access(existing, os.W_OK) and not os.statvfs(existing).f_flag & os.ST_RDONLY
    if not os.path.isdir(existing) or not writable:
        report("mount root", PROBLEM, f"shadow copies are mounted under {mount_root}, but fsrvpd cannot write "
               f"{existing} (read-only file system? with ProtectSystem=strict add ReadWritePaths={mount_root})")
    else:
        report("mount root", OK, f"shadow copies are mounted under {mount_root}")


def _check_front_door(service, share, report) -> None:
    config = service.config
    if share.name.casefold() in {name.casefold() for name in service.front_door.share_names()}:
        report("front door", OK, f"the {config.front_door} SMB server publishes \\\\{config.netbios_name}\\"
               f"{share.name} on {config.listen} port {config.port}")
    else:
        report("front door", PROBLEM, f"the {config.front_door} SMB server does not publish {share.name}; "
               "clients cannot name it")


def _check_samba(share, report) -> None:
    """Samba on the same host may serve the same directory, with its own FSRVP server."""
    if shutil.which("testparm") is None:
        report("samba", OK, "Samba is not installed; the embedded SMB server needs none")
        return
    try:
        listing = subprocess.run(["testparm", "-s", "--suppress-prompt"], capture_output=True, text=True,
                                 timeout=TESTPARM_SECONDS).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        report("samba", WARNING, f"cannot read Samba's configuration with testparm: {exc}")
        return
    same_path = [name for name, path in _samba_share_paths(listing).items() if path == share.path]
    if same_path:
        report("samba", WARNING, f"Samba also shares {share.path} (as {', '.join(same_path)}): Windows hosts "
               "that reach it through smbd talk to Samba's own FSRVP server, not to fsrvpd")
    else:
        report("samba", OK, f"Samba's configuration (testparm) does not share {share.path}")


def _size(count: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value = float(count)
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]}"


def _samba_share_paths(listing: str) -> dict[str, str]:
    """Share name -> path from `testparm -s` output ("[name]" lines, then indented "key = value")."""
    paths, section = {}, None
    for line in listing.splitlines():
        if line.startswith("["):
            section = line.strip("[] ")
        elif section and line.strip().startswith("path ="):
            paths[section] = os.path.normpath(line.split("=", 1)[1].strip())
    return paths

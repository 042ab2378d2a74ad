"""The `fsrvpd` command: run the daemon, check a configuration, make NT hashes for it."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import stat
import sys
import time
from typing import TYPE_CHECKING, Callable

from . import __version__, logs
from .config import Config, ConfigError, load
from .hostnames import host_names_and_addresses

if TYPE_CHECKING:
    from .supervisor import Supervisor

DEFAULT_CONFIG = "/etc/fsrvpd/fsrvpd.yaml"
EXIT_CONFIG = 2

log = logging.getLogger("fsrvpd")


def nt_hash(password: str) -> str:
    """The NT hash (MD4 of UTF-16LE) the embedded SMB server checks NTLM logins against."""
    from impacket.ntlm import compute_nthash

    return compute_nthash(password).hex()


async def serve(config: Config, log_destination: str = "stderr") -> None:
    """Build the daemon from its parts and run it until SIGINT/SIGTERM (see supervisor.py)."""
    await build(config, log_destination).run()


def build(config: Config, log_destination: str = "stderr", clock: Callable[[], float] = time.time) -> Supervisor:
    """The daemon's parts wired together, not started (tests move `clock`)."""
    from .backends.btrfs import BtrfsBackend
    from .backends.lvm import LvmBackend, SnapshotSize
    from .backends.zfs import ZfsBackend
    from .metrics import Metrics
    from .runner import CommandRunner
    from .service import FsrvpService
    from .store import StateStore
    from .supervisor import Supervisor

    metrics = Metrics(__version__)
    runner = CommandRunner(default_timeout=config.command_timeout)
    if config.front_door == "samba":
        config, front_door, share_lookup = _samba_front_door(config, runner)
    else:
        front_door, share_lookup = _embedded_front_door(config, metrics), None

    def snapshot_size(path: str) -> SnapshotSize | None:
        """The classic LVM snapshot size of the share at `path`, as the configuration in force says."""
        return next((share.snapshot_size for share in service.config.shares.values()
                     if share.path and os.path.realpath(share.path) == path), None)

    backends = {"zfs": ZfsBackend(runner, config.mount_root, config.command_timeout),
                "lvm": LvmBackend(runner, config.mount_root, config.command_timeout, snapshot_size),
                "btrfs": BtrfsBackend(runner, config.mount_root, config.command_timeout)}
    store = StateStore(config.state_dir)
    service = FsrvpService(config, store, backends, front_door, clock=clock,
                           extra_host_names=host_names_and_addresses(), observer=metrics, share_lookup=share_lookup)
    return Supervisor(service, front_door, runner, metrics, log_destination)


def _embedded_front_door(config: Config, metrics):
    from .transports.embedded import EmbeddedFrontDoor

    return EmbeddedFrontDoor(config.listen, config.port, config.users, config.netbios_name, config.domain,
                             observer=metrics, max_connections_per_client=config.limits.max_connections_per_client)


def _samba_front_door(config: Config, runner):
    """Check Samba's setup and take the pipe socket before anything else; then Samba's names and
    shares replace the YAML's: UNCs name smbd's host, shares are smbd's."""
    import dataclasses
    import os

    from .samba import SambaShareCatalog, SambaTools
    from .transports.samba import SambaFrontDoor, bind_pipe_socket, check_samba_settings

    tools = SambaTools(runner, config.smb_conf, os.path.join(config.state_dir, "tmp"))
    front_door = SambaFrontDoor(tools, bind_pipe_socket(check_samba_settings(tools)))
    catalog = SambaShareCatalog(tools, config.shares)
    catalog.refresh()
    netbios_name = tools.parameter("netbios name").upper()
    aliases = tuple(tools.parameter("netbios aliases").replace(",", " ").split())
    config = dataclasses.replace(config, netbios_name=netbios_name, aliases=config.aliases + aliases,
                                 domain=tools.parameter("workgroup"), shares=catalog.shares())
    return config, front_door, catalog.lookup


def _readable_by_others(path: str) -> str:
    """Who besides the owner may read `path` ("group", "others", both, or "")."""
    mode = os.stat(path).st_mode
    return " and ".join(who for who, bit in (("its group", stat.S_IRGRP), ("all users", stat.S_IROTH)) if mode & bit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fsrvpd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fsrvpd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    check = commands.add_parser("check-config", help="check a configuration file and exit")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    hasher = commands.add_parser("nt-hash", help="print the NT hash of a password (read from stdin if not a tty)")
    hasher.add_argument("password", nargs="?")
    args = parser.parse_args(argv)

    if args.command == "nt-hash":
        password = args.password
        if password is None:
            password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        print(nt_hash(password))
        return 0
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"fsrvpd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(f"{args.config}: OK ({len(config.shares)} share(s), {len(config.users)} user(s))")
        return 0
    os.umask(0o077)  # whatever the daemon creates (state, mount points, sockets) is root's alone
    log_destination = logs.setup(config.log_level)
    exposed = _readable_by_others(args.config) if config.users else ""
    if exposed:
        log.warning("%s holds NT hashes (password equivalents) but is readable by %s: chmod 600 it",
                    args.config, exposed)
    from .samba import SambaError
    from .transports.samba import SambaSetupError

    try:
        asyncio.run(serve(config, log_destination))
    except (OSError, SambaError, SambaSetupError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `fsrvpd` command: run the daemon, check a configuration, make NT hashes for it."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import stat
import sys

from . import __version__
from .config import Config, ConfigError, load
from .hostnames import host_names_and_addresses

DEFAULT_CONFIG = "/etc/fsrvpd/fsrvpd.yaml"
EXIT_CONFIG = 2

log = logging.getLogger("fsrvpd")


def nt_hash(password: str) -> str:
    """The NT hash (MD4 of UTF-16LE) the embedded SMB server checks NTLM logins against."""
    from impacket.ntlm import compute_nthash

    return compute_nthash(password).hex()


async def serve(config: Config) -> None:
    """Build the daemon from its parts, serve until SIGINT/SIGTERM, then stop cleanly."""
    from .backends.zfs import ZfsBackend
    from .rpcserver import ClientLimits, PipeSettings, serve_pipe
    from .runner import CommandRunner
    from .service import FsrvpService
    from .store import StateStore
    from .transports.base import ShareSpec
    from .transports.embedded import EmbeddedFrontDoor

    runner = CommandRunner(default_timeout=config.command_timeout)
    backends = {"zfs": ZfsBackend(runner, config.mount_root, config.command_timeout)}
    front_door = EmbeddedFrontDoor(config.listen, config.port, config.users, config.netbios_name, config.domain,
                                   max_connections_per_client=config.limits.max_connections_per_client)
    store = StateStore(config.state_dir)
    service = FsrvpService(config, store, backends, front_door, extra_host_names=host_names_and_addresses())
    await service.start()
    for share in config.shares.values():
        await front_door.publish_share(ShareSpec(share.name, share.path, read_only=False, comment=share.comment))
    settings = PipeSettings.from_config(config, dns_name=config.fqdn)
    clients = ClientLimits(config.limits.max_connections_per_client, config.limits.max_calls_per_second)
    await front_door.start(lambda reader, writer, caller: serve_pipe(service, reader, writer, caller, settings,
                                                                     clients))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    timers = asyncio.create_task(service.run_timers())
    log.info("fsrvpd %s serving \\\\%s on %s:%d (%s front door), shares: %s", __version__, config.netbios_name,
             config.listen, config.port, config.front_door, ", ".join(s.name for s in config.shares.values()))
    await stop.wait()
    log.info("stopping")
    timers.cancel()
    async with service.lock:  # let a call in flight finish its storage work
        await front_door.stop()
    store.close()


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
    exposed = _readable_by_others(args.config) if config.users else ""
    if exposed:
        print(f"fsrvpd: warning: {args.config} holds NT hashes (password equivalents) but is readable by "
              f"{exposed}: chmod 600 it", file=sys.stderr)
    if args.command == "check-config":
        print(f"{args.config}: OK ({len(config.shares)} share(s), {len(config.users)} user(s))")
        return 0
    os.umask(0o077)  # whatever the daemon creates (state, mount points, logs it opens) is root's alone
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

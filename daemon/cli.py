"""The `fsrvpd` command: run the daemon, check a configuration, make NT hashes for it."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING, Callable

from . import __version__
from .config import Config, ConfigError, load
from .hostnames import host_names_and_addresses

if TYPE_CHECKING:
    from .service import FsrvpService

DEFAULT_CONFIG = "/etc/fsrvpd/fsrvpd.yaml"
EXIT_CONFIG = 2

log = logging.getLogger("fsrvpd")


def nt_hash(password: str) -> str:
    """The NT hash (MD4 of UTF-16LE) the embedded SMB server checks NTLM logins against."""
    from impacket.ntlm import compute_nthash

    return compute_nthash(password).hex()


async def start_daemon(config: Config, clock: Callable[[], float] = time.time) -> FsrvpService:
    """Build the daemon from its parts and open it: state reloaded and reconciled, shares published,
    front door serving (`service.front_door`, `service.store` are the parts to close)."""
    from .backends.zfs import ZfsBackend
    from .rpcserver import serve_pipe
    from .runner import CommandRunner
    from .service import FsrvpService
    from .store import StateStore
    from .transports.base import ShareSpec
    from .transports.embedded import EmbeddedFrontDoor

    runner = CommandRunner(default_timeout=config.command_timeout)
    backends = {"zfs": ZfsBackend(runner, config.mount_root, config.command_timeout)}
    front_door = EmbeddedFrontDoor(config.listen, config.port, config.users, config.netbios_name, config.domain)
    store = StateStore(config.state_dir)
    service = FsrvpService(config, store, backends, front_door, clock=clock,
                           extra_host_names=host_names_and_addresses())
    await service.start()
    for share in config.shares.values():
        await front_door.publish_share(ShareSpec(share.name, share.path, read_only=False, comment=share.comment))
    await front_door.start(lambda reader, writer, caller: serve_pipe(service, reader, writer, caller))
    return service


async def serve(config: Config) -> None:
    """Run the daemon until SIGINT/SIGTERM, then stop cleanly."""
    service = await start_daemon(config)
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
        await service.front_door.stop()
    service.store.close()


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
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

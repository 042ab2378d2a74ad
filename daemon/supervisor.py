"""The running daemon around the service: start-up order, signals, systemd, metrics, admin socket.

Order matters to systemd and to clients.  The service reloads its state first, then the base
shares are published and the front door opens, then the admin socket and the metrics endpoint;
only then does systemd hear READY=1, so `systemctl start` returns when fsrvpd really serves.
The watchdog is pinged from a task on the event loop: if the loop stops turning, the pings stop
and systemd restarts the daemon.

SIGHUP reloads the configuration: base shares are added, changed and withdrawn in place while
the front door keeps its connections; settings that cannot change while serving (addresses,
accounts, directories) are reported as needing a restart.  A broken file is reported and the
running configuration stays.  SIGTERM (or SIGINT) stops taking new calls, waits for the call in
flight to finish its storage work and answer, then stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time

from . import __version__
from .admin import AdminCommands, AdminServer
from .config import Config, ConfigError, ShareConfig, load
from .crashpoints import crash_point
from .metrics import Metrics
from .rpcserver import ClientLimits, PipeSettings, serve_pipe
from .runner import CommandRunner
from .sdnotify import Notifier
from .service import FsrvpService
from .transports.base import FrontDoor, ShareSpec

log = logging.getLogger("fsrvpd")

# Settings a reload cannot apply to a running daemon: they keep their running values until a restart.
RESTART_SETTINGS = ("netbios_name", "domain", "front_door", "listen", "port", "users", "state_dir", "mount_root",
                    "metrics_listen", "metrics_port", "admin_socket", "command_timeout", "log_level", "limits")


class Supervisor:
    """Runs a built daemon until SIGTERM; see the module docstring."""

    def __init__(self, service: FsrvpService, front_door: FrontDoor, runner: CommandRunner, metrics: Metrics,
                 log_destination: str = "stderr", notifier: Notifier | None = None):
        self.service = service
        self.front_door = front_door
        self.runner = runner
        self.metrics = metrics
        self.log_destination = log_destination
        self.notifier = notifier or Notifier()
        self.started_at = time.time()
        self.last_reload: dict | None = None
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.pipe_settings = PipeSettings.from_config(service.config, front_door.accounts())  # a reload replaces it
        self.clients = ClientLimits(service.config.limits.max_connections_per_client,
                                    service.config.limits.max_calls_per_second)

    @property
    def config(self) -> Config:
        return self.service.config

    async def run(self) -> None:
        config = self.config
        await self.open()
        admin = AdminServer(config.admin_socket, AdminCommands(self))
        try:
            await admin.start()
            if config.metrics_port:
                self.metrics.watch(self.service, self.runner)
                self.metrics.serve(config.metrics_listen, config.metrics_port)
            await self._serve_until_stopped()
        finally:
            await self._stop(admin)

    async def open(self) -> None:
        """The state reloaded and reconciled, the base shares published, the front door serving."""
        await self.service.start()
        await self._sync_shares({}, self.config.shares)
        await self.front_door.start(lambda reader, writer, caller: serve_pipe(self.service, reader, writer, caller,
                                                                              self.pipe_settings, self.clients))

    async def _serve_until_stopped(self) -> None:
        config = self.config
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        self._spawn(self.service.run_timers())
        if self.notifier.watchdog_interval:
            self._spawn(self.notifier.feed_watchdog())
        where = f"{config.listen}:{config.port}" if self.front_door.serves_base_shares else f"smbd ({config.smb_conf})"
        log.info("fsrvpd %s serving \\\\%s on %s (%s front door), shares: %s", __version__, config.netbios_name,
                 where, config.front_door, ", ".join(s.name for s in config.shares.values()))
        self.notifier.ready(self._status())
        await stop.wait()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)

    async def _stop(self, admin: AdminServer) -> None:
        log.info("stopping: letting the call in flight finish")
        self.notifier.stopping()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await admin.stop()
        await self.service.stop()
        async with self.service.lock:  # a call in flight finishes its storage work and answers first
            await self.front_door.stop()
        self.metrics.stop()
        self.service.store.close()
        log.info("stopped")

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _status(self) -> str:
        sets = len(self.service.machine.sets)
        return f"serving {len(self.config.shares)} share(s), {sets} shadow copy set(s)"

    async def reload(self) -> bool:
        """SIGHUP: apply the configuration file again; False (and nothing changed) if it is broken."""
        async with self._reloading:
            self.notifier.reloading()
            old = self.config
            try:
                new = await asyncio.to_thread(load, old.source)
            except ConfigError as exc:
                log.error("configuration not reloaded, the running one stays: %s", exc)
                ok, message = False, str(exc)
            else:
                for setting in RESTART_SETTINGS:
                    if getattr(old, setting) != getattr(new, setting):
                        log.warning("reload: %s changed; that takes effect at the next restart", setting)
                new = dataclasses.replace(new, **{setting: getattr(old, setting) for setting in RESTART_SETTINGS})
                if not self.front_door.serves_base_shares:
                    # smbd's configuration names the shares; a restart picks up new backend mappings
                    new = dataclasses.replace(new, aliases=old.aliases, shares=old.shares)
                async with self.service.lock:
                    await self._sync_shares(old.shares, new.shares)
                    crash_point("reload.shares_synced")
                    self.service.reconfigure(new)
                    self.pipe_settings = PipeSettings.from_config(new, self.front_door.accounts())  # rpc.min_auth_level applies to new calls
                ok, message = True, f"shares: {', '.join(s.name for s in new.shares.values()) or 'none'}"
                log.info("configuration reloaded from %s; %s", new.source, message)
            self.metrics.config_reloaded(ok)
            self.last_reload = {"at": time.time(), "ok": ok, "message": message}
            self.notifier.ready(self._status())
            return ok

    async def _sync_shares(self, old: dict[str, ShareConfig], new: dict[str, ShareConfig]) -> None:
        """Publish added or changed base shares and withdraw removed ones; shadow copy shares stay."""
        if not self.front_door.serves_base_shares:
            return
        for key, share in old.items():
            if key not in new:
                log.info("share %s withdrawn (its shadow copies stay until deleted)", share.name)
                await self.front_door.unpublish_share(share.name)
        for key, share in new.items():
            if old.get(key) != share:
                if key in old and old[key].name != share.name:
                    await self.front_door.unpublish_share(old[key].name)
                await self.front_door.publish_share(ShareSpec(share.name, share.path, read_only=False,
                                                              comment=share.comment))

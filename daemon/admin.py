"""The admin socket: what `fsrvpctl` asks the running daemon, and the answers.

A Unix stream socket (mode 0600, in systemd's RuntimeDirectory by default) that only root (or
the daemon's own user) may use: the kernel's peer credentials are checked on every connection.
One request per connection, one JSON line each way:

    {"command": "delete", "args": {"set_id": "..."}}   ->   {"ok": true, "result": {...}}
                                                         or {"ok": false, "error": "...", "code": "..."}

The commands run on the daemon's event loop and take the service's lock where they change
state, exactly like FSRVP calls, so an admin and a backup client never interleave half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
import uuid

from . import __version__, logs
from .constants import CONTEXT_ATTRIBUTES, Context, hresult_name
from .doctor import diagnose
from .retention import RetainedCopy
from .state import Refused, ShadowCopySet, Status

log = logging.getLogger("fsrvpd.admin")

REQUEST_LIMIT = 64 * 1024


class AdminError(Exception):
    """A request the daemon refuses; `code` is stable for scripts (see fsrvpctl's exit codes)."""

    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


def describe_set(scs: ShadowCopySet, now: float) -> dict:
    try:
        context = Context(scs.context & ~CONTEXT_ATTRIBUTES).name
    except ValueError:
        context = f"{scs.context:#x}"
    return {"set_id": str(scs.set_id), "status": scs.status.value, "context": context,
            "started_at": scs.started_at, "age_seconds": round(now - scs.started_at, 1),
            "client": scs.client_address, "principal": scs.principal,
            "shares": [copy.share for copy in scs.copies],
            "copies": [{"copy_id": str(copy.copy_id), "share": copy.share, "store": copy.store["name"],
                        "exposed_as": copy.exposed_name if copy.exposed_path else None,
                        "read_only": copy.read_only, "restore_of": copy.source} for copy in scs.copies]}


def describe_retained(copy: RetainedCopy, now: float) -> dict:
    return {"copy_id": str(copy.copy_id), "set_id": str(copy.set_id), "share": copy.share,
            "store": copy.store["name"], "created_at": copy.created_at, "age_seconds": round(now - copy.created_at, 1),
            "retained_at": copy.retained_at, "with_exposure": copy.exposed_path if copy.keeps_exposure else None}


class AdminCommands:
    """The commands fsrvpctl sends, answered from the running daemon's parts."""

    def __init__(self, supervisor):
        self.supervisor = supervisor

    @property
    def service(self):
        return self.supervisor.service

    async def status(self) -> dict:
        service, supervisor = self.service, self.supervisor
        config, machine, now = service.config, service.machine, time.time()
        by_status = {status.value: 0 for status in Status}
        for scs in list(machine.sets.values()):
            by_status[scs.status.value] += 1
        return {
            "version": __version__, "pid": os.getpid(), "started_at": supervisor.started_at,
            "uptime_seconds": round(now - supervisor.started_at, 1), "config": config.source,
            "logging": supervisor.log_destination,
            "front_door": {"mode": config.front_door, "listen": config.listen, "port": config.port,
                           "server_name": config.netbios_name},
            "metrics": f"http://{config.metrics_listen}:{config.metrics_port}/metrics" if config.metrics_port else None,
            "shares": sorted(share.name for share in config.shares.values()),
            "sets": by_status,
            "context": {"set": machine.context_set, "client": machine.context_client,
                        "timer_seconds_left": round(machine.deadline - now, 1) if machine.deadline else None},
            "last_reload": supervisor.last_reload,
            "recent_problems": list(logs.recent_problems.entries),
            "storage_commands": {tool: {"calls": stats.calls, "failures": stats.failures,
                                        "seconds": round(stats.seconds, 3)}
                                 for tool, stats in sorted(supervisor.runner.totals().items())},
        }

    async def sets(self) -> list[dict]:
        now = time.time()
        return [describe_set(scs, now) for scs in sorted(self.service.machine.sets.values(),
                                                            key=lambda scs: scs.started_at)]

    async def shares(self) -> dict:
        service = self.service
        published = {name.casefold() for name in service.front_door.share_names()}
        held: dict[str, int] = {}
        exposed = []
        for scs in list(service.machine.sets.values()):
            for copy in scs.copies:
                held[copy.share] = held.get(copy.share, 0) + 1
                if copy.exposed_path:
                    exposed.append({"name": copy.exposed_name, "share": copy.share, "set_id": str(scs.set_id),
                                    "path": copy.exposed_path, "read_only": copy.read_only,
                                    "published": copy.exposed_name.casefold() in published,
                                    "restore_of": copy.source})
        configured = [{"name": share.name, "path": share.path, "backend": share.backend, "store": share.store,
                       "copies": held.get(share.name, 0), "published": share.name.casefold() in published}
                      for share in sorted(service.config.shares.values(), key=lambda share: share.name)]
        return {"shares": configured, "shadow_copy_shares": sorted(exposed, key=lambda entry: entry["name"])}

    async def delete(self, set_id: str) -> dict:
        scs = await self.service.delete_set(_guid(set_id))
        return describe_set(scs, time.time())

    async def retained(self) -> list[dict]:
        now = time.time()
        return [describe_retained(copy, now) for copy in self.service.retained_copies()]

    async def unretain(self, copy_id: str) -> dict:
        return describe_retained(await self.service.remove_retained(_guid(copy_id)), time.time())

    async def prune(self) -> dict:
        return await self.service.prune()

    async def expose(self, snapshot: str) -> dict:
        scs = await self.service.expose_snapshot(snapshot)
        return describe_set(scs, time.time())

    async def reload(self) -> dict:
        """What SIGHUP does, but the caller learns whether the file was good."""
        if not await self.supervisor.reload():
            raise AdminError(self.supervisor.last_reload["message"], "config_error")
        return self.supervisor.last_reload

    async def doctor(self, share: str) -> dict:
        return await diagnose(self.service, share)


def _guid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip("{}"))
    except ValueError:
        raise AdminError(f"{text!r} is not a GUID", "bad_request") from None


class AdminServer:
    """Listens on the admin socket and answers one request per connection."""

    def __init__(self, path: str, commands: AdminCommands):
        self.path = path
        self.commands = commands
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            if _answers(self.path):
                raise OSError(f"{self.path} is in use: is another fsrvpd running?")
            os.unlink(self.path)  # left by a daemon that did not stop cleanly
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=REQUEST_LIMIT)
        finally:
            os.umask(old_umask)
        log.info("admin socket %s (fsrvpctl)", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()  # first, so that even a refusal reaches the client whole
            uid = _peer_uid(writer.get_extra_info("socket"))
            if uid not in (0, os.geteuid()):
                log.warning("admin socket: refused a request from uid %d (root only)", uid)
                answer = {"ok": False, "error": "fsrvpctl needs root", "code": "permission_denied"}
            else:
                answer = await self._answer(line)
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, ValueError) as exc:  # ValueError: a request longer than the limit
            log.info("admin socket: dropped a connection: %s", exc)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
            command = getattr(self.commands, request["command"])
            if request["command"].startswith("_") or not asyncio.iscoroutinefunction(command):
                raise AttributeError(request["command"])
            log.info("admin: %s %s", request["command"], " ".join(map(str, request.get("args", {}).values())))
            return {"ok": True, "result": await command(**request.get("args", {}))}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            return {"ok": False, "error": f"not a request fsrvpd knows: {exc}", "code": "bad_request"}
        except AdminError as exc:
            return {"ok": False, "error": str(exc), "code": exc.code}
        except Refused as refused:
            return {"ok": False, "error": refused.why, "code": hresult_name(refused.result)}
        except Exception as exc:
            log.exception("admin request %r failed", line[:200])
            return {"ok": False, "error": f"failed inside fsrvpd: {exc}", "code": "internal"}


def _peer_uid(sock: socket.socket) -> int:
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True

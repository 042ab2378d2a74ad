"""The production front door: Samba's smbd serves SMB (SMB3, signing, encryption, Kerberos/AD) and
hands `\\PIPE\\FssagentRpc` to fsrvpd over its external named-pipe socket.

smbd 4.16 and later connects every pipe open to `<ncalrpc dir>/np/<pipe name>`, a Unix socket that
samba-dcerpcd normally owns; fsrvpd listens on `np/fssagentrpc` instead, reads the
named_pipe_auth handshake (npa.py) that tells who the client is, and then speaks DCE/RPC in
message mode.  Samba's own FSRVP server (rpcd_fsrvp) must not run: samba-dcerpcd, whenever it
starts, unlinks and re-binds every socket of every helper it runs.  Hence `rpc start on demand
helpers = no` (smbd never starts samba-dcerpcd itself) and samba-dcerpcd started as a service with
an explicit helper list without rpcd_fsrvp; `start` refuses to run otherwise and says why.

The handshake carries no proof: whoever can connect to the socket could claim any identity.  The
np directory must therefore be root's and closed to others (Samba creates it 0700), and each
connection's peer must be root (SO_PEERCRED), as smbd is when it connects.

Snapshot shares go to Samba's registry configuration through samba.py: the base share's
parameters and security descriptor, the snapshot's path, read-only unless auto-recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import time

from .. import npa
from ..constants import PIPE_NAME
from ..ntlm import Accounts
from ..samba import OWNER_PARAMETER, SambaError, SambaPassdbAccounts, SambaTools, is_yes, owned_shares, snapshot_share_parameters
from .base import Caller, FrontDoor, PipeHandler, ShareSpec

log = logging.getLogger("fsrvpd.samba")

HANDSHAKE_TIMEOUT_SECONDS = 10.0
SOCKET_WATCH_SECONDS = 5.0
READ_SIZE = 65536
PDU_HEADER_SIZE = 16
PIPE_TASKS_GRACE_SECONDS = 2.0
# The configuration a snapshot share copies from its base share is re-read (testparm) when older
# than this; an Expose publishes one share per copy, a whole read for each made it slow.
BASE_SHARES_MAX_AGE_SECONDS = 10.0


class SambaSetupError(Exception):
    """Samba is not set up for fsrvpd; the message says what to change."""


def check_samba_settings(tools: SambaTools) -> str:
    """Check the smb.conf settings fsrvpd depends on; return the directory of pipe sockets."""
    try:
        ncalrpc_dir = tools.parameter("ncalrpc dir")
        on_demand = tools.parameter("rpc start on demand helpers")
        registry_shares = tools.parameter("registry shares")
    except SambaError as exc:
        raise SambaSetupError(f"cannot read Samba's configuration {tools.smb_conf}: {exc}") from None
    if is_yes(on_demand):
        raise SambaSetupError(
            f"{tools.smb_conf} has 'rpc start on demand helpers = yes': smbd would start samba-dcerpcd, whose "
            "rpcd_fsrvp takes over np/fssagentrpc. Set 'rpc start on demand helpers = no' in [global] and run "
            "samba-dcerpcd as a service without rpcd_fsrvp (see README, 'Production with Samba').")
    if not is_yes(registry_shares):
        raise SambaSetupError(
            f"{tools.smb_conf} has 'registry shares = no': the snapshot shares fsrvpd writes to Samba's registry "
            "would never be served. Set 'registry shares = yes' and 'include = registry' in [global].")
    if not os.path.isabs(ncalrpc_dir):
        raise SambaSetupError(f"Samba's 'ncalrpc dir' is {ncalrpc_dir!r}, not an absolute path")
    return os.path.join(ncalrpc_dir, "np")


def bind_pipe_socket(np_dir: str) -> socket.socket:
    """Create np/ as Samba would (root's, 0700) or check it is so, and listen on np/fssagentrpc."""
    os.makedirs(os.path.dirname(np_dir), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(np_dir, 0o700)
    info = os.lstat(np_dir)
    if not stat.S_ISDIR(info.st_mode):
        raise SambaSetupError(f"{np_dir} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise SambaSetupError(
            f"{np_dir} is owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):04o}: anyone who can "
            f"reach it could pose as any Windows user. It must be uid {os.geteuid()}'s with mode 0700 "
            f"(chown {os.geteuid()} {np_dir}; chmod 0700 {np_dir}), as Samba creates it.")
    path = os.path.join(np_dir, PIPE_NAME.lower())
    if os.path.lexists(path):
        _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise SambaSetupError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _remove_stale_socket(path: str) -> None:
    """A socket someone still listens on is taken (by rpcd_fsrvp, or another fsrvpd); a dead one goes."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise SambaSetupError(f"{path} exists and is not a socket; remove it if nothing needs it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise SambaSetupError(f"cannot tell whether {path} is in use: {exc.strerror}") from None
        else:
            raise SambaSetupError(
                f"{path} is taken: another process serves the FSRVP pipe (samba-dcerpcd running rpcd_fsrvp, or "
                "another fsrvpd). Stop it, and run samba-dcerpcd without rpcd_fsrvp.")
    os.unlink(path)


def _client_address(address: str) -> str:
    """smbd reports IPv4 clients of a dual-stack socket as ::ffff:a.b.c.d; the rest of fsrvpd uses a.b.c.d."""
    return address.removeprefix("::ffff:")


def _pdus(data: bytes):
    """Split what the DCE/RPC layer sends into PDUs: in message mode each one is its own message."""
    while data:
        length = int.from_bytes(data[8:10], "little") if len(data) >= PDU_HEADER_SIZE else len(data)
        if length < PDU_HEADER_SIZE or length > len(data):
            length = len(data)
        yield data[:length]
        data = data[length:]


class _MessagePipe:
    """One opened pipe as serve_pipe sees it (read/write/drain/close), on the message-mode socket."""

    def __init__(self, connection: npa.NpaServerConnection, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.connection, self.reader, self.writer = connection, reader, writer
        self.pending: list[bytes] = []

    async def read(self, _size: int = -1) -> bytes:
        while not self.pending:
            data = await self.reader.read(READ_SIZE)
            if not data:
                return b""
            for event in self.connection.receive_data(data):
                if isinstance(event, npa.MessageReceived):
                    self.pending.append(event.payload)
                elif isinstance(event, npa.ProtocolError):
                    log.info("smbd broke the pipe framing: %s", event.reason)
                    return b""
        data = b"".join(self.pending)
        self.pending.clear()
        return data

    def write(self, data: bytes) -> None:
        for pdu in _pdus(data):
            self.connection.send_message(pdu)
        self.writer.write(self.connection.data_to_send())

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class SambaFrontDoor(FrontDoor):
    """Serves the FSRVP pipe behind smbd and publishes snapshot shares in Samba's registry."""

    serves_base_shares = False  # smbd serves them from its own configuration

    def __init__(self, tools: SambaTools, listening: socket.socket):
        """`listening`: the socket bind_pipe_socket made (after check_samba_settings passed)."""
        self.tools = tools
        self._socket = listening
        self._socket_path = listening.getsockname()
        info = os.stat(self._socket_path)
        self._socket_identity = (info.st_dev, info.st_ino)
        self._server: asyncio.AbstractServer | None = None
        self._watch: asyncio.Task | None = None
        self._pipe_tasks: set[asyncio.Task] = set()
        self._published: dict[str, str] | None = None  # share -> base share, for shares carrying our tag
        self._sections: dict[str, dict[str, str]] = {}  # testparm's output, as last read
        self._sections_read_at = -BASE_SHARES_MAX_AGE_SECONDS

    async def start(self, handle_pipe: PipeHandler) -> None:
        self._server = await asyncio.start_unix_server(lambda r, w: self._accept(r, w, handle_pipe),
                                                       sock=self._socket)
        self._watch = asyncio.create_task(self._watch_socket())
        log.info("serving \\PIPE\\%s for smbd on %s", PIPE_NAME, self._socket_path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._watch.cancel()
            self._server = None
        if self._pipe_tasks:
            _, still_running = await asyncio.wait(self._pipe_tasks, timeout=PIPE_TASKS_GRACE_SECONDS)
            for task in still_running:
                task.cancel()
            await asyncio.gather(*still_running, return_exceptions=True)
        self._socket.close()
        if self._socket_is_ours():  # not after samba-dcerpcd took the path over
            os.unlink(self._socket_path)

    def _socket_is_ours(self) -> bool:
        try:
            info = os.stat(self._socket_path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._socket_identity

    async def _watch_socket(self) -> None:
        """samba-dcerpcd started with rpcd_fsrvp would silently take the pipe over: say so, loudly."""
        taken = False
        while True:
            await asyncio.sleep(SOCKET_WATCH_SECONDS)
            ours = self._socket_is_ours()
            if not ours and not taken:
                log.error("%s is no longer fsrvpd's socket: another process (samba-dcerpcd with rpcd_fsrvp?) took "
                          "the FSRVP pipe; smbd no longer reaches fsrvpd. Stop it and restart fsrvpd.",
                          self._socket_path)
            taken = not ours

    # -- pipe connections ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      handle_pipe: PipeHandler) -> None:
        task = asyncio.current_task()
        self._pipe_tasks.add(task)
        try:
            opened = await self._handshake(reader, writer)
            if opened is not None:
                caller, connection = opened
                pipe = _MessagePipe(connection, reader, writer)
                await handle_pipe(pipe, pipe, caller)
        except Exception:
            log.exception("the %s pipe from smbd failed", PIPE_NAME)
        finally:
            self._pipe_tasks.discard(task)
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> tuple[Caller, npa.NpaServerConnection] | None:
        """Check the peer is root, read smbd's request, answer it; None if the pipe must close."""
        pid, uid, _ = struct.unpack("3i", writer.get_extra_info("socket").getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid not in (0, os.geteuid()):
            log.warning("refused a pipe connection from uid %d (pid %d): only smbd, running as root, may connect",
                        uid, pid)
            return None
        connection = npa.NpaServerConnection()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_SECONDS):
            while connection.request is None and not connection.closed:
                data = await reader.read(READ_SIZE)
                if not data:
                    return None
                for event in connection.receive_data(data):
                    if isinstance(event, npa.ProtocolError):
                        log.error("refused a pipe handshake from smbd (pid %d): %s", pid, event.reason)
        writer.write(connection.data_to_send())
        await writer.drain()
        if connection.closed:
            return None
        request = connection.request
        if not request.complete:
            log.warning("%s from %s: the session's token has claims, which fsrvpd does not read; only its SIDs "
                        "are used", request.remote_client_name, request.remote_client_addr)
        caller = Caller(user=request.account, domain=request.domain,
                        address=_client_address(request.remote_client_addr), sids=frozenset(request.sids))
        return caller, connection

    # -- shares ------------------------------------------------------------------------------------

    async def publish_share(self, share: ShareSpec) -> None:
        if share.base is None:
            raise ValueError(f"{share.name}: Samba serves the base shares itself; fsrvpd publishes snapshots only")
        await asyncio.to_thread(self._publish, share)

    def _publish(self, share: ShareSpec) -> None:
        base = self._base_share(share.base)
        if base is None:
            raise SambaError(f"Samba has no share {share.base!r} to copy for {share.name}")
        replacing = share.name in self._owned()
        existing = self._sections.get(share.name)
        if not replacing and existing is not None and existing.get(OWNER_PARAMETER) is None:
            raise SambaError(f"Samba already has a share {share.name!r} that fsrvpd did not make; leaving it alone")
        sddl = self.tools.security_descriptor(share.base)
        self.tools.put_share(share.name, snapshot_share_parameters(base, share.path, share.read_only, share.base))
        self.tools.set_security_descriptor(share.name, sddl)
        if replacing:  # smbd finds a new registry share by itself at its first tree connect
            self.tools.reload_smbd()
        self._owned()[share.name] = share.base

    def _base_share(self, name: str) -> dict[str, str] | None:
        """The base share's parameters (None if Samba has no such share), read at most
        BASE_SHARES_MAX_AGE_SECONDS ago, or now if the copy has no share of that name."""
        def lookup() -> dict[str, str] | None:
            return next((params for section, params in self._sections.items()
                         if section.casefold() == name.casefold()), None)

        if time.monotonic() - self._sections_read_at > BASE_SHARES_MAX_AGE_SECONDS or lookup() is None:
            self._sections, self._sections_read_at = self.tools.sections(), time.monotonic()
        return lookup()

    async def unpublish_share(self, name: str) -> None:
        await asyncio.to_thread(self._unpublish, name)

    def _unpublish(self, name: str) -> None:
        owned = self._owned()
        if name not in owned:
            owned.update(owned_shares(self.tools.registry_sections()))  # maybe written by an fsrvpd before
            if name not in owned:
                return
        self.tools.delete_share(name)
        self.tools.reload_smbd()
        owned.pop(name, None)

    def accounts(self) -> Accounts:
        return SambaPassdbAccounts(self.tools)

    def share_names(self) -> set[str]:
        """The snapshot shares fsrvpd has in Samba's registry (tagged), including those of a previous run."""
        return set(self._owned())

    def _owned(self) -> dict[str, str]:
        if self._published is None:
            self._published = owned_shares(self.tools.registry_sections())
        return self._published

"""The embedded front door: fsrvpd itself is the SMB server, built on impacket's smbserver.

impacket's server is a test tool, not a file server, so this module keeps it but closes what it
leaves open:

* Pipes never touch TCP.  impacket connects every named-pipe open to a registered loopback TCP
  port, which any local process could reach without SMB authentication.  Here each pipe open on
  IPC$ gets a `socket.socketpair()`: impacket reads and writes one end as it would its TCP socket,
  the other end goes to the FSRVP handler on the daemon's event loop (or to impacket's own
  srvsvc/wkssvc servers in a thread).  Nothing else on IPC$ opens: impacket would serve the
  process's working directory there.
* Logons are real.  impacket marks a connection authenticated after *any* session-setup leg,
  even a failed one, lets anonymous and guest logons in, and uses one fixed NTLM challenge (so a
  captured response could be replayed).  Here only a completed logon of a configured user counts,
  and every logon gets a fresh random challenge.
* SMB1 is off: impacket's SMB1 commands bypass every check below.
* Signing is required and checked.  impacket signs its answers but never verifies a request's
  signature, and only offers signing, so a man in the middle could act in a client's session.
* Read-only shares refuse every change: impacket only refuses creating files there.
* A pipe transceive (FSCTL_PIPE_TRANSCEIVE, how Windows and rpcclient make their calls) answers
  with exactly one message, as on a Windows message-mode pipe, and is answered here without
  impacket's packet classes (a third of a call's time went into them): impacket answers with
  whatever one read of the socket returns (part of a PDU, or two) and never says the message went
  on.  A transceive inside a compound request, which no RPC client sends, is still impacket's.
* Handles are closed when a client drops its connection (impacket leaks them, which would keep a
  snapshot busy), and impacket's NTLM-hash log line never reaches a log.

Everything impacket does runs in its threads (one per SMB connection); the event loop only
receives the pipe streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import struct
import threading
from typing import Callable

from impacket import smb
from impacket import smb3structs as smb2
from impacket import uuid as impacket_uuid
from impacket.dcerpc.v5.srvs import STYPE_DISKTREE, STYPE_IPC, STYPE_SPECIAL
from impacket.nt_errors import (STATUS_ACCESS_DENIED, STATUS_BAD_NETWORK_NAME, STATUS_BUFFER_OVERFLOW,
                                STATUS_INVALID_PARAMETER, STATUS_LOGON_FAILURE,
                                STATUS_MORE_PROCESSING_REQUIRED, STATUS_OBJECT_NAME_NOT_FOUND,
                                STATUS_OBJECT_PATH_NOT_FOUND, STATUS_PIPE_DISCONNECTED, STATUS_PIPE_NOT_AVAILABLE,
                                STATUS_SUCCESS)
from impacket.smbserver import PIPE_FILE_DESCRIPTOR, SMBSERVER, SRVSServer, WKSTServer, normalize_path

from ..constants import PIPE_NAME
from ..dcerpc import HEADER_SIZE, fragment_length
from ..ntlm import Accounts, NtHashAccounts
from ..observer import Observer
from .base import Caller, FrontDoor, PipeHandler, ShareSpec

log = logging.getLogger("fsrvpd.smb")

IPC_SHARE = "IPC$"
SERVE_POLL_SECONDS = 0.1
PIPE_TASKS_GRACE_SECONDS = 2.0

# Any of these in a CREATE's DesiredAccess asks for the right to change the file or directory.
MODIFYING_ACCESS = (smb2.FILE_WRITE_DATA | smb2.FILE_APPEND_DATA | smb2.FILE_WRITE_EA | smb2.FILE_DELETE_CHILD
                    | smb2.FILE_WRITE_ATTRIBUTES | smb2.DELETE | smb2.WRITE_DAC | smb2.WRITE_OWNER
                    | smb2.GENERIC_WRITE | smb2.GENERIC_ALL)
FILE_ATTRIBUTE_NORMAL = 0x80
SMB2_MAGIC, SMB1_MAGIC = b"\xfeSMB", b"\xffSMB"
SMB2_DIALECT_OFFERS = (b"\x02SMB 2.002\x00", b"\x02SMB 2.???\x00")
COMPOUND_FILE_ID = b"\xff" * 16  # "the handle the CREATE earlier in this compound request returned"
# MS-SMB2 2.2.1.2 SYNC header, 2.2.31 IOCTL request and 2.2.32 response (fixed parts), 2.2.2 ERROR
SMB2_HEADER = struct.Struct("<4sHHIHHIIQIIQ16s")
IOCTL_REQUEST = struct.Struct("<HHI16sIIIIIIII")
IOCTL_RESPONSE = struct.Struct("<HHI16sIIIIII")
ERROR_BODY = struct.Struct("<HBBIB")
IOCTL_OUTPUT_OFFSET = SMB2_HEADER.size + IOCTL_RESPONSE.size  # the output follows the fixed parts
SECURITY_MODE = smb2.SMB2_NEGOTIATE_SIGNING_ENABLED | smb2.SMB2_NEGOTIATE_SIGNING_REQUIRED
# MS-SMB2 3.3.5.2.4: the server does not verify these requests' signatures.
UNSIGNED_COMMANDS = {smb2.SMB2_SESSION_SETUP, smb2.SMB2_CANCEL}

# impacket logs each logon as John-the-Ripper input ("user::domain:challenge:ntproof:blob"):
# whoever reads the log could crack the password offline.
CAPTURED_HASH = re.compile(r"::[^:]*:[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F]*$")


class EmbeddedFrontDoor(FrontDoor):
    """Serves SMB2 itself: the FSRVP pipe, srvsvc/wkssvc and the published shares."""

    def __init__(self, listen_address: str, port: int, users: dict[str, str], server_name: str,
                 domain: str = "WORKGROUP", observer: Observer | None = None, max_connections_per_client: int = 16):
        """`users` maps each account name to its NT hash in hex; names match case-insensitively.
        A client address may hold `max_connections_per_client` SMB connections; more are closed at once."""
        for user, nt_hash in users.items():
            if not re.fullmatch(r"[0-9a-fA-F]{32}", nt_hash):
                raise ValueError(f"the NT hash of {user!r} must be 32 hex digits")
        self._listen_address = listen_address
        self._port = port
        self._users = dict(users)
        self._accounts = {user.lower(): user for user in users}
        self._server_name = server_name
        self._domain = domain
        self._observer = observer or Observer()
        self._max_connections_per_client = max_connections_per_client
        self._shares: dict[str, ShareSpec] = {}
        self._config = self._build_config()
        self._server: _SmbServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle_pipe: PipeHandler | None = None
        self._pipe_tasks: set[asyncio.Task] = set()
        self._impacket_handlers: dict[int, Callable] = {}
        self._impacket_validate_negotiate: Callable | None = None
        self._pipe_servers: dict[str, Callable[[socket.socket, dict], None]] = {
            PIPE_NAME.lower(): self._pass_to_daemon,
            "srvsvc": lambda sock, _: self._serve_in_thread(self._srvsvc_server(), sock),
            "wkssvc": lambda sock, _: self._serve_in_thread(WKSTServer(), sock),
        }

    @property
    def port(self) -> int:
        """The TCP port served; after a start with port 0, the one the kernel chose (kept for restarts)."""
        return self._port

    async def start(self, handle_pipe: PipeHandler) -> None:
        if self._server is not None:
            raise RuntimeError("the embedded SMB server is already running")
        _route_impacket_logs()
        self._loop = asyncio.get_running_loop()
        self._handle_pipe = handle_pipe
        server = _SmbServer((self._listen_address, self._port), self._config, self._max_connections_per_client)
        self._port = server.server_address[1]
        for user, nt_hash in self._users.items():
            server.addCredential(user, 0, "", nt_hash)
        hooks = {
            smb2.SMB2_NEGOTIATE: self._negotiate,
            smb2.SMB2_SESSION_SETUP: self._session_setup,
            smb2.SMB2_TREE_CONNECT: self._tree_connect,
            smb2.SMB2_CREATE: self._create,
            smb2.SMB2_CLOSE: self._close,
            smb2.SMB2_WRITE: self._guard_handle(smb2.SMB2Write),
            smb2.SMB2_SET_INFO: self._guard_handle(smb2.SMB2SetInfo),
        }
        self._impacket_handlers = {command: server.hookSmb2Command(command, hook) for command, hook in hooks.items()}
        ioctls = server.getIoctls()
        self._impacket_validate_negotiate = ioctls[smb2.FSCTL_VALIDATE_NEGOTIATE_INFO]
        ioctls[smb2.FSCTL_VALIDATE_NEGOTIATE_INFO] = self._validate_negotiate
        self._server = server
        self._serve_thread = threading.Thread(target=server.serve_forever, args=(SERVE_POLL_SECONDS,),
                                              name="fsrvpd-smb", daemon=True)
        self._serve_thread.start()
        log.info("embedded SMB server listening on %s port %d", self._listen_address, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.disconnect_all()
        await asyncio.to_thread(server.server_close)  # joins the connection threads
        self._serve_thread.join()
        if self._pipe_tasks:
            _, still_running = await asyncio.wait(self._pipe_tasks, timeout=PIPE_TASKS_GRACE_SECONDS)
            for task in still_running:
                task.cancel()
            await asyncio.gather(*still_running, return_exceptions=True)
        log.info("embedded SMB server stopped")

    async def publish_share(self, share: ShareSpec) -> None:
        if share.name.upper() == IPC_SHARE or not share.name or re.search(r"[\\/]", share.name):
            raise ValueError(f"cannot publish a share named {share.name!r}")
        self._shares[share.name.upper()] = share
        self._apply_config()

    async def unpublish_share(self, name: str) -> None:
        if self._shares.pop(name.upper(), None) is not None:
            self._apply_config()

    def accounts(self) -> Accounts:
        return NtHashAccounts(self._users)

    def share_names(self) -> set[str]:
        return {share.name for share in self._shares.values()}

    # --- configuration -------------------------------------------------------------------------

    def _build_config(self) -> _Configuration:
        """A complete impacket configuration; a new object every time, never changed afterwards."""
        sections = {
            "global": {
                "server_name": self._server_name,
                "server_os": "Unix",
                "server_domain": self._domain,
                "log_file": "None",
                "credentials_file": "",
                "SMB2Support": "True",
                "anonymous_logon": "False",
            },
            IPC_SHARE: {"comment": "", "read only": "yes", "share type": str(STYPE_IPC | STYPE_SPECIAL), "path": ""},
        }
        for key, share in self._shares.items():
            sections[key] = {"comment": share.comment, "read only": "yes" if share.read_only else "no",
                             "share type": str(STYPE_DISKTREE), "path": share.path}
        return _Configuration(sections)

    def _apply_config(self) -> None:
        """Swap in a fresh configuration: impacket threads read it unlocked, so it is replaced, not edited."""
        self._config = self._build_config()
        if self._server is not None:
            self._server.setServerConfig(self._config)

    # --- SMB2 hooks (run in impacket's connection threads) ---------------------------------------

    def _negotiate(self, conn_id, smb_server, packet, is_smb1=False):
        """Ask clients to sign every request of their session (see _SmbServer.processRequest)."""
        responses, packets, status = self._impacket_handlers[smb2.SMB2_NEGOTIATE](conn_id, smb_server, packet,
                                                                                 is_smb1)
        packets[0]["Data"]["SecurityMode"] = SECURITY_MODE
        return responses, packets, status

    def _validate_negotiate(self, conn_id, smb_server, request):
        """Confirm the security mode we negotiated: clients that sign check it and hang up on a mismatch."""
        answer, status = self._impacket_validate_negotiate(conn_id, smb_server, request)
        confirmed = smb2.VALIDATE_NEGOTIATE_INFO_RESPONSE(answer)
        confirmed["SecurityMode"] = SECURITY_MODE
        return confirmed.getData(), status

    def _session_setup(self, conn_id, smb_server, packet):
        """Let a connection in only after a completed logon of a configured user."""
        responses, packets, status = self._impacket_handlers[smb2.SMB2_SESSION_SETUP](conn_id, smb_server, packet)
        connection = smb_server.getConnectionData(conn_id, checkStatus=False)
        if status == STATUS_MORE_PROCESSING_REQUIRED:
            connection["Authenticated"] = False  # impacket opens the door after the first leg
            return responses, packets, status
        smb_server.forget_challenge()
        if status == STATUS_SUCCESS and _logged_on_user(connection).lower() in self._accounts:
            connection["user_name"] = _logged_on_user(connection)
            return responses, packets, status
        log.info("refused SMB logon from %s (unknown user, wrong password, guest or anonymous)",
                 connection["ClientIP"])
        self._observer.caller_refused("logon")
        connection.update(Authenticated=False, SignatureEnabled=False, user_name="")
        return [smb2.SMB2Error()], None, STATUS_LOGON_FAILURE

    def _tree_connect(self, conn_id, smb_server, packet):
        """Name an unknown share as MS-SMB2 3.3.5.7 does; impacket answers STATUS_OBJECT_PATH_NOT_FOUND."""
        responses, packets, status = self._impacket_handlers[smb2.SMB2_TREE_CONNECT](conn_id, smb_server, packet)
        if status == STATUS_OBJECT_PATH_NOT_FOUND:
            packets[0]["Status"] = status = STATUS_BAD_NETWORK_NAME  # processRequest signs it afterwards
        return responses, packets, status

    def _create(self, conn_id, smb_server, packet):
        """Open pipes ourselves; on read-only shares, refuse any open that could change something."""
        connection = smb_server.getConnectionData(conn_id)
        share = connection["ConnectedShares"].get(packet["TreeID"])
        if share is None:
            return self._impacket_handlers[smb2.SMB2_CREATE](conn_id, smb_server, packet)
        request = smb2.SMB2Create(packet["Data"])
        if share["shareName"].upper() == IPC_SHARE:
            return self._open_pipe(connection, request)
        read_only = share["read only"] == "yes"
        if read_only and _asks_to_modify(request):
            log.debug("refused a modifying open on read-only share %s from %s", share["shareName"],
                      connection["ClientIP"])
            return [smb2.SMB2Error()], None, STATUS_ACCESS_DENIED
        responses, packets, status = self._impacket_handlers[smb2.SMB2_CREATE](conn_id, smb_server, packet)
        if status == STATUS_SUCCESS:
            refused = {smb2.SMB2_WRITE, smb2.SMB2_SET_INFO} if read_only else set()
            connection["OpenedFiles"][responses[0]["FileID"]]["RefusedCommands"] = refused
        return responses, packets, status

    def _open_pipe(self, connection: dict, request) -> tuple:
        """Open a pipe exactly as impacket's own pipe branch would, but over a socketpair."""
        name = normalize_path(request["Buffer"][:request["NameLength"]].decode("utf-16le"))
        serve = self._pipe_servers.get(name.lower())
        if serve is None:
            return [smb2.SMB2Error()], None, STATUS_OBJECT_NAME_NOT_FOUND
        impacket_end, our_end = socket.socketpair()
        try:
            serve(our_end, connection)
        except RuntimeError:  # the event loop is gone: the daemon is shutting down
            impacket_end.close()
            our_end.close()
            return [smb2.SMB2Error()], None, STATUS_PIPE_NOT_AVAILABLE
        file_id = impacket_uuid.generate()
        response = smb2.SMB2Create_Response()
        response["FileID"] = file_id
        response["CreateAction"] = smb2.FILE_OPENED
        response["AllocationSize"] = 4096
        response["FileAttributes"] = FILE_ATTRIBUTE_NORMAL
        response["Buffer"] = b"\x00"
        connection["OpenedFiles"][file_id] = {
            "FileHandle": PIPE_FILE_DESCRIPTOR,
            "FileName": name,
            "DeleteOnClose": False,
            "Open": {"EnumerationLocation": 0, "EnumerationSearchPattern": ""},
            "Socket": impacket_end,
            "RefusedCommands": {smb2.SMB2_SET_INFO},  # impacket would apply it to a file named like the pipe
        }
        connection["LastRequest"]["SMB2_CREATE"] = response
        return [response], None, STATUS_SUCCESS

    def _guard_handle(self, request_type) -> Callable:
        """A hook that refuses the command on handles whose open forbade it, else runs impacket's."""
        def hook(conn_id, smb_server, packet):
            connection = smb_server.getConnectionData(conn_id)
            _, open_file = _find_open_file(connection, request_type(packet["Data"])["FileID"])
            if open_file is not None and packet["Command"] in open_file["RefusedCommands"]:
                log.debug("refused SMB2 command %#x on %s from %s", packet["Command"], open_file["FileName"],
                          connection["ClientIP"])
                return [smb2.SMB2Error()], None, STATUS_ACCESS_DENIED
            return self._impacket_handlers[packet["Command"]](conn_id, smb_server, packet)
        return hook

    def _close(self, conn_id, smb_server, packet):
        """Forget every handle impacket closed: it keeps the entry when delete-on-close fails, although
        the descriptor is already closed, and a later cleanup must not close a recycled descriptor."""
        connection = smb_server.getConnectionData(conn_id)
        file_id, open_file = _find_open_file(connection, smb2.SMB2Close(packet["Data"])["FileID"])
        result = self._impacket_handlers[smb2.SMB2_CLOSE](conn_id, smb_server, packet)
        if open_file is not None and packet["TreeID"] in connection["ConnectedShares"]:
            connection["OpenedFiles"].pop(file_id, None)
        return result

    # --- pipe servers ----------------------------------------------------------------------------

    def _pass_to_daemon(self, sock: socket.socket, connection: dict) -> None:
        """Hand an FSRVP pipe to the daemon's handler on its event loop."""
        caller = Caller(user=self._accounts[connection["user_name"].lower()], domain=self._domain,
                        address=connection["ClientIP"])
        self._loop.call_soon_threadsafe(self._start_pipe_task, sock, caller)

    def _start_pipe_task(self, sock: socket.socket, caller: Caller) -> None:
        task = self._loop.create_task(self._serve_pipe(sock, caller))
        self._pipe_tasks.add(task)
        task.add_done_callback(self._pipe_tasks.discard)

    async def _serve_pipe(self, sock: socket.socket, caller: Caller) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        log.info("%s pipe opened by %s\\%s from %s", PIPE_NAME, caller.domain, caller.user, caller.address)
        try:
            await self._handle_pipe(reader, writer, caller)
        except Exception:
            log.exception("the %s pipe handler failed for %s", PIPE_NAME, caller.address)
        finally:
            writer.close()

    def _srvsvc_server(self) -> SRVSServer:
        """impacket's share-enumeration server, listing the shares published right now."""
        server = SRVSServer()
        server.setServerConfig(self._config)
        server.processConfigFile()
        for share in server._shares.values():
            share["share type"] = int(share["share type"])  # impacket passes the string on: NDR packs it as 0
        return server

    @staticmethod
    def _serve_in_thread(rpc_server, sock: socket.socket) -> None:
        """Run one of impacket's DCE/RPC servers on a pipe socket instead of its TCP listener."""
        rpc_server._sock.close()  # impacket binds a loopback TCP port in the constructor; unused here
        rpc_server.set_client_socket(sock)
        threading.Thread(target=_answer_rpc_calls, args=(rpc_server, sock), name="fsrvpd-smb-rpc",
                         daemon=True).start()


class _Configuration:
    """The part of ConfigParser's interface impacket reads its configuration through.

    A ConfigParser holds about 11 KB per section and the configuration is rebuilt whole at every
    publish: with many exposed shares that was the largest part of the daemon's memory, and the
    rebuild a tenth of a 64-share cycle's time (bench/). Option names are case-insensitive, as in
    ConfigParser; a share may be called "default" (no default section).
    """

    def __init__(self, sections: dict[str, dict[str, str]]):
        self._sections = {name: {option.lower(): value for option, value in options.items()}
                          for name, options in sections.items()}

    def sections(self) -> list[str]:
        return list(self._sections)

    def has_section(self, section: str) -> bool:
        return section in self._sections

    def has_option(self, section: str, option: str) -> bool:
        return option.lower() in self._sections.get(section, {})

    def items(self, section: str) -> list[tuple[str, str]]:
        return list(self._sections[section].items())

    def get(self, section: str, option: str) -> str:
        return self._sections[section][option.lower()]

    def getboolean(self, section: str, option: str) -> bool:
        return self.get(section, option).lower() in ("1", "yes", "true", "on")


class _SmbServer(SMBSERVER):
    """impacket's SMB server with per-logon challenges, connection tracking and handle cleanup."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], config: _Configuration, max_connections_per_client: int):
        # Set before TCPServer reads it: impacket 0.10 (Debian 12's) has no `ipv6` argument for this.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, config_parser=config)
        self._connection_sockets: set[socket.socket] = set()
        self._max_connections_per_client = max_connections_per_client
        self._client_of_socket: dict[socket.socket, str] = {}
        self._connections_of_client: dict[str, int] = {}
        self._counting = threading.Lock()
        self._connection_state = threading.local()  # impacket serves each connection in its own thread
        self.processConfigFile()

    def getSMBChallenge(self) -> bytes:
        """A random challenge per logon; impacket's default is the constant b'AAAAAAAA'."""
        if not hasattr(self._connection_state, "challenge"):
            self._connection_state.challenge = secrets.token_bytes(8)
        return self._connection_state.challenge

    def forget_challenge(self) -> None:
        """The logon finished: the next one must not reuse this challenge."""
        self._connection_state.__dict__.pop("challenge", None)

    def processRequest(self, connId, data):
        """Let impacket see only SMB2 (and the SMB1 NEGOTIATE that upgrades to it), signed once logged on."""
        connection = self.getConnectionData(connId, checkStatus=False)
        if data[:4] == SMB2_MAGIC:
            if connection["Authenticated"] and connection["SignatureEnabled"]:
                if not all(_signed_by(connection["SigningSessionKey"], message) for message in _compounded(data)):
                    return self._drop(connection, "a request without a valid signature")
                answer = _pipe_call(connection, data)
                if answer is not None:
                    return [answer]
        elif not _upgrades_to_smb2(data):
            return self._drop(connection, "a protocol other than SMB2")
        return super().processRequest(connId, data)

    def _drop(self, connection: dict, offence: str) -> list:
        """End this connection: handle() finds its input closed and leaves without an answer."""
        log.info("dropping the SMB connection from %s: %s", connection["ClientIP"], offence)
        with contextlib.suppress(OSError):
            self._connection_state.socket.shutdown(socket.SHUT_RDWR)
        return []

    def process_request(self, request, client_address):
        """Count the connection against its client (limits.max_connections_per_client) or close it."""
        address = client_address[0]
        with self._counting:
            admitted = self._connections_of_client.get(address, 0) < self._max_connections_per_client
            if admitted:
                self._connections_of_client[address] = self._connections_of_client.get(address, 0) + 1
                self._client_of_socket[request] = address
        if not admitted:
            log.warning("closing a new SMB connection from %s: it already has %d (limits.max_connections_per_client)",
                        address, self._max_connections_per_client)
            self.shutdown_request(request)
            return
        self._connection_sockets.add(request)  # here, in the accepting thread, so stop() sees them all
        super().process_request(request, client_address)

    def finish_request(self, request, client_address):
        self._connection_state.socket = request
        super().finish_request(request, client_address)

    def shutdown_request(self, request):
        self._connection_sockets.discard(request)
        with self._counting:
            address = self._client_of_socket.pop(request, None)
            if address is not None:
                self._connections_of_client[address] -= 1
                if not self._connections_of_client[address]:
                    del self._connections_of_client[address]
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        log.debug("SMB connection from %s failed", client_address[0], exc_info=True)

    def removeConnection(self, name):
        """The client is gone: close what it left open (impacket would leak the descriptors)."""
        connection = self.getActiveConnections().get(name)
        if connection is not None:
            for open_file in list(connection["OpenedFiles"].values()):
                _close_open_file(open_file)
        super().removeConnection(name)

    def disconnect_all(self) -> None:
        """Wake every connection thread, including one blocked reading a pipe, so it can end.

        Client sockets are only shut for reading: a thread woken from a pipe read still sends its
        answer, then finds the end of its input and leaves quietly instead of failing a send.
        """
        pipe_sockets = [open_file["Socket"] for connection in list(self.getActiveConnections().values())
                        for open_file in list(connection["OpenedFiles"].values()) if "Socket" in open_file]
        for sock, how in [(pipe, socket.SHUT_RDWR) for pipe in pipe_sockets] + \
                [(client, socket.SHUT_RD) for client in list(self._connection_sockets)]:
            with contextlib.suppress(OSError):
                sock.shutdown(how)


def _logged_on_user(connection: dict) -> str:
    """The account of the logon that just succeeded; impacket 0.10 (Debian 12's) keeps only the message."""
    if connection.get("user_name"):
        return connection["user_name"]
    message = connection.get("AUTHENTICATE_MESSAGE")
    return message["user_name"].decode("utf-16le") if message is not None else ""


def _asks_to_modify(request) -> bool:
    return bool(request["DesiredAccess"] & MODIFYING_ACCESS
                or request["CreateDisposition"] != smb2.FILE_OPEN
                or request["CreateOptions"] & smb2.FILE_DELETE_ON_CLOSE)


def _find_open_file(connection: dict, file_id) -> tuple[bytes, dict | None]:
    """impacket's handle lookup, including its reading of the compound-request file id."""
    key = file_id.getData()
    if key == COMPOUND_FILE_ID and "SMB2_CREATE" in connection["LastRequest"]:
        key = connection["LastRequest"]["SMB2_CREATE"]["FileID"]
    return key, connection["OpenedFiles"].get(key)


def _close_open_file(open_file: dict) -> None:
    with contextlib.suppress(OSError):
        if "Socket" in open_file:
            open_file["Socket"].close()
        elif open_file["FileHandle"] >= 0:
            os.close(open_file["FileHandle"])


def _compounded(data: bytes):
    """The messages of a compound request, each with the padding its signature covers."""
    while True:
        next_command = int.from_bytes(data[20:24], "little")
        yield data[:next_command] if next_command else data
        if not next_command:
            return
        data = data[next_command:]


def _signed_by(key: bytes, message: bytes) -> bool:
    """MS-SMB2 3.1.5.1: whether the message carries its signature."""
    if len(message) < 64:
        return False
    if int.from_bytes(message[12:14], "little") in UNSIGNED_COMMANDS:
        return True
    if not int.from_bytes(message[16:20], "little") & smb2.SMB2_FLAGS_SIGNED:
        return False
    return hmac.compare_digest(_signature(key, message), message[48:64])


def _signature(key: bytes, message: bytes) -> bytes:
    """MS-SMB2 3.1.4.1 for dialect 2.0.2: HMAC-SHA256 over the message with its signature zeroed."""
    return hmac.new(key, message[:48] + bytes(16) + message[64:], hashlib.sha256).digest()[:16]


def _pipe_call(connection: dict, data: bytes) -> bytes | None:
    """The signed answer to a request that is one FSCTL_PIPE_TRANSCEIVE on an open pipe -- every
    RPC call of Windows and rpcclient -- made without impacket, whose generic packet parsing and
    packing cost about 1 ms per call, a third of the call; None for any other request, which
    impacket takes."""
    if len(data) < SMB2_HEADER.size + IOCTL_REQUEST.size:
        return None
    (_, _, credit_charge, _, command, credits, flags, next_command, message_id, process_id, tree_id, _,
     _) = SMB2_HEADER.unpack_from(data)
    if (command != smb2.SMB2_IOCTL or next_command or flags & ~smb2.SMB2_FLAGS_SIGNED
            or tree_id not in connection["ConnectedShares"]):
        return None
    (_, _, ctl_code, file_id, input_offset, input_count, _, _, _, max_output, ioctl_flags,
     _) = IOCTL_REQUEST.unpack_from(data, SMB2_HEADER.size)
    open_file = connection["OpenedFiles"].get(file_id)
    if (ctl_code != smb2.FSCTL_PIPE_TRANSCEIVE or ioctl_flags != smb2.SMB2_0_IOCTL_IS_FSCTL or open_file is None
            or open_file["FileHandle"] != PIPE_FILE_DESCRIPTOR or input_offset + input_count > len(data)):
        return None
    output, status = _exchange(open_file["Socket"], data[input_offset:input_offset + input_count], max_output)
    if output is None:
        body = ERROR_BODY.pack(ERROR_BODY.size, 0, 0, 0, 0)
    else:  # a StructureSize counts the first byte of the variable part
        body = IOCTL_RESPONSE.pack(IOCTL_RESPONSE.size + 1, 0, ctl_code, file_id, 0, 0, IOCTL_OUTPUT_OFFSET,
                                   len(output), 0, 0) + output
    message = SMB2_HEADER.pack(SMB2_MAGIC, SMB2_HEADER.size, credit_charge, status, command, credits,
                               smb2.SMB2_FLAGS_SERVER_TO_REDIR | smb2.SMB2_FLAGS_SIGNED, 0, message_id, process_id,
                               tree_id, connection["Uid"], bytes(16)) + body
    message += bytes(-len(message) % 8)  # as impacket pads every answer
    return message[:48] + _signature(connection["SigningSessionKey"], message) + message[64:]


def _exchange(pipe: socket.socket, request: bytes, max_output: int) -> tuple[bytes | None, int]:
    """A pipe transceive (MS-SMB2 3.3.5.15.3): write the request into the pipe, read the next
    message (every pipe here carries DCE/RPC, so one PDU) and answer it, or if it is longer than
    the client's MaxOutputResponse, its start with STATUS_BUFFER_OVERFLOW: the client reads the
    rest with READ, which finds it next in the socket.  A buffer that cannot hold a PDU header is
    refused (no RPC client has one), so nothing read is ever held back from the client.
    Returns the output and the status to answer with; no output on failure."""
    if max_output < HEADER_SIZE:
        return None, STATUS_INVALID_PARAMETER
    try:
        pipe.sendall(request)
        message = pipe.recv(HEADER_SIZE, socket.MSG_WAITALL)
        if len(message) < HEADER_SIZE:
            return None, STATUS_PIPE_DISCONNECTED
        whole = max(fragment_length(message), HEADER_SIZE)
        length = min(whole, max_output)
        if length > HEADER_SIZE:
            message += pipe.recv(length - HEADER_SIZE, socket.MSG_WAITALL)
    except OSError:
        return None, STATUS_PIPE_DISCONNECTED
    if len(message) < length:  # the pipe's server went away in the middle of its answer
        return None, STATUS_PIPE_DISCONNECTED
    return message, STATUS_SUCCESS if length == whole else STATUS_BUFFER_OVERFLOW


def _upgrades_to_smb2(data: bytes) -> bool:
    """An SMB1 NEGOTIATE that offers an SMB2 dialect: impacket answers it in SMB2."""
    return (data[:4] == SMB1_MAGIC and data[4] == smb.SMB.SMB_COM_NEGOTIATE
            and any(offer in data for offer in SMB2_DIALECT_OFFERS))


def _answer_rpc_calls(rpc_server, sock: socket.socket) -> None:
    """The loop of impacket's DCERPCServer.run, for one already connected pipe socket."""
    with sock:
        try:
            while (request := rpc_server.recv()) is not None:
                answer = rpc_server.processRequest(request)
                if answer is not None:
                    rpc_server.send(answer)
        except Exception:
            log.debug("impacket pipe server failed", exc_info=True)


class _ImpacketLogForwarder(logging.Handler):
    """impacket's levels say little (client mistakes at ERROR, credentials at INFO): forward its
    records to fsrvpd.smb at DEBUG and drop the captured-hash lines altogether."""

    def emit(self, record: logging.LogRecord) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        message = record.getMessage()
        if CAPTURED_HASH.search(message):
            return
        log.debug("impacket: %s", message)


def _route_impacket_logs() -> None:
    """Send impacket's records to the forwarder only (idempotent: every start calls it)."""
    impacket_log = logging.getLogger("impacket")
    if not any(isinstance(handler, _ImpacketLogForwarder) for handler in impacket_log.handlers):
        impacket_log.addHandler(_ImpacketLogForwarder())
    impacket_log.setLevel(logging.DEBUG)
    impacket_log.propagate = False

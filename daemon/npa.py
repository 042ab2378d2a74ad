"""Samba's named_pipe_auth protocol, server side, sans-I/O.

When a client opens `\\PIPE\\FssagentRpc`, smbd connects to the Unix socket
`<ncalrpc dir>/np/fssagentrpc` and sends one handshake request: a big-endian uint32 length, then
an NDR32 little-endian `named_pipe_auth_req` (librpc/idl/named_pipe_auth.idl) carrying the
client's and server's names and addresses and the session's `auth_session_info` (librpc/idl/
auth.idl, security.idl): account, domain and the security token's SIDs.  The server answers with
a `named_pipe_auth_rep`; from then on every message in either direction is framed by a 2-byte
little-endian length (message-mode pipe, as samba-dcerpcd answers it).

Levels: Samba 4.17-4.19 send level 7, 4.20 and later level 8.  The request layouts differ only
in the security token, which at level 8 also carries claim and device-SID arrays.  Claims use
Samba's relative pointers, whose layout no peer here can produce; when a level-8 token has any,
only the SIDs before them are read and the rest of the identity is left empty (`complete` False).

`NpaServerConnection` is the whole protocol as a state machine over bytes, like dcerpc.py.
"""

from __future__ import annotations

import dataclasses
import struct

MAGIC = b"NPAM"
LEVELS = (7, 8)
MAX_HANDSHAKE_BYTES = 0x00FFFFFF  # Samba's own limit for the request (tstream_u32_read)
MAX_MESSAGE_BYTES = 0xFFFF  # a message-mode length header is 16 bits
FILE_TYPE_MESSAGE_MODE_PIPE = 2
DEVICE_STATE = 0xFF | 0x0400 | 0x0100  # what samba-dcerpcd answers: ICOUNT 0xff, message read mode and type
ALLOCATION_SIZE = 4096
NCACN_NP = 1

NT_STATUS_OK = 0x00000000
NT_STATUS_INVALID_LEVEL = 0xC0000148
NT_STATUS_INVALID_PARAMETER = 0xC000000D


class NpaError(ValueError):
    """The handshake is malformed, or the peer broke the framing."""


class UnsupportedLevel(NpaError):
    def __init__(self, level: int):
        super().__init__(f"named_pipe_auth level {level}; fsrvpd speaks levels {', '.join(map(str, LEVELS))}")
        self.level = level


@dataclasses.dataclass(frozen=True)
class NpaRequest:
    """What smbd tells about the pipe's client: its address and its session's identity."""

    level: int
    transport: int
    remote_client_name: str
    remote_client_addr: str
    remote_client_port: int
    local_server_name: str
    local_server_addr: str
    local_server_port: int
    account: str = ""
    domain: str = ""
    unix_name: str = ""
    sids: tuple[str, ...] = ()  # the security token's SIDs: the user's first, then its groups
    complete: bool = True  # False: the token had claims, so only `sids` were read (see the module docstring)


class _NdrReader:
    """NDR32 little-endian primitives; offsets and alignment count from the start of the blob.

    Each struct aligns where it starts, to its widest member; NDR32 pads nothing after a struct.
    """

    def __init__(self, data: bytes, offset: int = 0):
        self.data = data
        self.offset = offset

    def align(self, size: int) -> None:
        self.offset = (self.offset + size - 1) // size * size
        if self.offset > len(self.data):
            raise NpaError("handshake ends inside its padding")

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise NpaError(f"handshake too short: {size} bytes wanted at offset {self.offset}")
        chunk = self.data[self.offset:end]
        self.offset = end
        return chunk

    def _number(self, fmt: str, size: int) -> int:
        self.align(size)
        return struct.unpack(fmt, self.take(size))[0]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return self._number("<H", 2)

    def u32(self) -> int:
        return self._number("<I", 4)

    def u64(self) -> int:
        return self._number("<Q", 8)

    def nttime(self) -> None:
        """NTTIME is two uint32 in Samba's NDR: 4-byte aligned, unlike a hyper."""
        self.align(4)
        self.take(8)

    def pointer(self) -> bool:
        """A unique pointer's referent id: zero is NULL; the pointee follows among the deferred buffers."""
        return self.u32() != 0

    def data_blob(self) -> bytes:
        return self.take(self.u32())

    def string(self) -> str:
        """A conformant varying UTF-8/DOS string that counts its terminating NUL."""
        maximum, offset, length = self.u32(), self.u32(), self.u32()
        if offset != 0 or length > maximum or length == 0:
            raise NpaError(f"bad string header at offset {self.offset - 12}")
        text = self.take(length)
        if text[-1:] != b"\x00":
            raise NpaError(f"string at offset {self.offset - length} is not NUL-terminated")
        return text[:-1].decode("utf-8", errors="replace")

    def strings(self, present: list[bool]) -> list[str]:
        """The deferred strings of several pointers, in order; '' for the NULL ones."""
        return [self.string() if here else "" for here in present]

    def sid(self) -> str:
        self.align(4)
        revision, count = self.u8(), self.u8()
        if count > 15:
            raise NpaError(f"a SID with {count} sub-authorities")
        authority = int.from_bytes(self.take(6), "big")
        subs = struct.unpack(f"<{count}I", self.take(4 * count))
        return "-".join(["S", str(revision), str(authority), *map(str, subs)])

    def sid_array(self, count: int) -> list[str]:
        """An inline conformant array: its own size first, which must match the counting field."""
        if self.u32() != count:
            raise NpaError("SID array size does not match its count")
        return [self.sid() for _ in range(count)]


def parse_request(blob: bytes) -> NpaRequest:
    """Decode a whole handshake request, length prefix included (NDR alignment counts from it)."""
    if len(blob) < 16 or blob[4:8] != MAGIC:
        raise NpaError("not a named_pipe_auth request (no NPAM magic)")
    if int.from_bytes(blob[:4], "big") != len(blob) - 4:
        raise NpaError("handshake length does not match its content")
    ndr = _NdrReader(blob, 8)
    level = ndr.u32()
    if level not in LEVELS:
        raise UnsupportedLevel(level)
    if ndr.u32() != level:
        raise NpaError("union discriminant differs from the level")
    transport = ndr.u8()
    name_ptrs = [ndr.pointer(), ndr.pointer()]
    remote_port = ndr.u16()
    name_ptrs += [ndr.pointer(), ndr.pointer()]
    local_port = ndr.u16()
    has_session = ndr.pointer()
    remote_name, remote_addr, local_name, local_addr = ndr.strings(name_ptrs)
    request = NpaRequest(level=level, transport=transport, remote_client_name=remote_name,
                         remote_client_addr=remote_addr, remote_client_port=remote_port,
                         local_server_name=local_name, local_server_addr=local_addr, local_server_port=local_port)
    if has_session:
        request = dataclasses.replace(request, **_session_info_transport(ndr, level))
    if request.complete and ndr.offset != len(blob):
        raise NpaError(f"{len(blob) - ndr.offset} bytes left over: this Samba's level-{level} layout is not understood")
    return request


def _session_info_transport(ndr: _NdrReader, level: int) -> dict:
    """auth_session_info_transport -> auth_session_info: token, unix token, user info, unix info."""
    ndr.align(4)
    has_session = ndr.pointer()
    ndr.data_blob()  # exported_gssapi_credentials
    if not has_session:
        return {}
    ndr.align(4)
    has_token, has_unix_token, has_info, has_unix_info = (ndr.pointer() for _ in range(4))
    ndr.pointer()  # torture: never sent
    ndr.data_blob()  # session_key
    ndr.pointer()  # credentials: never sent
    ndr.take(16)  # unique_session_token GUID
    ndr.u16()  # ticket_type
    identity: dict = {}
    if has_token:
        identity["sids"], complete = _security_token(ndr, level)
        if not complete:
            return {**identity, "complete": False}
    if has_unix_token:
        _skip_unix_token(ndr)
    if has_info:
        identity["account"], identity["domain"] = _user_info(ndr)
    if has_unix_info:
        ndr.align(4)
        identity["unix_name"], _ = ndr.strings([ndr.pointer(), ndr.pointer()])
    return identity


def _security_token(ndr: _NdrReader, level: int) -> tuple[tuple[str, ...], bool]:
    """The token's SIDs, and whether the rest of the handshake could be read after it."""
    ndr.align(8)  # the struct holds a hyper
    sids = tuple(ndr.sid_array(ndr.u32()))
    ndr.u64()  # privilege_mask
    ndr.u32()  # rights_mask
    if level >= 8:
        local_claims, user_claims, device_claims, device_sids = (ndr.u32() for _ in range(4))
        if local_claims or user_claims or device_claims:
            return sids, False
        for _ in range(3):
            if ndr.u32() != 0:
                raise NpaError("claims array size does not match its count")
        ndr.sid_array(device_sids)  # the client machine's groups (compound authentication): not the caller's
        ndr.u16()  # evaluate_claims
    return sids, True


def _skip_unix_token(ndr: _NdrReader) -> None:
    """security_unix_token: its trailing conformant array's size leads the struct."""
    groups = ndr.u32()
    ndr.align(8)
    ndr.u64()  # uid
    ndr.u64()  # gid
    if ndr.u32() != groups:
        raise NpaError("unix token group count does not match its array")
    for _ in range(groups):
        ndr.u64()


def _user_info(ndr: _NdrReader) -> tuple[str, str]:
    """auth_user_info: account and domain (the other strings and times are read past)."""
    ndr.align(4)
    account, principal = ndr.pointer(), ndr.pointer()
    ndr.u8()  # user_principal_constructed
    rest = [ndr.pointer() for _ in range(8)]  # domain, dns domain, full name, script, profile, home, drive, server
    for _ in range(6):
        ndr.nttime()
    ndr.u16()  # logon_count
    ndr.u16()  # bad_password_count
    ndr.u32()  # acct_flags
    ndr.u8()  # 4.17-4.18: uint8 authenticated; later: uint32 user_flags, whose other bytes the next align skips
    values = ndr.strings([account, principal, *rest])
    return values[0], values[2]


def encode_reply(level: int, status: int = NT_STATUS_OK) -> bytes:
    """named_pipe_auth_rep: a message-mode pipe at `level`, or level 0 with a failure status."""
    if level in LEVELS:
        body = struct.pack("<4sIIHH4xQI", MAGIC, level, level, FILE_TYPE_MESSAGE_MODE_PIPE, DEVICE_STATE,
                           ALLOCATION_SIZE, status)
    else:
        body = struct.pack("<4sIII", MAGIC, 0, 0, status)
    return struct.pack(">I", len(body)) + body


@dataclasses.dataclass(frozen=True)
class HandshakeReceived:
    request: NpaRequest


@dataclasses.dataclass(frozen=True)
class ProtocolError:
    """A malformed handshake or message: any reply is queued; close the connection after sending it."""

    reason: str


@dataclasses.dataclass(frozen=True)
class MessageReceived:
    payload: bytes


class NpaServerConnection:
    """One connection from smbd: the handshake, then message-mode framing both ways."""

    def __init__(self):
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self.request: NpaRequest | None = None
        self.closed = False

    def receive_data(self, data: bytes) -> list:
        """Feed bytes from smbd; returns HandshakeReceived/ProtocolError/MessageReceived events."""
        if self.closed:
            return []
        self._buffer += data
        events: list = []
        if self.request is None:
            if len(self._buffer) < 4:
                return events
            length = int.from_bytes(self._buffer[:4], "big")
            if length > MAX_HANDSHAKE_BYTES:
                return [self._refuse(0, NT_STATUS_INVALID_PARAMETER, f"handshake of {length} bytes")]
            if len(self._buffer) < 4 + length:
                return events
            blob = bytes(self._buffer[:4 + length])
            del self._buffer[:4 + length]
            try:
                self.request = parse_request(blob)
            except UnsupportedLevel as exc:
                return [self._refuse(0, NT_STATUS_INVALID_LEVEL, str(exc))]
            except NpaError as exc:
                return [self._refuse(0, NT_STATUS_INVALID_PARAMETER, str(exc))]
            self._outgoing += encode_reply(self.request.level)
            events.append(HandshakeReceived(self.request))
        while len(self._buffer) >= 2:
            length = int.from_bytes(self._buffer[:2], "little")
            if length == 0:
                self.closed = True
                return events + [ProtocolError("an empty message (Samba treats it as an I/O error)")]
            if len(self._buffer) < 2 + length:
                break
            events.append(MessageReceived(bytes(self._buffer[2:2 + length])))
            del self._buffer[:2 + length]
        return events

    def _refuse(self, level: int, status: int, reason: str) -> ProtocolError:
        self._outgoing += encode_reply(level, status)
        self.closed = True
        return ProtocolError(reason)

    def send_message(self, payload: bytes) -> None:
        """Queue one message (one DCE/RPC PDU, as smbd hands each message to one SMB read)."""
        if not 0 < len(payload) <= MAX_MESSAGE_BYTES:
            raise ValueError(f"a message holds 1 to {MAX_MESSAGE_BYTES} bytes, not {len(payload)}")
        self._outgoing += struct.pack("<H", len(payload)) + payload

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

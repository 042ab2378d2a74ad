"""Connection-oriented DCE/RPC, server side, sans-I/O (C706 chapter 12 with the MS-RPCE extensions).

`ServerConnection` turns the byte stream of one `\\PIPE\\FssagentRpc` connection into `RpcCall`
events and the daemon's answers into response or fault PDUs.  Like h11 it owns no socket, thread
or clock, so any byte sequence, split anywhere, can be tested directly.

Where C706 leaves room, the connection does what Windows does, as recorded by Samba's server
(librpc/rpc/dcesrv_core.c) and its Windows-verified tests (python/samba/tests/dcerpc/raw_protocol.py):
the first PDU must be a bind, a connection binds once, each bind or alter_context accepts at most
one new presentation context, both fragment sizes are negotiated to one value, and every bind_nak
and most protocol faults end the connection.  Deliberate differences are noted where they are made.

Only little-endian, ASCII, IEEE data representation is served: the stubs go to an NDR layer that
reads little-endian, and no client in practice (Windows, Samba, impacket) sends anything else.
A peer that does gets the same answer as for any other unacceptable header.

Authentication.  A bind may carry the first leg of a security context (rpcauth.py): NTLMSSP, or
SPNEGO around it, from the providers the daemon passes in.  The connection runs the legs (bind,
then auth3 or alter_context), and from then on checks every request fragment's verifier -- which
also enforces the sequence numbers -- unseals it at privacy level, and signs or seals every
response fragment.  Each call carries the authenticated Principal; whether its level is enough
is the daemon's decision, not this layer's.  Faults stay unsigned, as in Windows and Samba.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
import struct
import uuid
from typing import Mapping, NamedTuple

from .constants import PIPE_NAME
from .rpcauth import (PROTECTED_LEVELS, AuthError, AuthLevel, AuthType, Principal, SecurityContext,
                      SecurityProviders)

# Fault statuses (C706 appendix N, MS-RPCE 3.1.1.5.5, MS-ERREF).
NCA_S_OP_RNG_ERROR = 0x1C010002  # the daemon's answer to an opnum it does not know
NCA_S_UNKNOWN_IF = 0x1C010003  # request on a presentation context that was never accepted
NCA_S_PROTO_ERROR = 0x1C01000B  # the peer broke the protocol (MS-RPCE 3.3.3.5.7)
NCA_S_FAULT_REMOTE_NO_MEMORY = 0x1C00001B
NCA_S_FAULT_NDR = 0x000006F7  # RPC_X_BAD_STUB_DATA: the daemon could not decode the stub
RPC_S_ACCESS_DENIED = 0x00000005  # oversized request (MS-RPCE 3.3.3.5.4), auth data without auth
RPC_S_NO_CALL_ACTIVE = 0x000006BD  # Windows' answer to PFC_PENDING_CANCEL on a first fragment
RPC_S_SEC_PKG_ERROR = 0x00000721  # a security leg in an alter_context failed
RPC_S_SERVER_TOO_BUSY = 0x000006BB  # the daemon's answer to a client over its call rate

# Statuses a server MUST NOT put in a fault (MS-RPCE 3.3.3.5.1).
_FORBIDDEN_FAULT_STATUSES = frozenset({
    0x00000000, 0x80000001, 0x80000002, 0x80000003, 0xC0000005, 0xC0000006, 0xC000001D,
    0xC0000096, 0xC00000AA, 0xC00000FD, 0xC0000194, 0xC0000235, 0xC0000409, 0xC0000420,
})

HEADER_SIZE = 16
MIN_FRAGMENT_SIZE = 1432  # C706 MustRecvFragSize: the smallest fragment both sides must handle
DEFAULT_FRAGMENT_SIZE = 4280  # what SMB named pipes carry (Windows and Samba use it for ncacn_np)
DEFAULT_MAX_CALL_BYTES = 1 << 20
DEFAULT_SECONDARY_ADDRESS = "\\PIPE\\" + PIPE_NAME

_COMMON_HEADER = struct.Struct("<BBBB4sHHI")  # rpc_vers, minor, ptype, pfc_flags, drep, frag, auth, call_id
_PTYPE_OFFSET = 2  # of ptype in _COMMON_HEADER
_REQUEST_HEADER = struct.Struct("<IHH")  # alloc_hint, p_cont_id, opnum
_RESPONSE_HEADER = struct.Struct("<IHBB")  # alloc_hint, p_cont_id, cancel_count, reserved
_FAULT_BODY = struct.Struct("<IHBBII")  # alloc_hint, p_cont_id, cancel_count, reserved, status, reserved
_AUTH_TRAILER = struct.Struct("<BBBBI")  # auth_type, auth_level, auth_pad_length, reserved, context_id
_REQUEST_STUB_OFFSET = HEADER_SIZE + _REQUEST_HEADER.size
_RESPONSE_STUB_OFFSET = HEADER_SIZE + _RESPONSE_HEADER.size
_AUTH3_BODY_SIZE = 4
_RPC_VERSION = (5, 0)
_LITTLE_ENDIAN_ASCII_IEEE = b"\x10\x00\x00\x00"
_FRAGMENT_SIZE_GRANULE = 8  # negotiated sizes are truncated to a multiple of 8, as Windows does
_STUB_CHUNK_ALIGNMENT = 16  # response chunks stay aligned for the seal/sign padding of MS-RPCE 2.2.2.11
_BIND_AUTH_ALIGNMENT = 4  # the sec_trailer of bind_ack and alter_context_resp
_VT_MAGIC = bytes.fromhex("8ae3137102f43671")  # rpc_sec_verification_trailer (MS-RPCE 2.2.2.13)
_VT_SEARCH_BYTES = 1024  # how far from the stub's end a verification trailer is looked for, as Samba
_VT_MAX_PADDING = 16  # bytes a client may leave after the trailer's last command
_VT_COMMAND_END = 0x4000
_FAULT_ALLOC_HINT = 32  # MS-RPCE 2.2.2.x: extended error length is alloc_hint - 0x20, and we send none
_OLD_CALL_WINDOW = 150  # MS-RPCE 3.3.3.5.6: stray fragments of this many recent calls are dropped
_CONTEXTS_PER_INTERFACE = 4000  # MS-RPCE 3.3.3.5.5
_MAX_ASSOC_GROUP_ID = 0x7FFFFFFF  # positive, for clients that keep it in a signed int


class PduType(enum.IntEnum):
    """PTYPE values of the common header (C706 12.6.4, MS-RPCE 2.2.2.10)."""

    REQUEST = 0
    PING = 1
    RESPONSE = 2
    FAULT = 3
    WORKING = 4
    NOCALL = 5
    REJECT = 6
    ACK = 7
    CL_CANCEL = 8
    FACK = 9
    CANCEL_ACK = 10
    BIND = 11
    BIND_ACK = 12
    BIND_NAK = 13
    ALTER_CONTEXT = 14
    ALTER_CONTEXT_RESP = 15
    AUTH3 = 16
    SHUTDOWN = 17
    CO_CANCEL = 18
    ORPHANED = 19
    RTS = 20


class PfcFlag(enum.IntFlag):
    """pfc_flags bits; 0x04 means header signing in bind/alter PDUs and pending cancel elsewhere."""

    FIRST_FRAG = 0x01
    LAST_FRAG = 0x02
    PENDING_CANCEL = 0x04
    SUPPORT_HEADER_SIGN = 0x04
    RESERVED_1 = 0x08
    CONC_MPX = 0x10
    DID_NOT_EXECUTE = 0x20
    MAYBE = 0x40
    OBJECT_UUID = 0x80


_WHOLE_PDU = PfcFlag.FIRST_FRAG | PfcFlag.LAST_FRAG
_AUTHENTICATING_PDUS = frozenset({PduType.BIND, PduType.ALTER_CONTEXT, PduType.AUTH3})


def ends_request(pdu: bytes) -> bool:
    """Whether a client's PDU is the last fragment of a request, the one the server answers (what a
    client may send as a pipe transceive: its answer comes back in the same SMB exchange)."""
    if len(pdu) < HEADER_SIZE:
        return False
    ptype, flags = _COMMON_HEADER.unpack_from(pdu)[2:4]
    return ptype == PduType.REQUEST and bool(flags & PfcFlag.LAST_FRAG)


def fragment_length(header: bytes) -> int:
    """frag_length from a PDU's common header: how long the message a pipe carries is."""
    return _COMMON_HEADER.unpack_from(header)[5]


class BindNakReason(enum.IntEnum):
    """provider_reject_reason of bind_nak (C706 12.6.3.1, MS-RPCE 2.2.2.9)."""

    NOT_SPECIFIED = 0
    TEMPORARY_CONGESTION = 1
    LOCAL_LIMIT_EXCEEDED = 2
    PROTOCOL_VERSION_NOT_SUPPORTED = 4
    AUTHENTICATION_TYPE_NOT_RECOGNIZED = 8
    INVALID_CHECKSUM = 9


class ContextResult(enum.IntEnum):
    """Result of one presentation context in bind_ack and alter_context_resp."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    PROVIDER_REJECTION = 2
    NEGOTIATE_ACK = 3  # bind time feature negotiation (MS-RPCE 3.3.1.5.3)


class ProviderReason(enum.IntEnum):
    """Reason of a rejected presentation context."""

    NOT_SPECIFIED = 0
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 1
    PROPOSED_TRANSFER_SYNTAXES_NOT_SUPPORTED = 2
    LOCAL_LIMIT_EXCEEDED = 3


class BindTimeFeature(enum.IntFlag):
    """Bind time feature negotiation bits (MS-RPCE 2.2.2.14)."""

    SECURITY_CONTEXT_MULTIPLEXING = 0x01
    KEEP_CONNECTION_ON_ORPHAN = 0x02


# Orphaned PDUs never close a connection here, so keeping it open is supported; multiplexing
# security contexts waits for the security provider that will own them.
SUPPORTED_BIND_TIME_FEATURES = BindTimeFeature.KEEP_CONNECTION_ON_ORPHAN


@dataclasses.dataclass(frozen=True)
class SyntaxId:
    """An interface or transfer syntax: UUID plus major.minor version (p_syntax_id_t)."""

    uuid: uuid.UUID
    major: int
    minor: int = 0

    ENCODED_SIZE = 20

    def encode(self) -> bytes:
        return self.uuid.bytes_le + struct.pack("<HH", self.major, self.minor)

    @classmethod
    def decode(cls, data: bytes) -> SyntaxId:
        major, minor = struct.unpack_from("<HH", data, 16)
        return cls(uuid.UUID(bytes_le=bytes(data[:16])), major, minor)


NDR_SYNTAX = SyntaxId(uuid.UUID("8a885d04-1ceb-11c9-9fe8-08002b104860"), 2)
_NO_SYNTAX = SyntaxId(uuid.UUID(int=0), 0)
# A transfer syntax whose UUID starts with these 8 bytes (6cb71c2c-9812-4540) and whose version
# is 1.0 carries bind time feature bits in the remaining 8 bytes (MS-RPCE 3.3.1.5.3).
_BIND_TIME_FEATURE_PREFIX = uuid.UUID("6cb71c2c-9812-4540-0000-000000000000").bytes_le[:8]


@dataclasses.dataclass(frozen=True)
class RpcCall:
    """A complete, reassembled request for the daemon to answer with send_response or send_fault."""

    call_id: int
    context_id: int
    opnum: int
    stub: bytes
    interface: uuid.UUID  # abstract syntax bound to context_id
    principal: Principal | None = None  # who the RPC layer authenticated; None on an unauthenticated bind


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """The peer broke the protocol: send what data_to_send() still holds, then close the pipe."""

    reason: str


@dataclasses.dataclass(frozen=True)
class AuthenticationResult:
    """A security context finished its handshake (principal set) or failed (reason), for the audit log."""

    principal: Principal | None
    reason: str = ""


Event = RpcCall | ConnectionClosed | AuthenticationResult


class _Header(NamedTuple):
    ptype: int
    flags: int
    auth_length: int
    call_id: int


@dataclasses.dataclass(frozen=True)
class _AuthTrailer:
    """sec_trailer of a PDU (MS-RPCE 2.2.2.11) and the token or verifier after it."""

    auth_type: int
    auth_level: int
    pad_length: int
    context_id: int
    auth_value: bytes
    start: int  # offset of the sec_trailer in the PDU: the body (with its padding) ends here

    @property
    def verifier_start(self) -> int:
        return self.start + _AUTH_TRAILER.size


@dataclasses.dataclass(frozen=True)
class _ContextElement:
    context_id: int
    abstract_syntax: SyntaxId
    transfer_syntaxes: tuple[SyntaxId, ...]


@dataclasses.dataclass(frozen=True)
class _ContextOutcome:
    result: ContextResult
    reason: int
    transfer_syntax: SyntaxId = _NO_SYNTAX

    def encode(self) -> bytes:
        return struct.pack("<HH", self.result, self.reason) + self.transfer_syntax.encode()


@dataclasses.dataclass
class _IncomingCall:
    """A request whose fragments are still arriving."""

    call_id: int
    context_id: int
    opnum: int
    interface: uuid.UUID
    stub: bytearray


class _Malformed(Exception):
    """A PDU body that does not parse; answered as a protocol error."""


class _Rejection(Exception):
    """A PDU answered with a fault or bind_nak instead of being processed."""

    def __init__(self, reason: str, *, call_id: int, status: int = NCA_S_PROTO_ERROR,
                 nak: BindNakReason | None = None, context_id: int = 0,
                 did_not_execute: bool = True, close: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.call_id = call_id
        self.status = status
        self.nak = nak
        self.context_id = context_id
        self.did_not_execute = did_not_execute
        self.close = close


class _Reader:
    """Bounds-checked little-endian reads over one PDU body."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise _Malformed(f"PDU body ends {end - len(self._data)} bytes short")
        chunk = self._data[self._offset:end]
        self._offset = end
        return chunk

    def unpack(self, layout: str) -> tuple[int, ...]:
        return struct.unpack("<" + layout, self.take(struct.calcsize("<" + layout)))

    def syntax(self) -> SyntaxId:
        return SyntaxId.decode(self.take(SyntaxId.ENCODED_SIZE))

    def context_elements(self) -> list[_ContextElement]:
        """p_cont_list_t of bind and alter_context."""
        count, _reserved, _reserved2 = self.unpack("BBH")
        elements = []
        for _ in range(count):
            context_id, syntax_count, _reserved = self.unpack("HBB")
            abstract = self.syntax()
            transfers = tuple(self.syntax() for _ in range(syntax_count))
            elements.append(_ContextElement(context_id, abstract, transfers))
        return elements


def _verification_trailer(stub: bytes) -> tuple[int, list[tuple[int, bytes]]] | None:
    """Where a stub's verification trailer starts, and its (command, data) list; None if it has none.

    As in Samba, the last 4-aligned occurrence of the magic within the stub's last KiB starts the
    trailer if well-formed commands follow it up to the end (give or take 16 bytes of padding);
    otherwise the magic is taken for stub data."""
    last = (len(stub) - len(_VT_MAGIC)) & ~3
    for start in range(last, max(last - _VT_SEARCH_BYTES, 0) - 1, -4):
        if stub[start:start + len(_VT_MAGIC)] == _VT_MAGIC:
            break
    else:
        return None
    reader = _Reader(stub[start + len(_VT_MAGIC):])
    commands = []
    try:
        while not commands or not commands[-1][0] & _VT_COMMAND_END:
            command, length = reader.unpack("HH")
            commands.append((command, reader.take(length)))
    except _Malformed:
        return None
    return (start, commands) if reader.remaining <= _VT_MAX_PADDING else None


def _bind_time_features(syntax: SyntaxId) -> int | None:
    """The feature bits a transfer syntax offers, or None if it is not a feature negotiation one."""
    raw = syntax.uuid.bytes_le
    if raw[:8] != _BIND_TIME_FEATURE_PREFIX or (syntax.major, syntax.minor) != (1, 0):
        return None
    return int.from_bytes(raw[8:], "little")


def _pdu(ptype: PduType, flags: int, call_id: int, body: bytes, auth_length: int = 0) -> bytes:
    """A whole PDU: common header (always little-endian) plus body, which ends with any auth data."""
    header = _COMMON_HEADER.pack(*_RPC_VERSION, ptype, flags, _LITTLE_ENDIAN_ASCII_IEEE,
                                 HEADER_SIZE + len(body), auth_length, call_id)
    return header + body


def _bind_nak(call_id: int, reason: BindNakReason) -> bytes:
    # One supported version (5.0), then 3 pad bytes: the 24-byte layout Windows sends.
    body = struct.pack("<HBBB", reason, 1, *_RPC_VERSION) + bytes(3)
    return _pdu(PduType.BIND_NAK, _WHOLE_PDU, call_id, body)


def _fault(call_id: int, context_id: int, status: int, did_not_execute: bool) -> bytes:
    flags = _WHOLE_PDU | (PfcFlag.DID_NOT_EXECUTE if did_not_execute else 0)
    body = _FAULT_BODY.pack(_FAULT_ALLOC_HINT, context_id, 0, 0, status, 0)
    return _pdu(PduType.FAULT, flags, call_id, body)


class ServerConnection:
    """The server end of one connection-oriented DCE/RPC connection.

    Feed received bytes to receive_data(), answer each RpcCall once with send_response() or
    send_fault(), and write data_to_send() to the peer after each of these.
    """

    def __init__(self, interfaces: Mapping[uuid.UUID, tuple[int, int]],
                 max_recv_frag: int = DEFAULT_FRAGMENT_SIZE,
                 max_xmit_frag: int = DEFAULT_FRAGMENT_SIZE,
                 max_call_bytes: int = DEFAULT_MAX_CALL_BYTES,
                 secondary_address: str = DEFAULT_SECONDARY_ADDRESS,
                 security_providers: SecurityProviders | None = None,
                 refuse_binds: BindNakReason | None = None) -> None:
        """interfaces: abstract syntax UUID -> (major, minor) served; a client may bind to that
        major version with any minor version up to ours (C706 compatibility rule).

        max_recv_frag: largest request fragment accepted (the transport's limit, as in Windows);
        max_xmit_frag: largest fragment sent; max_call_bytes: largest reassembled request stub;
        secondary_address: what bind_ack names as our endpoint (clients ignore it, MS-RPCE 3.3.1.5.5);
        security_providers: auth_type -> provider of the security contexts a bind may ask for;
        refuse_binds: the daemon is at a limit, so the bind gets bind_nak with this reason.
        """
        for name, size in (("max_recv_frag", max_recv_frag), ("max_xmit_frag", max_xmit_frag)):
            if not MIN_FRAGMENT_SIZE <= size <= 0xFFFF:
                raise ValueError(f"{name} must be within {MIN_FRAGMENT_SIZE}..65535, not {size}")
        if max_call_bytes < 1:
            raise ValueError(f"max_call_bytes must be positive, not {max_call_bytes}")
        for interface, (major, minor) in interfaces.items():
            if not (0 <= major <= 0xFFFF and 0 <= minor <= 0xFFFF):
                raise ValueError(f"version {major}.{minor} of {interface} does not fit 16 bits")
        self._secondary_address = secondary_address.encode("ascii") + b"\0" if secondary_address else b""
        if len(self._secondary_address) > 0xFFFF:
            raise ValueError("secondary_address is too long")
        self._interfaces = dict(interfaces)
        self._max_recv_frag = max_recv_frag
        self._max_xmit_frag = max_xmit_frag
        self._max_call_bytes = max_call_bytes
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._bound = False
        self._fragment_size = min(max_recv_frag, max_xmit_frag)
        self._assoc_group_id = 0
        self._multiplexed = False
        self._contexts: dict[int, SyntaxId] = {}
        self._incoming: _IncomingCall | None = None
        self._outstanding: dict[int, RpcCall] = {}
        self._highest_call_id: int | None = None
        self._security_providers = dict(security_providers or {})
        self._refuse_binds = refuse_binds
        self._security: SecurityContext | None = None
        self._auth_context_id = 0
        self._auth_failure: str | None = None  # a failed auth3: the next request is refused
        self._client_header_signing = False
        self.closed = False

    # -- the application's side ------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the peer, split anywhere; returns the events they complete.

        After ConnectionClosed (also when `closed` is already true) further data is ignored.
        """
        if self.closed:
            return []
        self._inbox += data
        events: list[Event] = []
        while not self.closed:
            try:
                pdu = self._next_pdu()
                if pdu is None:
                    break
                events.extend(self._dispatch(*pdu))
            except _Rejection as rejection:
                events.extend(self._reject(rejection))
        return events

    def send_response(self, call: RpcCall, stub: bytes) -> None:
        """Answer a call with its output stub, fragmented within the negotiated size."""
        if self._take_outstanding(call):
            self._outbox += self._encode_response(call, stub)

    def send_fault(self, call: RpcCall, status: int) -> None:
        """Answer a call with a fault; nca_s_op_rng_error is flagged did-not-execute, as Windows does."""
        if not 0 <= status <= 0xFFFFFFFF or status in _FORBIDDEN_FAULT_STATUSES:
            raise ValueError(f"{status:#x} is not a fault status a server may send")
        if self._take_outstanding(call):
            self._outbox += _fault(call.call_id, call.context_id, status,
                                   did_not_execute=status == NCA_S_OP_RNG_ERROR)

    def may_authenticate(self, data: bytes) -> bool:
        """Whether `receive_data(data)` may check a leg of RPC authentication, where a security
        provider may look an account up outside the process (so the caller can run it off its event
        loop): the PDU that `data` starts or completes is a bind, alter-context or auth3."""
        head = bytes(self._inbox[:_PTYPE_OFFSET + 1]) + data[:_PTYPE_OFFSET + 1]
        return len(head) > _PTYPE_OFFSET and head[_PTYPE_OFFSET] in _AUTHENTICATING_PDUS

    def data_to_send(self) -> bytes:
        """Drain the bytes waiting for the peer."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def _take_outstanding(self, call: RpcCall) -> bool:
        """Whether an answer to `call` is still wanted; answers after a close are dropped."""
        if self.closed:
            return False
        if self._outstanding.get(call.call_id) is not call:
            raise ValueError(f"call {call.call_id} is not awaiting an answer on this connection")
        del self._outstanding[call.call_id]
        return True

    # -- framing ---------------------------------------------------------------------------

    def _next_pdu(self) -> tuple[_Header, bytes] | None:
        """The next whole PDU, once its header has been checked; None until it has all arrived."""
        if len(self._inbox) < HEADER_SIZE:
            return None
        rpc_vers, rpc_vers_minor, ptype, flags, drep, frag_length, auth_length, call_id = \
            _COMMON_HEADER.unpack_from(self._inbox)
        if (rpc_vers, rpc_vers_minor) != _RPC_VERSION:
            raise self._violation(call_id, f"RPC version {rpc_vers}.{rpc_vers_minor} is not 5.0")
        if drep != _LITTLE_ENDIAN_ASCII_IEEE:
            raise self._violation(call_id, f"data representation {drep.hex()} is not little-endian ASCII IEEE")
        if frag_length < HEADER_SIZE + (auth_length and _AUTH_TRAILER.size + auth_length):
            raise self._violation(call_id, f"frag_length {frag_length} cannot hold the PDU")
        if ptype == PduType.REQUEST and frag_length > self._max_recv_frag:
            # Windows checks the transport's limit, not the negotiated size, and does not
            # flag this fault as not executed.
            raise self._violation(call_id, f"request fragment of {frag_length} bytes exceeds "
                                           f"{self._max_recv_frag}", did_not_execute=False)
        if len(self._inbox) < frag_length:
            return None
        pdu = bytes(self._inbox[:frag_length])
        del self._inbox[:frag_length]
        return _Header(ptype, flags, auth_length, call_id), pdu

    def _dispatch(self, header: _Header, pdu: bytes) -> list[Event]:
        if not self._bound and header.ptype != PduType.BIND:
            raise self._violation(header.call_id, f"{self._type_name(header.ptype)} PDU before bind")
        handler = {
            PduType.BIND: self._handle_bind,
            PduType.ALTER_CONTEXT: self._handle_alter_context,
            PduType.REQUEST: self._handle_request,
            PduType.AUTH3: self._handle_auth3,
            PduType.CO_CANCEL: self._handle_cancel_or_orphaned,
            PduType.ORPHANED: self._handle_cancel_or_orphaned,
        }.get(header.ptype)
        if handler is None:
            raise self._violation(header.call_id, f"a client may not send {self._type_name(header.ptype)} PDUs")
        try:
            return handler(header, pdu)
        except _Malformed as malformed:
            raise self._violation(header.call_id, f"malformed {self._type_name(header.ptype)} PDU: {malformed}")

    def _violation(self, call_id: int, reason: str, *, did_not_execute: bool = True) -> _Rejection:
        """A protocol error that ends the connection: bind_nak before the bind, fault after it."""
        if not self._bound:
            return _Rejection(reason, call_id=call_id, nak=BindNakReason.PROTOCOL_VERSION_NOT_SUPPORTED)
        return _Rejection(reason, call_id=call_id, did_not_execute=did_not_execute)

    def _reject(self, rejection: _Rejection) -> list[Event]:
        if rejection.nak is not None:
            self._outbox += _bind_nak(rejection.call_id, rejection.nak)
        else:
            self._outbox += _fault(rejection.call_id, rejection.context_id, rejection.status,
                                   rejection.did_not_execute)
        if not rejection.close:
            return []
        self.closed = True
        return [ConnectionClosed(rejection.reason)]

    @staticmethod
    def _type_name(ptype: int) -> str:
        try:
            return PduType(ptype).name.lower()
        except ValueError:
            return f"type {ptype}"

    @staticmethod
    def _split_auth_trailer(header: _Header, pdu: bytes, body_start: int) -> tuple[int, _AuthTrailer | None]:
        """Where the body ends (before auth padding) and the auth trailer, if the PDU has one."""
        if header.auth_length == 0:
            return len(pdu), None
        trailer_start = len(pdu) - header.auth_length - _AUTH_TRAILER.size
        if trailer_start < body_start:
            raise _Malformed(f"auth_length {header.auth_length} overlaps the PDU's fixed fields")
        auth_type, auth_level, pad_length, _reserved, context_id = _AUTH_TRAILER.unpack_from(pdu, trailer_start)
        if pad_length > trailer_start - body_start:
            raise _Malformed(f"auth_pad_length {pad_length} is longer than the body")
        trailer = _AuthTrailer(auth_type, auth_level, pad_length, context_id,
                               pdu[trailer_start + _AUTH_TRAILER.size:], trailer_start)
        return trailer_start - pad_length, trailer

    # -- association and presentation contexts --------------------------------------------

    def _handle_bind(self, header: _Header, pdu: bytes) -> list[Event]:
        if self._bound:
            raise _Rejection("second bind on the connection", call_id=header.call_id,
                             nak=BindNakReason.NOT_SPECIFIED)
        body_end, trailer = self._split_auth_trailer(header, pdu, HEADER_SIZE)
        reader = _Reader(pdu[HEADER_SIZE:body_end])
        client_xmit, client_recv, assoc_group_id = reader.unpack("HHI")
        elements = reader.context_elements()
        if not elements:
            raise _Malformed("no presentation context")
        if any(not element.transfer_syntaxes for element in elements):
            raise _Rejection("presentation context without transfer syntaxes", call_id=header.call_id,
                             nak=BindNakReason.NOT_SPECIFIED)
        if sum(_bind_time_features(element.transfer_syntaxes[0]) is not None for element in elements) > 1:
            raise _Rejection("more than one bind time feature negotiation", call_id=header.call_id,
                             nak=BindNakReason.NOT_SPECIFIED)
        if self._refuse_binds is not None:
            raise _Rejection(f"bind refused: {self._refuse_binds.name.lower()}", call_id=header.call_id,
                             nak=self._refuse_binds)
        outcomes = self._negotiate_contexts(header.call_id, elements, feature_negotiation=True)
        token, events = self._start_security(header, trailer) if trailer is not None else (None, [])
        size = min(client_xmit, client_recv, self._max_recv_frag, self._max_xmit_frag)
        self._fragment_size = max(size, MIN_FRAGMENT_SIZE) // _FRAGMENT_SIZE_GRANULE * _FRAGMENT_SIZE_GRANULE
        # A client joining an existing association group keeps its id: FSRVP has no context
        # handles, so there is no per-association state to check it against.
        self._assoc_group_id = assoc_group_id or secrets.randbelow(_MAX_ASSOC_GROUP_ID) + 1
        self._multiplexed = bool(header.flags & PfcFlag.CONC_MPX)
        self._bound = True
        flags = _WHOLE_PDU | (PfcFlag.CONC_MPX if self._multiplexed else 0)
        if token is not None and self._client_header_signing and self._security.signs_header:
            flags |= PfcFlag.SUPPORT_HEADER_SIGN  # MS-RPCE 3.3.1.5.2.2: our verifiers cover the header
        self._outbox += self._context_ack(PduType.BIND_ACK, flags, header.call_id,
                                          self._secondary_address, outcomes, token)
        return events

    def _start_security(self, header: _Header, trailer: _AuthTrailer) -> tuple[bytes, list[Event]]:
        """Open the security context a bind asks for and run its first leg; the token to answer with."""
        provider = self._security_providers.get(trailer.auth_type)
        reason = None
        if not AuthLevel.CONNECT <= trailer.auth_level <= AuthLevel.PKT_PRIVACY:
            reason = BindNakReason.NOT_SPECIFIED
        elif provider is None:
            reason = BindNakReason.AUTHENTICATION_TYPE_NOT_RECOGNIZED
        elif trailer.auth_level not in PROTECTED_LEVELS:
            reason = BindNakReason.NOT_SPECIFIED  # connect and call levels protect no PDU
        if reason is not None:
            raise _Rejection(f"bind with auth_type {trailer.auth_type} level {trailer.auth_level}: "
                             f"{reason.name.lower()}", call_id=header.call_id, nak=reason)
        security = provider(AuthLevel(trailer.auth_level))
        try:
            token = security.accept(trailer.auth_value)
        except AuthError as refused:
            raise _Rejection(f"{AuthType(trailer.auth_type).name} bind refused: {refused}",
                             call_id=header.call_id, nak=BindNakReason.INVALID_CHECKSUM) from None
        self._security = security
        self._auth_context_id = trailer.context_id
        self._client_header_signing = bool(header.flags & PfcFlag.SUPPORT_HEADER_SIGN)
        return token, self._authentication_events()

    def _authentication_events(self) -> list[Event]:
        principal = self._security.principal
        return [AuthenticationResult(principal)] if principal is not None else []

    def _continue_security(self, header: _Header, trailer: _AuthTrailer) -> bytes:
        """The next leg of a handshake in progress (alter_context or auth3); raises AuthError."""
        if (trailer.auth_type, trailer.auth_level, trailer.context_id) != \
                (self._security.auth_type, self._security.level, self._auth_context_id):
            raise AuthError(f"leg with auth type {trailer.auth_type}, level {trailer.auth_level} and context "
                            f"{trailer.context_id} continues another context")
        return self._security.accept(trailer.auth_value)

    def _handle_alter_context(self, header: _Header, pdu: bytes) -> list[Event]:
        body_end, trailer = self._split_auth_trailer(header, pdu, HEADER_SIZE)
        reader = _Reader(pdu[HEADER_SIZE:body_end])
        reader.unpack("HHI")  # max_xmit_frag, max_recv_frag, assoc_group_id: ignored after bind
        elements = reader.context_elements()
        if not elements or any(not element.transfer_syntaxes for element in elements):
            raise _Malformed("no presentation context, or one without transfer syntaxes")
        in_progress = self._security is not None and self._security.principal is None \
            and self._auth_failure is None
        if trailer is None and in_progress:
            raise _Rejection("alter_context without auth data during a security handshake",
                             call_id=header.call_id, status=RPC_S_SEC_PKG_ERROR)
        if trailer is not None and not in_progress:
            # Samba and Windows: no second security context and no renegotiation on a connection.
            raise _Rejection("alter_context with auth data outside a security handshake",
                             call_id=header.call_id, status=RPC_S_ACCESS_DENIED)
        outcomes = self._negotiate_contexts(header.call_id, elements, feature_negotiation=False)
        token = None
        events: list[Event] = []
        if trailer is not None:
            try:
                token = self._continue_security(header, trailer)
            except AuthError as refused:
                raise _Rejection(f"security handshake failed: {refused}", call_id=header.call_id,
                                 status=RPC_S_SEC_PKG_ERROR) from None
            events = self._authentication_events()
        self._outbox += self._context_ack(PduType.ALTER_CONTEXT_RESP, _WHOLE_PDU, header.call_id, b"", outcomes,
                                          token)
        return events

    def _handle_auth3(self, header: _Header, pdu: bytes) -> list[Event]:
        """The last leg of a three-leg handshake; never answered (MS-RPCE 3.3.1.5.2.1).

        A failure is remembered and the next request refused, as Windows and Samba do."""
        _, trailer = self._split_auth_trailer(header, pdu, HEADER_SIZE + _AUTH3_BODY_SIZE)
        if trailer is None or self._security is None or self._security.principal is not None \
                or self._auth_failure is not None:
            raise self._violation(header.call_id, "auth3 without an authentication in progress")
        try:
            if self._continue_security(header, trailer) or self._security.principal is None:
                raise AuthError("the handshake needs more legs than auth3 allows")
        except AuthError as refused:
            self._auth_failure = f"authentication failed: {refused}"
            return [AuthenticationResult(None, str(refused))]
        return self._authentication_events()

    def _handle_cancel_or_orphaned(self, header: _Header, pdu: bytes) -> list[Event]:
        """Ignored, as Windows does: calls run to completion and their answers are still sent."""
        self._split_auth_trailer(header, pdu, HEADER_SIZE)
        return []

    def _negotiate_contexts(self, call_id: int, elements: list[_ContextElement], *,
                            feature_negotiation: bool) -> list[_ContextOutcome]:
        """One result per proposed context, in order; at most one new acceptance, as Windows does."""
        outcomes = []
        accepted = False
        for element in elements:
            outcome = self._negotiate_context(call_id, element, feature_negotiation, accepted)
            accepted |= outcome.result == ContextResult.ACCEPTANCE
            outcomes.append(outcome)
        return outcomes

    def _negotiate_context(self, call_id: int, element: _ContextElement, feature_negotiation: bool,
                           accepted: bool) -> _ContextOutcome:
        features = _bind_time_features(element.transfer_syntaxes[0])
        if feature_negotiation and features is not None:
            return _ContextOutcome(ContextResult.NEGOTIATE_ACK, features & SUPPORTED_BIND_TIME_FEATURES)
        if not self._serves(element.abstract_syntax):
            return _ContextOutcome(ContextResult.PROVIDER_REJECTION, ProviderReason.ABSTRACT_SYNTAX_NOT_SUPPORTED)
        transfer_rejection = _ContextOutcome(ContextResult.PROVIDER_REJECTION,
                                             ProviderReason.PROPOSED_TRANSFER_SYNTAXES_NOT_SUPPORTED)
        if accepted:
            return transfer_rejection
        existing = self._contexts.get(element.context_id)
        if existing is not None and existing != element.abstract_syntax:
            raise self._violation(call_id, f"presentation context {element.context_id} is already "
                                           f"bound to another interface")
        if NDR_SYNTAX not in element.transfer_syntaxes:
            return transfer_rejection
        if existing is None:
            if len(self._contexts) >= _CONTEXTS_PER_INTERFACE * len(self._interfaces):
                raise _Rejection("too many presentation contexts", call_id=call_id,
                                 nak=BindNakReason.LOCAL_LIMIT_EXCEEDED)
            self._contexts[element.context_id] = element.abstract_syntax
        return _ContextOutcome(ContextResult.ACCEPTANCE, ProviderReason.NOT_SPECIFIED, NDR_SYNTAX)

    def _serves(self, abstract: SyntaxId) -> bool:
        served = self._interfaces.get(abstract.uuid)
        return served is not None and abstract.major == served[0] and abstract.minor <= served[1]

    def _context_ack(self, ptype: PduType, flags: int, call_id: int, secondary_address: bytes,
                     outcomes: list[_ContextOutcome], token: bytes | None = None) -> bytes:
        """bind_ack or alter_context_resp; both carry the connection's fragment size and group,
        and the security context's token when a handshake leg is answered."""
        body = struct.pack("<HHIH", self._fragment_size, self._fragment_size, self._assoc_group_id,
                           len(secondary_address)) + secondary_address
        body += bytes(-(HEADER_SIZE + len(body)) % 4)  # the result list is 4-byte aligned
        body += struct.pack("<BBH", len(outcomes), 0, 0) + b"".join(outcome.encode() for outcome in outcomes)
        if token is None:
            return _pdu(ptype, flags, call_id, body)
        pad = -(HEADER_SIZE + len(body)) % _BIND_AUTH_ALIGNMENT
        trailer = _AUTH_TRAILER.pack(self._security.auth_type, self._security.level, pad, 0, self._auth_context_id)
        return _pdu(ptype, flags, call_id, body + bytes(pad) + trailer + token, auth_length=len(token))

    # -- calls ------------------------------------------------------------------------------

    def _handle_request(self, header: _Header, pdu: bytes) -> list[Event]:
        stub_start = _REQUEST_STUB_OFFSET + (16 if header.flags & PfcFlag.OBJECT_UUID else 0)
        if len(pdu) < stub_start:
            raise _Malformed("request shorter than its header")
        alloc_hint, context_id, opnum = _REQUEST_HEADER.unpack_from(pdu, HEADER_SIZE)
        body_end, trailer = self._split_auth_trailer(header, pdu, stub_start)
        # Every fragment is checked first, even one about to be refused or dropped: each took a
        # sequence number and a piece of the key stream on the client's side.
        stub = self._request_stub(header, context_id, pdu, stub_start, body_end, trailer)
        if header.flags & PfcFlag.FIRST_FRAG:
            call = self._begin_call(header, context_id, opnum)
        else:
            call = self._continuing_call(header)
            if call is None:
                return []
        # alloc_hint counts only on the first fragment: impacket repeats the total on every one.
        expected = max(len(stub), alloc_hint) if header.flags & PfcFlag.FIRST_FRAG else len(stub)
        if len(call.stub) + expected > self._max_call_bytes:
            raise _Rejection(f"request exceeds {self._max_call_bytes} bytes", call_id=call.call_id,
                             context_id=call.context_id, status=RPC_S_ACCESS_DENIED, did_not_execute=False)
        call.stub += stub
        if not header.flags & PfcFlag.LAST_FRAG:
            self._incoming = call
            return []
        self._incoming = None
        complete = RpcCall(call.call_id, call.context_id, call.opnum, self._without_verification_trailer(call),
                           call.interface, self._security.principal if self._security else None)
        self._outstanding[complete.call_id] = complete
        return [complete]

    def _begin_call(self, header: _Header, context_id: int, opnum: int) -> _IncomingCall:
        """Check the first fragment of a call against the calls already on the connection."""
        if self._incoming is not None:
            # Windows faults the call being reassembled, so the client learns which call failed.
            raise _Rejection(f"call {header.call_id} starts before call {self._incoming.call_id} is complete",
                             call_id=self._incoming.call_id, context_id=self._incoming.context_id,
                             did_not_execute=False)
        if header.call_id in self._outstanding or (self._outstanding and not self._multiplexed):
            raise _Rejection(f"call {header.call_id} while {sorted(self._outstanding)} await an answer "
                             f"on a connection without PFC_CONC_MPX", call_id=header.call_id,
                             did_not_execute=False)
        if self._highest_call_id is None or header.call_id > self._highest_call_id:
            self._highest_call_id = header.call_id
        if header.flags & PfcFlag.PENDING_CANCEL:
            raise _Rejection("first fragment already cancelled", call_id=header.call_id,
                             status=RPC_S_NO_CALL_ACTIVE)
        abstract = self._contexts.get(context_id)
        if abstract is None:
            # The connection survives; the rest of this call's fragments are dropped as old.
            raise _Rejection(f"no presentation context {context_id}", call_id=header.call_id,
                             status=NCA_S_UNKNOWN_IF, close=False)
        return _IncomingCall(header.call_id, context_id, opnum, abstract.uuid, bytearray())

    def _continuing_call(self, header: _Header) -> _IncomingCall | None:
        """The call a later fragment continues; None for a stray fragment of a recent call."""
        call = self._incoming
        if call is None:
            if self._highest_call_id is not None and 0 <= self._highest_call_id - header.call_id < _OLD_CALL_WINDOW:
                return None
            raise _Rejection(f"fragment of call {header.call_id} without a first fragment",
                             call_id=header.call_id, did_not_execute=False)
        if header.call_id != call.call_id:
            raise _Rejection(f"fragment of call {header.call_id} inside call {call.call_id}",
                             call_id=call.call_id, context_id=call.context_id, did_not_execute=False)
        return call

    def _request_stub(self, header: _Header, context_id: int, pdu: bytes, stub_start: int, body_end: int,
                      trailer: _AuthTrailer | None) -> bytes:
        """A request fragment's stub, its verifier checked and its body unsealed as the connection requires."""
        def refused(reason: str, status: int = RPC_S_ACCESS_DENIED) -> _Rejection:
            return _Rejection(reason, call_id=header.call_id, context_id=context_id, status=status,
                              did_not_execute=status != RPC_S_ACCESS_DENIED)

        security = self._security
        if security is None:
            if trailer is not None:
                raise refused("request with auth data on an unauthenticated connection")
            return pdu[stub_start:body_end]
        if self._auth_failure is not None:
            raise refused(self._auth_failure)
        if security.principal is None:
            raise refused("request before the security handshake finished", NCA_S_PROTO_ERROR)
        if trailer is None or len(trailer.auth_value) != security.verifier_size or \
                (trailer.auth_type, trailer.auth_level, trailer.context_id) != \
                (security.auth_type, security.level, self._auth_context_id):
            raise refused("request without the verifier of the connection's security context")
        try:
            body = security.unprotect(pdu[:trailer.verifier_start], slice(stub_start, trailer.start),
                                      trailer.auth_value)
        except AuthError as error:
            raise refused(f"request refused: {error}") from None
        return body[:len(body) - trailer.pad_length]

    def _without_verification_trailer(self, call: _IncomingCall) -> bytes:
        """The stub without its verification trailer (MS-RPCE 2.2.2.13), once the trailer is checked."""
        stub = bytes(call.stub)
        found = _verification_trailer(stub)
        if found is None:
            return stub
        start, commands = found
        for command, data in commands:
            problem = self._verification_command_problem(call, command & 0x3FFF, data, bool(command & 0x8000))
            if problem:
                raise _Rejection(f"verification trailer of call {call.call_id}: {problem}", call_id=call.call_id,
                                 context_id=call.context_id, status=RPC_S_ACCESS_DENIED, close=False)
        return stub[:start]

    def _verification_command_problem(self, call: _IncomingCall, command: int, data: bytes,
                                      must_process: bool) -> str | None:
        """What is wrong with one verification trailer command, or None."""
        if command == 1:  # SEC_VT_COMMAND_BITMASK_1: CLIENT_SUPPORTS_HEADER_SIGNING
            if len(data) != 4:
                return "bitmask command of the wrong size"
            if data[0] & 1 and not self._client_header_signing:
                return "the client asked for header signing but the bind did not say so"
            return None
        if command == 2:  # SEC_VT_COMMAND_PCONTEXT
            bound = (self._contexts[call.context_id].encode(), NDR_SYNTAX.encode())
            return None if (data[:20], data[20:]) == bound else "presentation context differs from the bound one"
        if command == 3:  # SEC_VT_COMMAND_HEADER2
            expected = struct.pack("<BBH4sIHH", PduType.REQUEST, 0, 0, _LITTLE_ENDIAN_ASCII_IEEE, call.call_id,
                                   call.context_id, call.opnum)
            if len(data) != len(expected) or data[:1] + data[4:] != expected[:1] + expected[4:]:
                return "request header differs from the one the client protected"
            return None
        return f"unknown command {command} marked must-process" if must_process else None

    def _encode_response(self, call: RpcCall, stub: bytes) -> bytes:
        """Response PDUs for `stub`, each within the negotiated size with room for its verifier."""
        overhead = _RESPONSE_STUB_OFFSET
        if self._security is not None:
            overhead += _AUTH_TRAILER.size + self._security.verifier_size
        chunk_size = (self._fragment_size - overhead) // _STUB_CHUNK_ALIGNMENT * _STUB_CHUNK_ALIGNMENT
        fragments = []
        offset = 0
        while True:
            chunk = stub[offset:offset + chunk_size]
            flags = (PfcFlag.FIRST_FRAG if offset == 0 else 0) | \
                    (PfcFlag.LAST_FRAG if offset + chunk_size >= len(stub) else 0)
            body = _RESPONSE_HEADER.pack(len(stub) - offset, call.context_id, 0, 0) + chunk
            fragments.append(self._protected_pdu(PduType.RESPONSE, flags, call.call_id, body))
            offset += chunk_size
            if offset >= len(stub):
                return b"".join(fragments)

    def _protected_pdu(self, ptype: PduType, flags: int, call_id: int, body: bytes) -> bytes:
        """A response PDU, signed or sealed by the connection's security context if it has one.

        The stub (after the 8-byte response header) is padded to a multiple of 16 as Windows and
        Samba do; the verifier covers the whole PDU before it, the stub is what sealing encrypts."""
        security = self._security
        if security is None:
            return _pdu(ptype, flags, call_id, body)
        stub_start = HEADER_SIZE + _RESPONSE_HEADER.size
        pad = -(len(body) - _RESPONSE_HEADER.size) % _STUB_CHUNK_ALIGNMENT
        trailer = _AUTH_TRAILER.pack(security.auth_type, security.level, pad, 0, self._auth_context_id)
        unsigned = _pdu(ptype, flags, call_id, body + bytes(pad) + trailer + bytes(security.verifier_size),
                        auth_length=security.verifier_size)[:-security.verifier_size]
        stub = slice(stub_start, HEADER_SIZE + len(body) + pad)
        sent, verifier = security.protect(unsigned, stub)
        return unsigned[:stub.start] + sent + unsigned[stub.stop:] + verifier

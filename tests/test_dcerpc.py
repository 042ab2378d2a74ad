"""Tests of the connection-oriented DCE/RPC layer.

PDUs are built and parsed here with struct, independently of fsrvpd.dcerpc, so an encoding
mistake in the layer cannot agree with itself; the impacket tests add a real client on top.
"""

from __future__ import annotations

import struct
import uuid
from typing import NamedTuple

import pytest
from hypothesis import given, settings, strategies as st
from impacket import ntlm as impacket_ntlm
from impacket.dcerpc.v5 import rpcrt
from impacket.uuid import uuidtup_to_bin

from fsrvpd import dcerpc
from fsrvpd.constants import FSRVP_INTERFACE_UUID
from fsrvpd.ntlm import NtHashAccounts
from fsrvpd.rpcserver import security_providers
from tests.support.inmemory import InMemoryPipe
from tests.support.ntlmpeer import ImpacketPeer

BIND, BIND_ACK, BIND_NAK, ALTER, ALTER_RESP = 11, 12, 13, 14, 15
REQUEST, RESPONSE, FAULT, AUTH3, SHUTDOWN, CO_CANCEL, ORPHANED = 0, 2, 3, 16, 17, 18, 19
FIRST, LAST, PENDING_CANCEL, CONC_MPX, DID_NOT_EXECUTE, OBJECT_UUID = 0x01, 0x02, 0x04, 0x10, 0x20, 0x80
WHOLE = FIRST | LAST
ACCEPTANCE, PROVIDER_REJECTION, NEGOTIATE_ACK = 0, 2, 3
ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 1, 2
NAK_NOT_SPECIFIED, NAK_LOCAL_LIMIT, NAK_PROTOCOL_VERSION, NAK_AUTH_TYPE = 0, 2, 4, 8
NTLMSSP, PKT_PRIVACY = 10, 6
LE_DREP = b"\x10\x00\x00\x00"


def syntax(text: str, major: int, minor: int = 0) -> bytes:
    return uuid.UUID(text).bytes_le + struct.pack("<HH", major, minor)


def feature_syntax(bits: int) -> bytes:
    return uuid.UUID("6cb71c2c-9812-4540-0000-000000000000").bytes_le[:8] + bits.to_bytes(8, "little") + \
        struct.pack("<HH", 1, 0)


FSRVP = syntax(str(FSRVP_INTERFACE_UUID), 1)
NDR = syntax("8a885d04-1ceb-11c9-9fe8-08002b104860", 2)
NDR64 = syntax("71710533-beba-4937-8319-b5dbef9ccc36", 1)
OTHER_INTERFACE = syntax("12345778-1234-abcd-ef00-0123456789ab", 0)  # LSA
NO_SYNTAX = bytes(20)


def pdu(ptype: int, body: bytes, *, call_id: int = 1, flags: int = WHOLE, auth_length: int = 0,
        version: tuple[int, int] = (5, 0), drep: bytes = LE_DREP, frag_length: int | None = None) -> bytes:
    length = 16 + len(body) if frag_length is None else frag_length
    return struct.pack("<BBBB4sHHI", *version, ptype, flags, drep, length, auth_length, call_id) + body


def auth_trailer(body_length: int, auth_type: int = NTLMSSP, level: int = PKT_PRIVACY,
                 token: bytes = b"NTLMSSP\0\1\0\0\0") -> tuple[bytes, int]:
    """Pad to 4-byte alignment plus sec_trailer and token, and the auth_length for the header."""
    pad = -(16 + body_length) % 4
    return bytes(pad) + struct.pack("<BBBBI", auth_type, level, pad, 0, 79231) + token, len(token)


def context(context_id: int, abstract: bytes, *transfers: bytes) -> bytes:
    return struct.pack("<HBB", context_id, len(transfers), 0) + abstract + b"".join(transfers)


def bind(*contexts: bytes, call_id: int = 1, max_xmit: int = 4280, max_recv: int = 4280, assoc: int = 0,
         flags: int = WHOLE, ptype: int = BIND, with_auth: dict | None = None) -> bytes:
    body = struct.pack("<HHIBBH", max_xmit, max_recv, assoc, len(contexts), 0, 0) + b"".join(contexts)
    if with_auth is None:
        return pdu(ptype, body, call_id=call_id, flags=flags)
    trailer, auth_length = auth_trailer(len(body), **with_auth)
    return pdu(ptype, body + trailer, call_id=call_id, flags=flags, auth_length=auth_length)


def alter(*contexts: bytes, call_id: int = 2, **kwargs) -> bytes:
    return bind(*contexts, call_id=call_id, ptype=ALTER, **kwargs)


def request(call_id: int, stub: bytes, *, context_id: int = 0, opnum: int = 0, flags: int = WHOLE,
            alloc_hint: int | None = None, object_uuid: uuid.UUID | None = None, with_auth: bool = False) -> bytes:
    body = struct.pack("<IHH", len(stub) if alloc_hint is None else alloc_hint, context_id, opnum)
    if object_uuid is not None:
        flags |= OBJECT_UUID
        body += object_uuid.bytes_le
    body += stub
    if not with_auth:
        return pdu(REQUEST, body, call_id=call_id, flags=flags)
    trailer, auth_length = auth_trailer(len(body), token=bytes(16))
    return pdu(REQUEST, body + trailer, call_id=call_id, flags=flags, auth_length=auth_length)


def fragments(call_id: int, stub: bytes, size: int, **kwargs) -> bytes:
    """A request split into fragments of `size` stub bytes; alloc_hint is what remains."""
    pieces = [stub[offset:offset + size] for offset in range(0, len(stub), size)]
    return b"".join(
        request(call_id, piece, alloc_hint=len(stub) - index * size,
                flags=(FIRST if index == 0 else 0) | (LAST if index == len(pieces) - 1 else 0), **kwargs)
        for index, piece in enumerate(pieces))


class Pdu(NamedTuple):
    ptype: int
    flags: int
    call_id: int
    body: bytes
    length: int


def split_pdus(data: bytes) -> list[Pdu]:
    """The server's output as PDUs, checking the common header of each."""
    pdus = []
    while data:
        version, minor, ptype, flags, drep, frag_length, auth_length, call_id = \
            struct.unpack_from("<BBBB4sHHI", data)
        assert (version, minor, drep) == (5, 0, LE_DREP)
        assert auth_length == 0 or ptype in (BIND_ACK, ALTER_RESP, RESPONSE)  # faults are never signed
        assert 16 <= frag_length <= len(data)
        pdus.append(Pdu(ptype, flags, call_id, data[16:frag_length], frag_length))
        data = data[frag_length:]
    return pdus


class ContextAck(NamedTuple):
    max_xmit: int
    max_recv: int
    assoc_group: int
    secondary_address: bytes
    results: list[tuple[int, int, bytes]]


def parse_context_ack(packet: Pdu) -> ContextAck:
    max_xmit, max_recv, assoc, address_length = struct.unpack_from("<HHIH", packet.body)
    address = packet.body[10:10 + address_length]
    offset = 10 + address_length
    offset += -(16 + offset) % 4
    count, = struct.unpack_from("<B", packet.body, offset)
    offset += 4
    results = [struct.unpack_from("<HH20s", packet.body, offset + 24 * index) for index in range(count)]
    assert offset + 24 * count == len(packet.body)
    return ContextAck(max_xmit, max_recv, assoc, address, [tuple(result) for result in results])


def parse_fault(packet: Pdu) -> tuple[int, int]:
    """(context_id, status) of a fault, checking its fixed fields."""
    assert packet.ptype == FAULT and packet.length == 32 and packet.flags & WHOLE == WHOLE
    alloc_hint, context_id, cancel_count, reserved, status, reserved2 = struct.unpack("<IHBBII", packet.body)
    assert alloc_hint != 0 and (cancel_count, reserved, reserved2) == (0, 0, 0)
    return context_id, status


def parse_response(packet: Pdu) -> tuple[int, int, bytes]:
    """(alloc_hint, context_id, stub) of a response fragment."""
    assert packet.ptype == RESPONSE
    alloc_hint, context_id, cancel_count, reserved = struct.unpack_from("<IHBB", packet.body)
    assert (cancel_count, reserved) == (0, 0)
    return alloc_hint, context_id, packet.body[8:]


def new_connection(**kwargs) -> dcerpc.ServerConnection:
    return dcerpc.ServerConnection({FSRVP_INTERFACE_UUID: (1, 0)}, **kwargs)


def bound_connection(*, flags: int = WHOLE, max_xmit: int = 4280, **kwargs) -> dcerpc.ServerConnection:
    connection = new_connection(**kwargs)
    assert connection.receive_data(bind(context(0, FSRVP, NDR), flags=flags, max_xmit=max_xmit,
                                        max_recv=max_xmit)) == []
    assert split_pdus(connection.data_to_send())[0].ptype == BIND_ACK
    return connection


def exchange(connection: dcerpc.ServerConnection, data: bytes) -> tuple[list, list[Pdu]]:
    events = connection.receive_data(data)
    return events, split_pdus(connection.data_to_send())


def assert_rejected_with_fault(connection, data, status, *, call_id=1, context_id=0, did_not_execute=True,
                               closes=True) -> None:
    events, pdus = exchange(connection, data)
    assert len(pdus) == 1 and pdus[0].call_id == call_id
    assert parse_fault(pdus[0]) == (context_id, status)
    assert bool(pdus[0].flags & DID_NOT_EXECUTE) == did_not_execute
    if closes:
        assert connection.closed and len(events) == 1 and isinstance(events[0], dcerpc.ConnectionClosed)
    else:
        assert not connection.closed and events == []


def assert_rejected_with_bind_nak(connection, data, reason, *, call_id=1) -> None:
    events, pdus = exchange(connection, data)
    assert [packet.ptype for packet in pdus] == [BIND_NAK] and pdus[0].call_id == call_id
    # reason, one supported version (5.0), 3 pad bytes: Windows' 24-byte bind_nak
    assert pdus[0].body == struct.pack("<HBBB", reason, 1, 5, 0) + bytes(3)
    assert connection.closed and [type(event) for event in events] == [dcerpc.ConnectionClosed]


# -- bind ------------------------------------------------------------------------------------

RPCCLIENT_BIND = bytes.fromhex(
    "05000b03100000004800000001000000b810b810000000000100000000000100"  # captured from rpcclient
    "3c65e0a844278943a61d7373df8b2292" "01000000"  # FSRVP a8e0653c-2744-4389-a61d-7373df8b2292 v1.0
    "045d888aeb1cc9119fe808002b104860" "02000000")  # NDR 8a885d04-1ceb-11c9-9fe8-08002b104860 v2


def test_rpcclient_bind_is_acknowledged():
    assert RPCCLIENT_BIND == bind(context(0, FSRVP, NDR))
    connection = new_connection()
    events, pdus = exchange(connection, RPCCLIENT_BIND)
    assert events == [] and [(p.ptype, p.flags, p.call_id) for p in pdus] == [(BIND_ACK, WHOLE, 1)]
    ack = parse_context_ack(pdus[0])
    assert (ack.max_xmit, ack.max_recv) == (4280, 4280)
    assert ack.assoc_group != 0
    assert ack.secondary_address == b"\\PIPE\\FssagentRpc\0"
    assert ack.results == [(ACCEPTANCE, 0, NDR)]


def test_the_pdus_that_may_authenticate_are_named_before_they_are_taken():
    """bind, alter-context and auth3 carry security legs (rpcserver takes them off the event loop),
    also when they arrive in pieces; requests do not."""
    connection = new_connection()
    assert connection.may_authenticate(RPCCLIENT_BIND)
    assert not connection.may_authenticate(RPCCLIENT_BIND[:2])  # not yet known
    connection.receive_data(RPCCLIENT_BIND[:1])
    assert connection.may_authenticate(RPCCLIENT_BIND[1:])  # the rest completes a bind
    connection.receive_data(RPCCLIENT_BIND[1:])
    assert connection.may_authenticate(alter(context(1, FSRVP, NDR)))
    assert connection.may_authenticate(pdu(AUTH3, bytes(4)))
    assert not connection.may_authenticate(request(2, b"stub"))


def test_the_pdus_a_client_may_transceive_are_the_last_fragments_of_requests():
    """A client's pipe transceive (FSCTL_PIPE_TRANSCEIVE) waits for an answer: only a request's
    last fragment gets one; the message a pipe carries is frag_length long."""
    last, first = request(2, b"stub"), request(3, b"stub", flags=FIRST)
    assert dcerpc.ends_request(last) and dcerpc.fragment_length(last) == len(last)
    assert not dcerpc.ends_request(first)
    assert not dcerpc.ends_request(RPCCLIENT_BIND)
    assert not dcerpc.ends_request(pdu(AUTH3, bytes(4)))
    assert not dcerpc.ends_request(last[:dcerpc.HEADER_SIZE - 1])


def test_windows_bind_answers_each_context():
    connection = new_connection()
    _, pdus = exchange(connection, bind(context(0, FSRVP, NDR), context(1, FSRVP, NDR64),
                                        context(2, FSRVP, feature_syntax(0x03)), flags=WHOLE | CONC_MPX))
    assert pdus[0].flags == WHOLE | CONC_MPX
    assert parse_context_ack(pdus[0]).results == [
        (ACCEPTANCE, 0, NDR),
        (PROVIDER_REJECTION, TRANSFER_SYNTAXES_NOT_SUPPORTED, NO_SYNTAX),
        (NEGOTIATE_ACK, dcerpc.BindTimeFeature.KEEP_CONNECTION_ON_ORPHAN, NO_SYNTAX),
    ]
    assert_rejected_with_fault(connection, request(2, b"", context_id=1), dcerpc.NCA_S_UNKNOWN_IF,
                               call_id=2, closes=False)
    events, _ = exchange(connection, request(3, b"stub", context_id=0))
    assert events == [dcerpc.RpcCall(3, 0, 0, b"stub", FSRVP_INTERFACE_UUID)]


def test_ndr_is_chosen_from_several_transfer_syntaxes():
    _, pdus = exchange(new_connection(), bind(context(7, FSRVP, NDR64, NDR)))
    assert parse_context_ack(pdus[0]).results == [(ACCEPTANCE, 0, NDR)]


@pytest.mark.parametrize("abstract, accepted", [
    (syntax(str(FSRVP_INTERFACE_UUID), 1, 0), True),
    (syntax(str(FSRVP_INTERFACE_UUID), 1, 1), False),  # newer minor version than we serve
    (syntax(str(FSRVP_INTERFACE_UUID), 2, 0), False),
    (OTHER_INTERFACE, False),
])
def test_interface_and_version_decide_acceptance(abstract, accepted):
    _, pdus = exchange(new_connection(), bind(context(0, abstract, NDR)))
    expected = (ACCEPTANCE, 0, NDR) if accepted else (PROVIDER_REJECTION, ABSTRACT_SYNTAX_NOT_SUPPORTED, NO_SYNTAX)
    assert parse_context_ack(pdus[0]).results == [expected]


def test_older_minor_version_is_compatible():
    connection = dcerpc.ServerConnection({FSRVP_INTERFACE_UUID: (1, 2)})
    _, pdus = exchange(connection, bind(context(0, FSRVP, NDR)))
    assert parse_context_ack(pdus[0]).results == [(ACCEPTANCE, 0, NDR)]


def test_bind_accepting_nothing_is_acked_and_alter_can_add():
    connection = new_connection()
    _, pdus = exchange(connection, bind(context(0, OTHER_INTERFACE, NDR)))
    assert pdus[0].ptype == BIND_ACK and not connection.closed
    assert parse_context_ack(pdus[0]).results == [(PROVIDER_REJECTION, ABSTRACT_SYNTAX_NOT_SUPPORTED, NO_SYNTAX)]
    _, pdus = exchange(connection, alter(context(1, FSRVP, NDR)))
    assert parse_context_ack(pdus[0]).results == [(ACCEPTANCE, 0, NDR)]


def test_one_new_context_per_bind():
    _, pdus = exchange(new_connection(), bind(context(0, FSRVP, NDR), context(1, FSRVP, NDR)))
    assert parse_context_ack(pdus[0]).results == [
        (ACCEPTANCE, 0, NDR), (PROVIDER_REJECTION, TRANSFER_SYNTAXES_NOT_SUPPORTED, NO_SYNTAX)]


@pytest.mark.parametrize("client_xmit, client_recv, negotiated", [
    (4280, 4280, 4280),
    (0xFFFF, 0xFFFF, 4280),  # capped by ours
    (5840, 2001, 2000),  # the smaller of theirs, truncated to a multiple of 8
    (0, 0, 1432),  # never below C706's MustRecvFragSize
    (3199, 0xFFFF, 3192),
])
def test_fragment_size_negotiation(client_xmit, client_recv, negotiated):
    _, pdus = exchange(new_connection(), bind(context(0, FSRVP, NDR), max_xmit=client_xmit, max_recv=client_recv))
    ack = parse_context_ack(pdus[0])
    assert (ack.max_xmit, ack.max_recv) == (negotiated, negotiated)


def test_association_group_is_assigned_kept_and_joined():
    connection = new_connection()
    _, pdus = exchange(connection, bind(context(0, FSRVP, NDR)))
    assigned = parse_context_ack(pdus[0]).assoc_group
    _, pdus = exchange(connection, alter(context(1, FSRVP, NDR), assoc=0x1234))
    assert assigned != 0 and parse_context_ack(pdus[0]).assoc_group == assigned
    _, pdus = exchange(new_connection(), bind(context(0, FSRVP, NDR), assoc=0x1234))
    assert parse_context_ack(pdus[0]).assoc_group == 0x1234


def test_header_signing_is_not_offered_without_a_security_provider():
    _, pdus = exchange(new_connection(), bind(context(0, FSRVP, NDR), flags=0xFF))
    assert pdus[0].flags == WHOLE | CONC_MPX


def test_only_the_first_transfer_syntax_negotiates_features():
    _, pdus = exchange(new_connection(), bind(context(0, FSRVP, NDR, feature_syntax(0x03))))
    assert parse_context_ack(pdus[0]).results == [(ACCEPTANCE, 0, NDR)]


# -- alter_context ---------------------------------------------------------------------------

def test_alter_context_adds_a_context():
    connection = bound_connection()
    _, pdus = exchange(connection, alter(context(5, FSRVP, NDR), context(6, FSRVP, feature_syntax(3))))
    assert [(p.ptype, p.flags, p.call_id) for p in pdus] == [(ALTER_RESP, WHOLE, 2)]
    ack = parse_context_ack(pdus[0])
    assert ack.secondary_address == b"" and (ack.max_xmit, ack.max_recv) == (4280, 4280)
    # feature negotiation belongs to bind only: here it is just an unsupported transfer syntax
    assert ack.results == [(ACCEPTANCE, 0, NDR), (PROVIDER_REJECTION, TRANSFER_SYNTAXES_NOT_SUPPORTED, NO_SYNTAX)]
    events, _ = exchange(connection, request(3, b"x", context_id=5, opnum=4))
    assert events == [dcerpc.RpcCall(3, 5, 4, b"x", FSRVP_INTERFACE_UUID)]


def test_alter_context_repeating_a_context_accepts_it_again():
    connection = bound_connection()
    _, pdus = exchange(connection, alter(context(0, FSRVP, NDR)))
    assert parse_context_ack(pdus[0]).results == [(ACCEPTANCE, 0, NDR)]


def test_alter_context_rebinding_a_context_to_another_interface_closes():
    other = uuid.UUID(bytes_le=OTHER_INTERFACE[:16])
    connection = dcerpc.ServerConnection({FSRVP_INTERFACE_UUID: (1, 0), other: (0, 0)})
    exchange(connection, bind(context(0, FSRVP, NDR)))
    assert_rejected_with_fault(connection, alter(context(0, OTHER_INTERFACE, NDR)), dcerpc.NCA_S_PROTO_ERROR,
                               call_id=2)


@pytest.mark.parametrize("contexts", [(), (context(1, FSRVP),)], ids=["no contexts", "no transfer syntax"])
def test_alter_context_without_usable_contexts_closes(contexts):
    assert_rejected_with_fault(bound_connection(), alter(*contexts), dcerpc.NCA_S_PROTO_ERROR, call_id=2)


def test_presentation_contexts_are_limited():
    connection = bound_connection()
    for context_id in range(1, 4000):
        connection.receive_data(alter(context(context_id, FSRVP, NDR)))
    connection.data_to_send()
    assert_rejected_with_bind_nak(connection, alter(context(4000, FSRVP, NDR)), NAK_LOCAL_LIMIT, call_id=2)


# -- requests and responses --------------------------------------------------------------------

def test_request_becomes_a_call_and_its_response():
    connection = bound_connection()
    events, pdus = exchange(connection, request(2, b"in", opnum=8))
    assert pdus == [] and events == [dcerpc.RpcCall(2, 0, 8, b"in", FSRVP_INTERFACE_UUID)]
    connection.send_response(events[0], b"out!")
    pdus = split_pdus(connection.data_to_send())
    assert [(p.ptype, p.flags, p.call_id) for p in pdus] == [(RESPONSE, WHOLE, 2)]
    assert parse_response(pdus[0]) == (4, 0, b"out!")


def test_request_with_object_uuid():
    events, _ = exchange(bound_connection(), request(2, b"stub", object_uuid=uuid.uuid4()))
    assert events[0].stub == b"stub"


def test_empty_response_is_one_fragment():
    connection = bound_connection()
    events, _ = exchange(connection, request(2, b""))
    connection.send_response(events[0], b"")
    pdus = split_pdus(connection.data_to_send())
    assert [(p.flags, parse_response(p)) for p in pdus] == [(WHOLE, (0, 0, b""))]


def test_fragmented_request_is_reassembled():
    connection = bound_connection()
    stub = bytes(range(256)) * 10
    data = fragments(2, stub, 100, opnum=3)
    events = []
    for offset in range(0, len(data), 124):  # one fragment at a time
        assert events == []
        events += connection.receive_data(data[offset:offset + 124])
    assert events == [dcerpc.RpcCall(2, 0, 3, stub, FSRVP_INTERFACE_UUID)]
    assert connection.data_to_send() == b""


def test_large_response_is_fragmented_within_the_negotiated_size():
    connection = bound_connection(max_xmit=2048)
    events, _ = exchange(connection, request(2, b""))
    stub = bytes(range(251)) * 80
    connection.send_response(events[0], stub)
    pdus = split_pdus(connection.data_to_send())
    assert len(pdus) > 1 and all(packet.length <= 2048 for packet in pdus)
    assert [packet.flags for packet in pdus] == [FIRST] + [0] * (len(pdus) - 2) + [LAST]
    received = b""
    for packet in pdus:
        alloc_hint, context_id, chunk = parse_response(packet)
        assert (packet.call_id, context_id, alloc_hint) == (2, 0, len(stub) - len(received))
        received += chunk
    assert received == stub
    assert all(len(parse_response(packet)[2]) % 16 == 0 for packet in pdus[:-1])


def session_bytes() -> bytes:
    """A pipelined client session (hence PFC_CONC_MPX); the bind joins a fixed association group
    so that two runs answer the same bytes."""
    return (bind(context(0, FSRVP, NDR), assoc=0x2A, flags=WHOLE | CONC_MPX)
            + fragments(2, bytes(range(200)) * 3, 64, opnum=1) + alter(context(1, FSRVP, NDR), call_id=3) + request(4, b"last", context_id=1, opnum=12))


def run_session(chunks: list[bytes]) -> tuple[list, bytes]:
    """Events and output of a session fed in `chunks`, then each call answered with its stub reversed."""
    connection = new_connection()
    events = [event for chunk in chunks for event in connection.receive_data(chunk)]
    for event in events:
        connection.send_response(event, event.stub[::-1])
    return events, connection.data_to_send()


def test_one_byte_at_a_time_equals_all_at_once():
    data = session_bytes()
    whole = run_session([data])
    assert [event.call_id for event in whole[0]] == [2, 4]
    assert run_session([data[index:index + 1] for index in range(len(data))]) == whole


@given(st.lists(st.integers(min_value=0, max_value=len(session_bytes())), max_size=20))
def test_any_split_equals_all_at_once(cuts):
    data = session_bytes()
    bounds = [0, *sorted(cuts), len(data)]
    assert run_session([data[start:end] for start, end in zip(bounds, bounds[1:])]) == run_session([data])


# -- malformed and unexpected input ----------------------------------------------------------

def test_first_pdu_must_be_a_bind():
    assert_rejected_with_bind_nak(new_connection(), request(1, b"x"), NAK_PROTOCOL_VERSION)


HEADER_DEFECTS = {
    "rpc version 4": dict(version=(4, 0)),
    "rpc version 5.1": dict(version=(5, 1)),
    "big-endian": dict(drep=b"\x00\x00\x00\x00"),
    "EBCDIC": dict(drep=b"\x11\x00\x00\x00"),
    "VAX floats": dict(drep=b"\x10\x01\x00\x00"),
    "frag_length below the header": dict(frag_length=10),
    "frag_length below auth_length": dict(auth_length=40),
}


@pytest.mark.parametrize("defect", HEADER_DEFECTS.values(), ids=HEADER_DEFECTS.keys())
def test_header_defects_before_bind_get_bind_nak(defect):
    body = struct.pack("<HHIBBH", 4280, 4280, 0, 1, 0, 0) + context(0, FSRVP, NDR)
    assert_rejected_with_bind_nak(new_connection(), pdu(BIND, body, **defect), NAK_PROTOCOL_VERSION)


@pytest.mark.parametrize("defect", HEADER_DEFECTS.values(), ids=HEADER_DEFECTS.keys())
def test_header_defects_after_bind_get_protocol_error(defect):
    assert_rejected_with_fault(bound_connection(), pdu(REQUEST, struct.pack("<IHH", 0, 0, 0), call_id=2, **defect),
                               dcerpc.NCA_S_PROTO_ERROR, call_id=2)


@pytest.mark.parametrize("ptype", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 15, SHUTDOWN, 20, 21, 255])
def test_pdu_types_a_client_may_not_send(ptype):
    assert_rejected_with_fault(bound_connection(), pdu(ptype, bytes(16), call_id=9), dcerpc.NCA_S_PROTO_ERROR,
                               call_id=9)


def test_request_fragment_larger_than_max_recv_frag():
    connection = bound_connection(max_recv_frag=2000)
    events, _ = exchange(connection, request(2, bytes(2000 - 24)))
    assert len(events) == 1
    connection.send_response(events[0], b"")
    connection.data_to_send()
    assert_rejected_with_fault(connection, request(3, bytes(2001 - 24)), dcerpc.NCA_S_PROTO_ERROR, call_id=3,
                               did_not_execute=False)


def test_second_bind_is_refused():
    assert_rejected_with_bind_nak(bound_connection(), bind(context(1, FSRVP, NDR), call_id=2), NAK_NOT_SPECIFIED,
                                  call_id=2)


MALFORMED_BINDS = {
    "no contexts": (bind(), NAK_PROTOCOL_VERSION),
    "truncated context list": (pdu(BIND, bind(context(0, FSRVP, NDR))[16:-5]), NAK_PROTOCOL_VERSION),
    "context without transfer syntax": (bind(context(0, FSRVP)), NAK_NOT_SPECIFIED),
    "two feature negotiations": (bind(context(0, FSRVP, feature_syntax(1)), context(1, FSRVP, feature_syntax(2))),
                                 NAK_NOT_SPECIFIED),
}


@pytest.mark.parametrize("data, reason", MALFORMED_BINDS.values(), ids=MALFORMED_BINDS.keys())
def test_malformed_bind_gets_bind_nak(data, reason):
    assert_rejected_with_bind_nak(new_connection(), data, reason)


EMPTY_REQUEST_HEADER = struct.pack("<IHH", 0, 0, 0)
MALFORMED_PDUS = {
    "request shorter than its header": pdu(REQUEST, bytes(4), call_id=2),
    "object UUID flagged but missing": pdu(REQUEST, EMPTY_REQUEST_HEADER, call_id=2, flags=WHOLE | OBJECT_UUID),
    "auth trailer inside the request header": pdu(REQUEST, EMPTY_REQUEST_HEADER + bytes(8), call_id=2,
                                                  auth_length=8),
    "auth padding longer than the stub": pdu(REQUEST, EMPTY_REQUEST_HEADER + b"ab" + struct.pack(
        "<BBBBI", NTLMSSP, PKT_PRIVACY, 3, 0, 0) + bytes(16), call_id=2, auth_length=16),
    "orphaned with auth padding but no body": pdu(ORPHANED, struct.pack("<BBBBI", NTLMSSP, PKT_PRIVACY, 5, 0, 0)
                                                  + b"tok", call_id=2, auth_length=3),
}


@pytest.mark.parametrize("data", MALFORMED_PDUS.values(), ids=MALFORMED_PDUS.keys())
def test_malformed_pdus_after_bind_get_protocol_error(data):
    assert_rejected_with_fault(bound_connection(), data, dcerpc.NCA_S_PROTO_ERROR, call_id=2)


def test_truncated_pdu_is_awaited_not_rejected():
    connection = new_connection()
    assert connection.receive_data(RPCCLIENT_BIND[:-1]) == [] and connection.data_to_send() == b""
    assert not connection.closed


@pytest.mark.parametrize("auth, reason", [
    (dict(), NAK_AUTH_TYPE),  # NTLMSSP at privacy: we have no security provider yet
    (dict(auth_type=0, level=2), NAK_AUTH_TYPE),
    (dict(level=1), NAK_NOT_SPECIFIED),  # auth level none is no authentication request
    (dict(level=0), NAK_NOT_SPECIFIED),
])
def test_bind_with_credentials_is_refused(auth, reason):
    assert_rejected_with_bind_nak(new_connection(), bind(context(0, FSRVP, NDR), with_auth=auth), reason)


def test_bind_with_an_auth_length_but_no_trailer():
    # Samba's test_invalid_auth_noctx: the claimed trailer eats into the context list
    data = bind(context(0, FSRVP, NDR))
    data = data[:10] + struct.pack("<H", 8) + data[12:]
    assert_rejected_with_bind_nak(new_connection(), data, NAK_PROTOCOL_VERSION)


def test_request_with_auth_data_on_an_unauthenticated_connection():
    assert_rejected_with_fault(bound_connection(), request(2, b"stub", with_auth=True), dcerpc.RPC_S_ACCESS_DENIED,
                               call_id=2, did_not_execute=False)


def test_alter_context_with_auth_data_on_an_unauthenticated_connection():
    assert_rejected_with_fault(bound_connection(), alter(context(1, FSRVP, NDR), with_auth={}),
                               dcerpc.RPC_S_ACCESS_DENIED, call_id=2)


def test_auth3_without_authentication_is_a_protocol_error():
    trailer, auth_length = auth_trailer(4)
    data = pdu(AUTH3, bytes(4) + trailer, call_id=1, auth_length=auth_length)
    assert_rejected_with_fault(bound_connection(), data, dcerpc.NCA_S_PROTO_ERROR)


def test_unknown_context_keeps_the_connection_and_drops_the_rest_of_its_call():
    connection = bound_connection()
    call = fragments(2, bytes(300), 100, context_id=3)
    first_fragment_length = 24 + 100
    assert_rejected_with_fault(connection, call[:first_fragment_length], dcerpc.NCA_S_UNKNOWN_IF, call_id=2,
                               closes=False)
    assert exchange(connection, call[first_fragment_length:]) == ([], [])
    events, _ = exchange(connection, request(3, b"ok"))
    assert [event.call_id for event in events] == [3]


def test_fragment_without_a_first_fragment():
    assert_rejected_with_fault(bound_connection(), request(2, b"x", flags=LAST), dcerpc.NCA_S_PROTO_ERROR,
                               call_id=2, did_not_execute=False)


def test_fragment_of_another_call_faults_the_call_being_received():
    connection = bound_connection()
    connection.receive_data(request(2, b"a", flags=FIRST))
    assert_rejected_with_fault(connection, request(3, b"b", flags=LAST), dcerpc.NCA_S_PROTO_ERROR, call_id=2,
                               did_not_execute=False)


def test_new_call_while_another_is_being_received():
    connection = bound_connection()
    connection.receive_data(request(2, b"a", flags=FIRST))
    assert_rejected_with_fault(connection, request(3, b"b"), dcerpc.NCA_S_PROTO_ERROR, call_id=2,
                               did_not_execute=False)


def test_request_claiming_more_than_max_call_bytes():
    connection = bound_connection(max_call_bytes=1000)
    assert_rejected_with_fault(connection, request(2, bytes(10), flags=FIRST, alloc_hint=1001),
                               dcerpc.RPC_S_ACCESS_DENIED, call_id=2, did_not_execute=False)


def test_request_growing_beyond_max_call_bytes():
    connection = bound_connection(max_call_bytes=1000)
    data = b"".join(request(2, bytes(size), flags=flags, alloc_hint=0)
                    for size, flags in ((500, FIRST), (500, 0), (100, LAST)))
    assert_rejected_with_fault(connection, data, dcerpc.RPC_S_ACCESS_DENIED, call_id=2, did_not_execute=False)


def test_max_call_bytes_is_reachable():
    events, _ = exchange(bound_connection(max_call_bytes=1000), fragments(2, bytes(1000), 500))
    assert len(events[0].stub) == 1000


def test_first_fragment_with_pending_cancel():
    assert_rejected_with_fault(bound_connection(), request(2, b"x", flags=WHOLE | PENDING_CANCEL),
                               dcerpc.RPC_S_NO_CALL_ACTIVE, call_id=2)


def test_second_call_before_the_first_is_answered_needs_conc_mpx():
    connection = bound_connection()
    assert len(connection.receive_data(request(2, b"a"))) == 1
    assert_rejected_with_fault(connection, request(3, b"b"), dcerpc.NCA_S_PROTO_ERROR, call_id=3,
                               did_not_execute=False)
    connection = bound_connection(flags=WHOLE | CONC_MPX)
    events, _ = exchange(connection, request(2, b"a") + request(3, b"b"))
    assert [event.call_id for event in events] == [2, 3]
    connection.send_response(events[1], b"B")
    connection.send_response(events[0], b"A")
    assert [packet.call_id for packet in split_pdus(connection.data_to_send())] == [3, 2]


def test_cancel_and_orphaned_are_ignored():
    connection = bound_connection()
    data = (request(2, b"ab", flags=FIRST) + pdu(CO_CANCEL, b"", call_id=2) + pdu(ORPHANED, b"", call_id=2)
            + request(2, b"cd", flags=LAST) + pdu(ORPHANED, b"", call_id=2))
    events, pdus = exchange(connection, data)
    assert pdus == [] and [event.stub for event in events] == [b"abcd"]
    connection.send_response(events[0], b"still answered")
    assert split_pdus(connection.data_to_send())[0].ptype == RESPONSE


# -- the daemon's side of the API --------------------------------------------------------------

@pytest.mark.parametrize("status, did_not_execute", [
    (dcerpc.NCA_S_OP_RNG_ERROR, True), (dcerpc.NCA_S_FAULT_NDR, False), (0x8000FFFF, False)])
def test_send_fault(status, did_not_execute):
    connection = bound_connection()
    connection.receive_data(alter(context(4, FSRVP, NDR)))
    connection.data_to_send()
    events, _ = exchange(connection, request(3, b"", context_id=4, opnum=77))
    connection.send_fault(events[0], status)
    packet, = split_pdus(connection.data_to_send())
    assert packet.call_id == 3 and parse_fault(packet) == (4, status)
    assert bool(packet.flags & DID_NOT_EXECUTE) == did_not_execute


def test_fault_status_a_server_must_not_send():
    connection = bound_connection()
    events, _ = exchange(connection, request(2, b""))
    for status in (0, 0xC0000005, -1, 1 << 32):
        with pytest.raises(ValueError):
            connection.send_fault(events[0], status)


def test_answering_twice_or_a_foreign_call_is_a_programming_error():
    connection = bound_connection()
    events, _ = exchange(connection, request(2, b""))
    connection.send_response(events[0], b"")
    with pytest.raises(ValueError):
        connection.send_response(events[0], b"")
    with pytest.raises(ValueError):
        connection.send_fault(dcerpc.RpcCall(9, 0, 0, b"", FSRVP_INTERFACE_UUID), dcerpc.NCA_S_FAULT_NDR)


def test_answers_after_close_are_dropped_and_input_ignored():
    connection = new_connection(max_xmit_frag=2048)
    events = connection.receive_data(bind(context(0, FSRVP, NDR), flags=WHOLE | CONC_MPX)
                                     + request(2, b"") + pdu(SHUTDOWN, b"", call_id=3))
    call, closed = events
    assert isinstance(closed, dcerpc.ConnectionClosed) and "shutdown" in closed.reason and connection.closed
    connection.send_response(call, b"too late")
    assert [packet.ptype for packet in split_pdus(connection.data_to_send())] == [BIND_ACK, FAULT]
    assert connection.receive_data(request(4, b"")) == [] and connection.data_to_send() == b""


@pytest.mark.parametrize("arguments", [
    dict(max_recv_frag=1000), dict(max_xmit_frag=70000), dict(max_call_bytes=0), dict(secondary_address="é"),
    dict(secondary_address="x" * 0xFFFF), dict(interfaces={FSRVP_INTERFACE_UUID: (0x10000, 0)})])
def test_constructor_rejects_impossible_limits(arguments):
    with pytest.raises(ValueError):
        dcerpc.ServerConnection(**{"interfaces": {FSRVP_INTERFACE_UUID: (1, 0)}, **arguments})


# -- arbitrary input never raises ----------------------------------------------------------------

def receive_checked(connection: dcerpc.ServerConnection, data: bytes) -> list:
    """receive_data, checking that events and output are well formed and that closing is final."""
    was_closed = connection.closed
    events = connection.receive_data(data)
    assert all(isinstance(event, (dcerpc.RpcCall, dcerpc.ConnectionClosed)) for event in events)
    closings = [event for event in events if isinstance(event, dcerpc.ConnectionClosed)]
    assert connection.closed == (was_closed or bool(closings))
    assert not (was_closed and events) and closings in ([], events[-1:])
    return events


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_arbitrary_bytes_never_raise(data, after_bind):
    connection = bound_connection() if after_bind else new_connection()
    receive_checked(connection, data)
    split_pdus(connection.data_to_send())


plausible_pdus = st.builds(
    lambda ptype, flags, call_id, auth_length, body, frag_length: pdu(
        ptype, body, flags=flags, call_id=call_id, auth_length=auth_length,
        frag_length=None if frag_length is None else frag_length),
    ptype=st.sampled_from([REQUEST, REQUEST, REQUEST, BIND, ALTER, AUTH3, CO_CANCEL, ORPHANED, SHUTDOWN, 21]),
    flags=st.integers(0, 255),
    call_id=st.integers(0, 6),
    auth_length=st.sampled_from([0, 0, 0, 1, 8, 16]),
    body=st.one_of(st.binary(max_size=120),
                   st.builds(lambda stub, opnum: struct.pack("<IHH", len(stub), 0, opnum) + stub,
                             st.binary(max_size=64), st.integers(0, 20))),
    frag_length=st.one_of(st.none(), st.integers(0, 200)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(plausible_pdus, max_size=8), st.booleans())
def test_plausible_pdus_never_raise(pdus, answer_calls):
    connection = bound_connection(max_call_bytes=256)
    for data in pdus:
        events = receive_checked(connection, data)
        for event in events:
            if isinstance(event, dcerpc.RpcCall) and answer_calls:
                connection.send_response(event, event.stub)
        split_pdus(connection.data_to_send())


# -- an independent client: impacket's DCERPC_v5 over an in-memory pipe -------------------------

FSRVP_FOR_IMPACKET = uuidtup_to_bin((str(FSRVP_INTERFACE_UUID), "1.0"))


def impacket_client(server: dcerpc.ServerConnection) -> rpcrt.DCERPC_v5:
    client = rpcrt.DCERPC_v5(InMemoryPipe(server))
    client.bind(FSRVP_FOR_IMPACKET)
    return client


def test_impacket_echoes_100_kib_both_ways():
    server = new_connection()
    client = impacket_client(server)
    stub = bytes(range(256)) * 400
    client.call(3, stub)
    assert client.recv() == stub
    assert server.closed is False


def test_impacket_sees_the_daemons_fault():
    client = impacket_client(new_connection())
    client.call(99, b"\0" * 8)
    with pytest.raises(rpcrt.DCERPCException, match="nca_s_op_rng_error"):
        client.recv()


def test_impacket_alter_context_then_call():
    client = impacket_client(new_connection())
    altered = client.alter_ctx(FSRVP_FOR_IMPACKET)
    altered.call(1, b"\x10\0\0\0")
    assert altered.recv() == b"\x10\0\0\0"


def test_impacket_ndr64_only_bind_is_rejected():
    client = rpcrt.DCERPC_v5(InMemoryPipe(new_connection()))
    with pytest.raises(rpcrt.DCERPCException, match="proposed_transfer_syntaxes_not_supported"):
        client.bind(FSRVP_FOR_IMPACKET, transfer_syntax=("71710533-beba-4937-8319-b5dbef9ccc36", "1.0"))


def test_impacket_unknown_interface_is_rejected():
    client = rpcrt.DCERPC_v5(InMemoryPipe(new_connection()))
    with pytest.raises(rpcrt.DCERPCException, match="abstract_syntax_not_supported"):
        client.bind(uuidtup_to_bin(("12345778-1234-abcd-ef00-0123456789ab", "0.0")))


# -- authenticated connections: NTLMSSP with impacket's client, verifiers checked both ways ---------

USER, PASSWORD, DOMAIN = "backup", "secret", "WORKGROUP"
WINNT, NEGOTIATE, KERBEROS = 10, 9, 16
INTEGRITY = 5
SUPPORT_HEADER_SIGN = 0x04


def secured_connection(**kwargs) -> dcerpc.ServerConnection:
    accounts = NtHashAccounts({USER: impacket_ntlm.compute_nthash(PASSWORD).hex()})
    providers = security_providers(accounts, DOMAIN, "FSRVPD")
    return new_connection(security_providers=providers, **kwargs)


class AuthenticatedPipe(InMemoryPipe):
    """An in-memory pipe that checks every response verifier with an independent NTLM peer
    (impacket's client checks none)."""

    peer: ImpacketPeer | None = None

    def delivered(self, output: bytes) -> None:
        if self.peer is not None:
            for packet in split_protected(output):
                self.check(packet)
        super().delivered(output)

    def check(self, packet: bytes) -> None:
        auth_length = struct.unpack_from("<H", packet, 10)[0]
        if packet[2] != RESPONSE:
            return
        assert auth_length == 16
        trailer_start = len(packet) - 16 - 8
        auth_type, level, pad, _, _ = struct.unpack_from("<BBBBI", packet, trailer_start)
        assert (len(packet) - 24 - 8 - 16) % 16 == 0  # stub plus padding: whole 16-byte blocks
        self.peer.check_server(packet[:-16], packet[-16:], sealed=level == PKT_PRIVACY,
                               body=slice(24, trailer_start))


def split_protected(data: bytes) -> list[bytes]:
    packets = []
    while data:
        length = struct.unpack_from("<H", data, 8)[0]
        packets.append(data[:length])
        data = data[length:]
    return packets


def authenticated_client(level: int, server=None, password: str = PASSWORD, tamper=None):
    server = server or secured_connection()
    pipe = AuthenticatedPipe(server, tamper)
    client = rpcrt.DCERPC_v5(pipe)
    client.set_credentials(USER, password, DOMAIN)
    client.set_auth_type(rpcrt.RPC_C_AUTHN_WINNT)
    client.set_auth_level(level)
    client.bind(FSRVP_FOR_IMPACKET)
    if password == PASSWORD:
        pipe.peer = ImpacketPeer(client._DCERPC_v5__sessionKey, client._DCERPC_v5__flags)
    return client, pipe, server


@pytest.mark.parametrize("level", [INTEGRITY, PKT_PRIVACY], ids=["integrity", "privacy"])
def test_ntlm_connection_carries_the_principal_and_protects_100_kib_both_ways(level):
    client, pipe, server = authenticated_client(level)
    results = [event for event in pipe.events if isinstance(event, dcerpc.AuthenticationResult)]
    assert [(result.principal.user, result.principal.level) for result in results] == [(USER, level)]
    stub = bytes(range(256)) * 400
    client.call(3, stub)
    assert client.recv() == stub
    call, = [event for event in pipe.events if isinstance(event, dcerpc.RpcCall)]
    assert call.stub == stub and call.principal.user == USER and call.principal.domain == DOMAIN
    assert call.principal.auth_type == WINNT and call.principal.level == level
    assert pipe.peer.server_sequence > 20  # every response fragment was signed and checked
    assert not server.closed


def test_ntlm_request_is_sealed_on_the_wire():
    client, pipe, _ = authenticated_client(PKT_PRIVACY)
    client.call(1, b"SECRET-STUB-BYTES" * 4)
    client.recv()
    assert b"SECRET-STUB-BYTES" not in pipe.sent[-1]


def captured_request(level: int) -> tuple[rpcrt.DCERPC_v5, AuthenticatedPipe, dcerpc.ServerConnection, bytes]:
    client, pipe, server = authenticated_client(level)
    client.call(1, b"first call stub!")
    client.recv()
    return client, pipe, server, pipe.sent[-1]


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]


@pytest.mark.parametrize("level", [INTEGRITY, PKT_PRIVACY], ids=["integrity", "privacy"])
@pytest.mark.parametrize("tamper", [
    lambda pdu: pdu,  # a replay: the sequence number is spent
    lambda pdu: flip(pdu, 30),  # stub
    lambda pdu: flip(pdu, 22),  # opnum in the request header: covered by the verifier
    lambda pdu: flip(pdu, len(pdu) - 1),  # verifier
    lambda pdu: flip(pdu, len(pdu) - 20),  # auth_context_id in the sec_trailer
    lambda pdu: pdu[:-24] + struct.pack("<BBBBI", WINNT, INTEGRITY + PKT_PRIVACY - pdu[-23], pdu[-22], 0,
                                        struct.unpack_from("<I", pdu, len(pdu) - 20)[0]) + pdu[-16:],  # level
], ids=["replayed", "stub", "header", "verifier", "context-id", "other-level"])
def test_altered_or_replayed_request_is_refused_and_closes(level, tamper):
    _, _, server, request_pdu = captured_request(level)
    assert_rejected_with_fault(server, tamper(request_pdu), dcerpc.RPC_S_ACCESS_DENIED,
                               call_id=struct.unpack_from("<I", request_pdu, 12)[0], did_not_execute=False)


def test_unsigned_request_on_an_authenticated_connection_is_refused():
    _, _, server, _ = captured_request(INTEGRITY)
    assert_rejected_with_fault(server, request(9, b"x"), dcerpc.RPC_S_ACCESS_DENIED, call_id=9,
                               did_not_execute=False)


def test_wrong_password_is_refused_at_the_first_request():
    client, pipe, server = authenticated_client(INTEGRITY, password="wrong")
    failures = [event for event in pipe.events if isinstance(event, dcerpc.AuthenticationResult)]
    assert len(failures) == 1 and failures[0].principal is None and "wrong password" in failures[0].reason
    assert not server.closed and pipe.to_client == b""  # auth3 gets no answer
    events, pdus = exchange(server, request(2, b"x"))
    assert parse_fault(pdus[0]) == (0, dcerpc.RPC_S_ACCESS_DENIED) and server.closed


def handshake_started(flags: int = WHOLE) -> tuple[dcerpc.ServerConnection, bytes]:
    """A server that answered an NTLMSSP bind; its bind_ack."""
    server = secured_connection()
    negotiate = impacket_ntlm.getNTLMSSPType1("", "", signingRequired=True).getData()
    events, pdus = exchange(server, bind(context(0, FSRVP, NDR), flags=flags, with_auth=dict(
        auth_type=WINNT, level=INTEGRITY, token=negotiate)))
    assert events == [] and pdus[0].ptype == BIND_ACK
    return server, pdus[0]


def test_bind_ack_carries_the_challenge_and_answers_header_signing():
    _, ack = handshake_started(flags=WHOLE | SUPPORT_HEADER_SIGN)
    assert ack.flags & SUPPORT_HEADER_SIGN
    assert b"NTLMSSP\0\x02\0\0\0" in ack.body
    auth_type, level, pad, _, context_id = struct.unpack_from("<BBBBI", ack.body, ack.body.index(b"NTLMSSP") - 8)
    assert (auth_type, level, context_id) == (WINNT, INTEGRITY, 79231)


def test_request_before_the_handshake_finished_is_a_protocol_error():
    server, _ = handshake_started()
    assert_rejected_with_fault(server, request(2, b"x"), dcerpc.NCA_S_PROTO_ERROR, call_id=2)


def test_alter_context_without_auth_during_the_handshake_is_refused():
    server, _ = handshake_started()
    assert_rejected_with_fault(server, alter(context(1, FSRVP, NDR)), dcerpc.RPC_S_SEC_PKG_ERROR, call_id=2)


def test_alter_context_with_auth_after_the_handshake_is_refused():
    _, _, server, _ = captured_request(INTEGRITY)
    assert_rejected_with_fault(server, alter(context(1, FSRVP, NDR), call_id=7, with_auth=dict(
        auth_type=WINNT, level=INTEGRITY)), dcerpc.RPC_S_ACCESS_DENIED, call_id=7)


def test_second_security_context_on_a_connection_is_refused():
    """impacket's alter_ctx builds a new security context on the same connection: that would be
    security context multiplexing, which fsrvpd does not negotiate."""
    client, _, server = authenticated_client(INTEGRITY)
    with pytest.raises(rpcrt.DCERPCException, match="access_denied"):
        client.alter_ctx(FSRVP_FOR_IMPACKET)
    assert server.closed


@pytest.mark.parametrize("auth, reason", [
    (dict(auth_type=KERBEROS, level=INTEGRITY), NAK_AUTH_TYPE),  # no keytab: Kerberos is not offered
    (dict(auth_type=WINNT, level=2), NAK_NOT_SPECIFIED),  # connect level protects nothing
    (dict(auth_type=WINNT, level=3), NAK_NOT_SPECIFIED),  # call level, likewise
    (dict(auth_type=WINNT, level=INTEGRITY, token=b"not NTLMSSP"), 9),  # invalid_checksum
    (dict(auth_type=NEGOTIATE, level=INTEGRITY, token=b"\x60\x00"), 9),
])
def test_binds_the_security_providers_cannot_serve_get_bind_nak(auth, reason):
    assert_rejected_with_bind_nak(secured_connection(), bind(context(0, FSRVP, NDR), with_auth=auth), reason)


def test_auth3_for_another_context_fails_the_connection():
    server, _ = handshake_started()
    trailer, auth_length = auth_trailer(4, auth_type=WINNT, level=PKT_PRIVACY, token=b"NTLMSSP\0\3\0\0\0")
    events, pdus = exchange(server, pdu(AUTH3, bytes(4) + trailer, call_id=1, auth_length=auth_length))
    assert pdus == [] and isinstance(events[0], dcerpc.AuthenticationResult) and events[0].principal is None
    assert_rejected_with_fault(server, request(2, b"x"), dcerpc.RPC_S_ACCESS_DENIED, call_id=2,
                               did_not_execute=False)


# -- verification trailer (MS-RPCE 2.2.2.13) ----------------------------------------------------

VT_MAGIC = bytes.fromhex("8ae3137102f43671")


def verification_trailer(*commands: tuple[int, bytes]) -> bytes:
    body = b""
    for index, (command, data) in enumerate(commands):
        if index == len(commands) - 1:
            command |= 0x4000
        body += struct.pack("<HH", command, len(data)) + data
    return VT_MAGIC + body


def header2(call_id: int, context_id: int = 0, opnum: int = 0) -> tuple[int, bytes]:
    return 3, struct.pack("<BBH4sIHH", REQUEST, 0, 0, LE_DREP, call_id, context_id, opnum)


def test_verification_trailer_is_checked_and_removed():
    connection = bound_connection()
    stub = b"ndr!" + verification_trailer((1, bytes(4)), (2, FSRVP + NDR), header2(2, opnum=5))
    events, _ = exchange(connection, request(2, stub, opnum=5))
    assert events[0].stub == b"ndr!"


@pytest.mark.parametrize("commands", [
    [header2(2, opnum=6)],  # another opnum than the request's
    [(2, OTHER_INTERFACE + NDR)],  # another interface than the bound one
    [(1, b"\1\0\0\0")],  # claims header signing the bind did not ask for
    [(0x8000 | 7, b"")],  # an unknown command the server must process
])
def test_verification_trailer_that_does_not_match_faults_the_call(commands):
    connection = bound_connection()
    assert_rejected_with_fault(connection, request(2, b"ndr!" + verification_trailer(*commands), opnum=5),
                               dcerpc.RPC_S_ACCESS_DENIED, call_id=2, closes=False)
    events, _ = exchange(connection, request(3, b"next"))
    assert events[0].stub == b"next"


def test_magic_inside_stub_data_is_left_alone():
    stub = b"data" + VT_MAGIC + b"\x01\x00\xff\x7f"  # a command that runs past the end: not a trailer
    events, _ = exchange(bound_connection(), request(2, stub))
    assert events[0].stub == stub


def test_alter_context_without_auth_adds_a_context_to_an_authenticated_connection():
    _, _, server, _ = captured_request(INTEGRITY)
    events, pdus = exchange(server, alter(context(1, FSRVP, NDR), call_id=7))
    assert events == [] and pdus[0].ptype == ALTER_RESP and not server.closed
    assert parse_context_ack(pdus[0]).results == [(ACCEPTANCE, 0, NDR)]

"""Fuzz targets: what a hostile peer controls, fed to the code that parses it.

Each target takes one byte string and raises only on a bug: an exception that is not the parser's
own refusal, or output that breaks the protocol.  The same functions serve the coverage-guided
runs (scripts/fuzz.py on atheris), the short run inside the suite, and the replay of every input
that once crashed (tests/fuzz/regressions/<target>/), which keeps each fixed bug fixed.

- `pdu`: the DCE/RPC PDU layer, unauthenticated or with the NTLMSSP/SPNEGO providers, fed in
  chunks; each call answered, every output PDU framed correctly.
- `ndr`: the FSRVP request decoder for every opnum; a decoded request must re-encode to a stub
  that decodes to the same request, its failure response must encode, and its share path must
  parse or be refused as a UNC.
- `auth`: NTLMSSP and SPNEGO security contexts given arbitrary handshake tokens and PDUs.
"""

from __future__ import annotations

import struct
import uuid

from fsrvpd import dcerpc, messages
from fsrvpd.constants import FSRVP_INTERFACE_UUID, FSRVP_INTERFACE_VERSION, HResult
from fsrvpd.ndr import NdrError
from fsrvpd.ntlm import NtHashAccounts, NtlmContext
from fsrvpd.rpcauth import AuthError, AuthLevel, AuthType
from fsrvpd.spnego import SpnegoContext
from fsrvpd.unc import BadUnc, parse_unc

NT_HASH = "8846f7eaee8fb117ad06bdd830b7586c"  # "password"
ACCOUNTS = NtHashAccounts({"backup": NT_HASH})


def _ntlm(level: AuthLevel) -> NtlmContext:
    """A context with a fixed challenge and clock, so a recorded client session replays exactly."""
    return NtlmContext(level, ACCOUNTS, "WORKGROUP", "FSRVPD", clock=lambda: 0.0,
                       challenge_source=lambda size: bytes(size))


PROVIDERS = {AuthType.WINNT: _ntlm, AuthType.GSS_NEGOTIATE: lambda level: SpnegoContext(_ntlm(level))}
OWN_NAMES = {"fsrvpd", "127.0.0.1", "localhost"}
_FRAME = struct.Struct("<H")  # length prefix of the pieces an input is cut into
RPCCLIENT_BIND = bytes.fromhex("05000b03100000004800000001000000b810b810000000000100000000000100"
                               "3c65e0a844278943a61d7373df8b229201000000045d888aeb1cc9119fe808002b10486002000000")


def pieces(data: bytes) -> list[bytes]:
    """Cut an input into length-prefixed pieces (the last one takes what is left)."""
    found = []
    while len(data) >= _FRAME.size:
        size = _FRAME.unpack_from(data)[0]
        found.append(data[_FRAME.size:_FRAME.size + size])
        data = data[_FRAME.size + size:]
    return found


def joined(*chunks: bytes) -> bytes:
    """The inverse of `pieces`, for writing seeds."""
    return b"".join(_FRAME.pack(len(chunk)) + chunk for chunk in chunks)


def pdu(data: bytes) -> None:
    """Byte 0 chooses: bit 0 offers the security providers, bit 1 answers calls with their stub,
    bits 2-7 a chunk size; the rest is the stream from the client."""
    if not data:
        return
    control, stream = data[0], data[1:]
    connection = dcerpc.ServerConnection({FSRVP_INTERFACE_UUID: FSRVP_INTERFACE_VERSION},
                                         max_call_bytes=1 << 16,
                                         security_providers=PROVIDERS if control & 1 else None)
    chunk = (control >> 2) + 1
    closed = False
    for start in range(0, len(stream), chunk):
        for event in connection.receive_data(stream[start:start + chunk]):
            assert not closed, "event after ConnectionClosed"
            if isinstance(event, dcerpc.ConnectionClosed):
                closed = True
            elif isinstance(event, dcerpc.RpcCall) and control & 2:
                connection.send_response(event, event.stub)
            elif isinstance(event, dcerpc.RpcCall):
                connection.send_fault(event, dcerpc.NCA_S_OP_RNG_ERROR)
        _check_framing(connection.data_to_send())
    assert closed == connection.closed


def _check_framing(output: bytes) -> None:
    while output:
        assert len(output) >= dcerpc.HEADER_SIZE and output[:2] == b"\x05\x00", output[:16]
        frag_length, auth_length = struct.unpack_from("<HH", output, 8)
        assert dcerpc.HEADER_SIZE <= frag_length <= len(output) and auth_length < frag_length
        output = output[frag_length:]


def ndr(data: bytes) -> None:
    """Byte 0 is the opnum (0..13, 13 being unknown), the rest the stub."""
    if not data:
        return
    opnum, stub = data[0] % 14, data[1:]
    try:
        request = messages.decode_request(opnum, stub, 1024)
    except (NdrError, messages.UnknownOpnum):
        return
    again, encoded = messages.encode_request(request)
    assert again == opnum and messages.decode_request(opnum, encoded) == request
    messages.encode_response(opnum, messages.failure_response(request, HResult.E_ACCESSDENIED))
    share = getattr(request, "share_name", None)
    if share is not None:
        try:
            parse_unc(share, OWN_NAMES)
        except BadUnc:
            pass


def auth(data: bytes) -> None:
    """Byte 0 chooses NTLMSSP or SPNEGO and the level; the pieces after it are handshake tokens,
    then PDUs to unprotect."""
    if not data:
        return
    level = (AuthLevel.PKT, AuthLevel.PKT_INTEGRITY, AuthLevel.PKT_PRIVACY)[data[0] % 3]
    ntlm = _ntlm(level)
    context = SpnegoContext(ntlm) if data[0] & 4 else ntlm
    for piece in pieces(data[1:]):
        try:
            if context.principal is None:
                context.accept(piece)
            else:
                body = slice(min(24, len(piece)), max(len(piece) - 16, 0))
                context.unprotect(piece[:-16], body, piece[-16:])
        except AuthError:
            return


TARGETS = {"pdu": pdu, "ndr": ndr, "auth": auth}


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs to start each target from, so the fuzzer begins deep inside the formats."""
    from impacket import ntlm as impacket_ntlm

    negotiate = impacket_ntlm.getNTLMSSPType1("", "", signingRequired=True).getData()
    requests = [messages.encode_request(request) for request in _sample_requests()]
    bind = RPCCLIENT_BIND
    sessions = [bind + b"".join(_request_pdu(index + 2, opnum, stub) for index, (opnum, stub) in enumerate(requests))]
    spnego_init = _spnego_init(negotiate)
    return {
        "pdu": [bytes([control]) + session for session in sessions + [ntlm_bind()] for control in (0x02, 0x03, 0x43)]
        + [bytes([0x03]) + stream for stream in _authenticated_pdu_streams(requests)],
        "ndr": [bytes([opnum]) + stub for opnum, stub in requests],
        "auth": [bytes([1]) + joined(negotiate), bytes([5]) + joined(spnego_init), *_authenticated_sessions()],
    }


def _authenticated_sessions() -> list[bytes]:
    """Whole handshakes and signed or sealed PDUs that the target's fixed challenge accepts."""
    from impacket import ntlm as impacket_ntlm
    from tests.support.ntlmpeer import ImpacketPeer

    sessions = []
    for control in (1, 2):  # NTLMSSP at integrity, then at privacy
        server = _ntlm((AuthLevel.PKT, AuthLevel.PKT_INTEGRITY, AuthLevel.PKT_PRIVACY)[control])
        negotiate = impacket_ntlm.getNTLMSSPType1("", "", signingRequired=True)
        challenge = server.accept(negotiate.getData())
        authenticate, key = impacket_ntlm.getNTLMSSPType3(negotiate, challenge, "backup", "password", "WORKGROUP")
        peer = ImpacketPeer(key, authenticate["flags"])
        message = bytes(24) + b"stub data, 24 bytes long"
        if control == 2:
            sealed, signature = peer.seal(message, slice(24, len(message)))
            protected = message[:24] + sealed + signature
        else:
            protected = message + peer.sign(message)
        sessions.append(bytes([control]) + joined(negotiate.getData(), authenticate.getData(), protected))
    return sessions


def _authenticated_pdu_streams(requests: list[tuple[int, bytes]]) -> list[bytes]:
    """What impacket sends for an NTLMSSP bind, auth3 and every FSRVP call, signed and sealed."""
    from impacket.dcerpc.v5 import rpcrt
    from impacket.uuid import uuidtup_to_bin
    from tests.support.inmemory import InMemoryPipe

    streams = []
    for level in (rpcrt.RPC_C_AUTHN_LEVEL_PKT_INTEGRITY, rpcrt.RPC_C_AUTHN_LEVEL_PKT_PRIVACY):
        pipe = InMemoryPipe(dcerpc.ServerConnection({FSRVP_INTERFACE_UUID: FSRVP_INTERFACE_VERSION},
                                                    security_providers=PROVIDERS))
        client = rpcrt.DCERPC_v5(pipe)
        client.set_credentials("backup", "password", "WORKGROUP")
        client.set_auth_type(rpcrt.RPC_C_AUTHN_WINNT)
        client.set_auth_level(level)
        client.bind(uuidtup_to_bin((str(FSRVP_INTERFACE_UUID), "1.0")))
        for opnum, stub in requests:
            client.call(opnum, stub)
            assert client.recv() == stub
        streams.append(b"".join(pipe.sent))
    return streams


def ntlm_bind() -> bytes:
    """rpcclient's bind carrying impacket's NTLMSSP NEGOTIATE at packet integrity."""
    from impacket import ntlm as impacket_ntlm

    negotiate = impacket_ntlm.getNTLMSSPType1("", "", signingRequired=True).getData()
    bind = RPCCLIENT_BIND
    return bind[:8] + struct.pack("<HH", len(bind) + 8 + len(negotiate), len(negotiate)) + bind[12:] + \
        struct.pack("<BBBBI", 10, 5, 0, 0, 1) + negotiate


def _request_pdu(call_id: int, opnum: int, stub: bytes) -> bytes:
    body = struct.pack("<IHH", len(stub), 0, opnum) + stub
    return struct.pack("<BBBB4sHHI", 5, 0, 0, 3, b"\x10\0\0\0", 16 + len(body), 0, call_id) + body


def _sample_requests() -> list:
    one, two = uuid.UUID(int=1), uuid.UUID(int=2)
    unc = "\\\\FSRVPD\\vms\\"
    return [messages.GetSupportedVersionRequest(), messages.SetContextRequest(0x400000),
            messages.StartShadowCopySetRequest(one), messages.AddToShadowCopySetRequest(one, two, unc),
            messages.CommitShadowCopySetRequest(one, 60000), messages.ExposeShadowCopySetRequest(one, 60000),
            messages.RecoveryCompleteShadowCopySetRequest(one), messages.AbortShadowCopySetRequest(one),
            messages.IsPathSupportedRequest(unc), messages.IsPathShadowCopiedRequest(unc),
            messages.GetShareMappingRequest(one, two, unc, 1), messages.DeleteShareMappingRequest(one, two, unc),
            messages.PrepareShadowCopySetRequest(one, 1800000)]


def _spnego_init(mech_token: bytes) -> bytes:
    def der(tag: int, value: bytes) -> bytes:
        length = bytes([len(value)]) if len(value) < 0x80 else b"\x82" + len(value).to_bytes(2, "big")
        return bytes([tag]) + length + value
    mechs = der(0x30, der(0x06, bytes.fromhex("2b06010401823702020a")))
    init = der(0x30, der(0xA0, mechs) + der(0xA2, der(0x04, mech_token)))
    return der(0x60, der(0x06, bytes.fromhex("2b0601050502")) + der(0xA0, init))

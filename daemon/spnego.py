"""SPNEGO (RFC 4178, MS-SPNG) around NTLMSSP: auth_type GSS_NEGOTIATE on the FSRVP pipe.

Windows clients ask for "Negotiate"; SPNEGO then picks a mechanism.  fsrvpd offers NTLMSSP only
(Kerberos needs a keytab and a KDC, which the embedded front door does not have), so a client
whose first choice is Kerberos is told to continue with NTLMSSP.  After the NTLMSSP legs both
sides exchange mechListMICs -- signatures over the client's mechanism list, which keep a man in
the middle from steering the choice -- whenever the client sends one, its NTLMSSP MIC demands it,
or NTLMSSP was not its first choice.

Only the few DER shapes SPNEGO uses are read, each bounds-checked: a malformed token is an
AuthError, never an exception from deep inside a parser.
"""

from __future__ import annotations

import enum

from .ntlm import NtlmContext
from .rpcauth import AuthError, AuthType, Principal, SecurityContext

SPNEGO_OID = bytes.fromhex("2b0601050502")  # 1.3.6.1.5.5.2
NTLMSSP_OID = bytes.fromhex("2b06010401823702020a")  # 1.3.6.1.4.1.311.2.2.10

_APPLICATION_0, _SEQUENCE, _OID, _OCTET_STRING, _ENUMERATED = 0x60, 0x30, 0x06, 0x04, 0x0A
_NEG_TOKEN_INIT, _NEG_TOKEN_RESP = 0xA0, 0xA1
_MAX_DER_LENGTH_BYTES = 3  # a token larger than 16 MiB is not an authentication token


class NegState(enum.IntEnum):
    ACCEPT_COMPLETED = 0
    ACCEPT_INCOMPLETE = 1
    REJECT = 2
    REQUEST_MIC = 3


def _read(data: bytes, offset: int, limit: int | None = None) -> tuple[int, int, int]:
    """(tag, start, end) of the DER element at `offset`, which must end by `limit` (default: the
    token's end); definite lengths only."""
    limit = len(data) if limit is None else limit
    if offset + 2 > limit:
        raise AuthError("SPNEGO token truncated")
    tag, first = data[offset], data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= _MAX_DER_LENGTH_BYTES or start + count > limit:
            raise AuthError("SPNEGO token has an unusable DER length")
        length = int.from_bytes(data[start:start + count], "big")
        start += count
    if start + length > limit:
        raise AuthError("SPNEGO element runs past its container")
    return tag, start, start + length


def _elements(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The elements between start and end, which must fill it exactly."""
    found = []
    while start < end:
        tag, value_start, value_end = _read(data, start, end)
        found.append((tag, value_start, value_end))
        start = value_end
    return found


def _expect(data: bytes, offset: int, tag: int, what: str, container_end: int | None = None) -> tuple[int, int]:
    """(start, end) of the content of the `tag` element at `offset`; given its container's end,
    the element must fill the container exactly."""
    found, start, end = _read(data, offset, container_end)
    if found != tag:
        raise AuthError(f"SPNEGO: {what} expected, tag {found:#04x} found")
    if container_end is not None and end != container_end:
        raise AuthError(f"SPNEGO: {what} does not fill its field")
    return start, end


def _fields(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """The context-tagged fields [n] of the SEQUENCE filling start..end, by n: (start, end) of
    each one's content."""
    seq_start, seq_end = _expect(data, start, _SEQUENCE, "SEQUENCE", end)
    fields = {}
    for tag, value_start, value_end in _elements(data, seq_start, seq_end):
        if tag & 0xE0 == 0xA0:
            fields.setdefault(tag & 0x1F, (value_start, value_end))
    return fields


def _octets(data: bytes, field: tuple[int, int] | None) -> bytes | None:
    if field is None:
        return None
    start, end = _expect(data, field[0], _OCTET_STRING, "OCTET STRING", field[1])
    return data[start:end]


def _encode(tag: int, value: bytes) -> bytes:
    if len(value) < 0x80:
        return bytes((tag, len(value))) + value
    length = len(value).to_bytes((len(value).bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + value


def neg_token_resp(state: NegState, mech: bytes | None = None, token: bytes | None = None,
                   mic: bytes | None = None) -> bytes:
    """NegTokenResp as the server sends it, [1] around the SEQUENCE."""
    fields = _encode(0xA0, _encode(_ENUMERATED, bytes((state,))))
    if mech is not None:
        fields += _encode(0xA1, _encode(_OID, mech))
    if token is not None:
        fields += _encode(0xA2, _encode(_OCTET_STRING, token))
    if mic is not None:
        fields += _encode(0xA3, _encode(_OCTET_STRING, mic))
    return _encode(_NEG_TOKEN_RESP, _encode(_SEQUENCE, fields))


class SpnegoContext(SecurityContext):
    """SPNEGO negotiating NTLMSSP; after the handshake it protects PDUs exactly as NTLMSSP does."""

    auth_type = AuthType.GSS_NEGOTIATE

    def __init__(self, ntlm: NtlmContext) -> None:
        self.level = ntlm.level
        self._ntlm = ntlm
        self._mech_list: bytes | None = None  # DER of the client's MechTypeList, what the MICs cover
        self._mic_required = False
        self._principal: Principal | None = None

    @property
    def principal(self) -> Principal | None:
        return self._principal

    def accept(self, token: bytes) -> bytes:
        if self._mech_list is None:
            return self._accept_init(token)
        if self._principal is None:
            return self._accept_resp(token)
        raise AuthError("SPNEGO handshake already finished")

    def _accept_init(self, token: bytes) -> bytes:
        """GSS InitialContextToken: [APPLICATION 0] { SPNEGO OID, [0] NegTokenInit }."""
        start, end = _expect(token, 0, _APPLICATION_0, "GSS InitialContextToken", len(token))
        oid_start, oid_end = _expect(token, start, _OID, "mechanism OID")
        if token[oid_start:oid_end] != SPNEGO_OID:
            raise AuthError("not an SPNEGO token")
        init_start, init_end = _expect(token, oid_end, _NEG_TOKEN_INIT, "NegTokenInit", end)
        fields = _fields(token, init_start, init_end)
        if 0 not in fields:
            raise AuthError("SPNEGO NegTokenInit without mechTypes")
        mech_start, mech_end = fields[0]
        list_start, list_end = _expect(token, mech_start, _SEQUENCE, "MechTypeList", mech_end)
        mechs = [token[s:e] for tag, s, e in _elements(token, list_start, list_end) if tag == _OID]
        if NTLMSSP_OID not in mechs:
            raise AuthError("the client offers no mechanism fsrvpd supports (NTLMSSP)")
        self._mech_list = token[mech_start:mech_end]
        mech_token = _octets(token, fields.get(2))
        if mechs[0] != NTLMSSP_OID or mech_token is None:
            # RFC 4178 5: the optimistic token was for another mechanism; ask for NTLMSSP's.
            self._mic_required = mechs[0] != NTLMSSP_OID
            return neg_token_resp(NegState.ACCEPT_INCOMPLETE, mech=NTLMSSP_OID)
        return neg_token_resp(NegState.ACCEPT_INCOMPLETE, mech=NTLMSSP_OID, token=self._ntlm.accept(mech_token))

    def _accept_resp(self, token: bytes) -> bytes:
        start, end = _expect(token, 0, _NEG_TOKEN_RESP, "NegTokenResp", len(token))
        fields = _fields(token, start, end)
        response_token = _octets(token, fields.get(2))
        if response_token is None:
            raise AuthError("SPNEGO NegTokenResp without a responseToken")
        answer = self._ntlm.accept(response_token)
        if self._ntlm.principal is None:
            return neg_token_resp(NegState.ACCEPT_INCOMPLETE, token=answer)
        client_mic = _octets(token, fields.get(3))
        if client_mic is None:
            if self._mic_required or self._ntlm.mic_used:
                raise AuthError("SPNEGO mechListMIC required but missing")
            self._principal = self._principal_of_ntlm()
            return neg_token_resp(NegState.ACCEPT_COMPLETED)
        self._ntlm.verify_mic(self._mech_list, client_mic)
        self._principal = self._principal_of_ntlm()
        return neg_token_resp(NegState.ACCEPT_COMPLETED, mic=self._ntlm.sign_mic(self._mech_list))

    def _principal_of_ntlm(self) -> Principal:
        ntlm = self._ntlm.principal
        return Principal(ntlm.user, ntlm.domain, self.auth_type, self.level)

    def protect(self, message: bytes, body: slice) -> tuple[bytes, bytes]:
        return self._ntlm.protect(message, body)

    def unprotect(self, message: bytes, body: slice, verifier: bytes) -> bytes:
        if self._principal is None:
            raise AuthError("SPNEGO handshake not finished")
        return self._ntlm.unprotect(message, body, verifier)

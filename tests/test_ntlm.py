"""NTLMSSP and SPNEGO server contexts: the worked example of MS-NLMP 4.2.4 byte for byte, then
impacket's client (an independent implementation) against ours, then every refusal."""

from __future__ import annotations

import hmac
import secrets
import struct

import pytest
from impacket import ntlm as impacket_ntlm

from fsrvpd.ntlm import NtHashAccounts, NtlmContext
from fsrvpd.rpcauth import AuthError, AuthLevel, AuthType
from fsrvpd.spnego import NTLMSSP_OID, SpnegoContext
from tests.support.ntlmpeer import ImpacketPeer

INTEGRITY, PRIVACY = AuthLevel.PKT_INTEGRITY, AuthLevel.PKT_PRIVACY

# MS-NLMP 4.2.4: user "User", domain "Domain", password "Password", server challenge 0123456789abcdef,
# RandomSessionKey 0x55 * 16, the AUTHENTICATE_MESSAGE of 4.2.4.3 and the sealed "Plaintext" of 4.2.4.4.
SPEC_CHALLENGE = bytes.fromhex("0123456789abcdef")
SPEC_AUTHENTICATE = bytes.fromhex(
    "4e544c4d53535000030000001800180" "06c00000054005400840000000c000c00"
    "48000000080008005400000010001000" "5c00000010001000d8000000358288e2"
    "0501280a0000000f44006f006d006100" "69006e00550073006500720043004f00"
    "4d005000550054004500520086c35097" "ac9cec102554764a57cccc19aaaaaaaa"
    "aaaaaaaa68cd0ab851e51c96aabc927b" "ebef6a1c010100000000000000000000"
    "00000000aaaaaaaaaaaaaaaa00000000" "02000c0044006f006d00610069006e00"
    "01000c00530065007200760065007200" "0000000000000000c5dad2544fc97990"
    "94ce1ce90bc9d03e")
SPEC_SEALED = bytes.fromhex("54e50165bf1936dc996020c1811b0f06fb5f")
SPEC_SIGNATURE = bytes.fromhex("010000007fb38ec5c55d497600000000")
SPEC_FLAGS = 0xE28A8233


def nt_hash(password: str) -> str:
    return impacket_ntlm.compute_nthash(password).hex()


def negotiate(flags: int) -> bytes:
    return b"NTLMSSP\0" + struct.pack("<II", 1, flags) + bytes(16)


def context(level=PRIVACY, users=None, challenge=None, domain="Domain", server="Server") -> NtlmContext:
    accounts = NtHashAccounts(users or {"User": nt_hash("Password")})
    source = (lambda size: challenge) if challenge else secrets.token_bytes
    return NtlmContext(level, accounts, domain, server, clock=lambda: 1_700_000_000.0, challenge_source=source)


def test_spec_example_authenticates_and_unseals():
    server = context(challenge=SPEC_CHALLENGE)
    challenge = server.accept(negotiate(SPEC_FLAGS))
    assert challenge[:12] == b"NTLMSSP\0\2\0\0\0" and challenge[24:32] == SPEC_CHALLENGE
    assert server.accept(SPEC_AUTHENTICATE) == b""
    assert (server.principal.user, server.principal.domain, server.principal.level) == ("User", "Domain", PRIVACY)
    plain = server.unprotect(SPEC_SEALED, slice(0, len(SPEC_SEALED)), SPEC_SIGNATURE)
    assert plain == "Plaintext".encode("utf-16-le")


@pytest.mark.parametrize("typed_user, typed_domain", [("USER", "Domain"), ("user", "DOMAIN")])
def test_user_names_match_case_insensitively(typed_user, typed_domain):
    server, client = handshake(context(), typed_user, "Password", typed_domain)
    assert server.principal.user == "User"


def impacket_tokens(server: NtlmContext, user: str, password: str, domain: str, flags_filter=None,
                    ntlmv2: bool = True):
    """impacket's NEGOTIATE and AUTHENTICATE for `server`'s CHALLENGE; (auth token, session key, flags)."""
    negotiate_message = impacket_ntlm.getNTLMSSPType1("", "", signingRequired=True, use_ntlmv2=ntlmv2)
    if flags_filter:
        negotiate_message["flags"] = flags_filter(negotiate_message["flags"])
    challenge = server.accept(negotiate_message.getData())
    authenticate, session_key = impacket_ntlm.getNTLMSSPType3(negotiate_message, challenge, user, password, domain,
                                                              use_ntlmv2=ntlmv2)
    return authenticate.getData(), session_key, authenticate["flags"]


def handshake(server, user="User", password="Password", domain="Domain"):
    token, session_key, flags = impacket_tokens(server, user, password, domain)
    assert server.accept(token) == b""
    return server, ImpacketPeer(session_key, flags)


@pytest.mark.parametrize("level", [INTEGRITY, PRIVACY])
def test_impacket_messages_both_ways(level):
    server, client = handshake(context(level))
    for index in range(3):
        message = b"request %d" % index
        if level == PRIVACY:
            sealed, signature = client.seal(message)
            assert sealed != message
            assert server.unprotect(sealed, slice(0, len(sealed)), signature) == message
            body, verifier = server.protect(b"answer", slice(0, 6))
            assert client.check_server(body, verifier, sealed=True) == b"answer"
        else:
            assert server.unprotect(message, slice(0, len(message)), client.sign(message)) == message
            body, verifier = server.protect(b"answer", slice(0, 6))
            assert client.check_server(body, verifier, sealed=False) == b"answer"


def test_replayed_or_reordered_message_is_refused():
    server, client = handshake(context(INTEGRITY))
    first, second = client.sign(b"one"), client.sign(b"two")
    with pytest.raises(AuthError, match="sequence"):
        server.unprotect(b"two", slice(0, 3), second)


def test_replay_of_an_accepted_message_is_refused():
    server, client = handshake(context(INTEGRITY))
    signature = client.sign(b"one")
    server.unprotect(b"one", slice(0, 3), signature)
    with pytest.raises(AuthError):
        server.unprotect(b"one", slice(0, 3), signature)


def test_tampered_message_is_refused():
    server, client = handshake(context(INTEGRITY))
    with pytest.raises(AuthError):
        server.unprotect(b"twO", slice(0, 3), client.sign(b"two"))


@pytest.mark.parametrize("user, password, reason", [
    ("User", "wrong", "wrong password"), ("Nobody", "Password", "unknown user"), ("", "", "anonymous")])
def test_bad_credentials_are_refused(user, password, reason):
    server = context()
    token, _, _ = impacket_tokens(server, user, password, "Domain")
    with pytest.raises(AuthError, match=reason):
        server.accept(token)
    assert server.principal is None


def test_ntlmv1_is_refused():
    server = context()
    token, _, _ = impacket_tokens(server, "User", "Password", "Domain", ntlmv2=False)
    with pytest.raises(AuthError):
        server.accept(token)


@pytest.mark.parametrize("missing", [impacket_ntlm.NTLMSSP_NEGOTIATE_128,
                                     impacket_ntlm.NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY,
                                     impacket_ntlm.NTLMSSP_NEGOTIATE_UNICODE])
def test_weak_session_security_is_refused(missing):
    with pytest.raises(AuthError, match="128-bit"):
        impacket_tokens(context(), "User", "Password", "Domain", flags_filter=lambda flags: flags & ~missing)


def test_privacy_needs_sealing():
    server = context(PRIVACY)
    with pytest.raises(AuthError, match="lack"):
        impacket_tokens_then_accept(server, lambda flags: flags & ~impacket_ntlm.NTLMSSP_NEGOTIATE_SEAL)


def impacket_tokens_then_accept(server, flags_filter):
    token, _, _ = impacket_tokens(server, "User", "Password", "Domain", flags_filter=flags_filter)
    server.accept(token)


def test_mic_is_checked_when_announced():
    server = context()
    negotiate_message = negotiate(SPEC_FLAGS | impacket_ntlm.NTLMSSP_NEGOTIATE_VERSION)
    challenge = server.accept(negotiate_message)
    authenticate = spec_style_authenticate(challenge, mic=bytes(16))
    with pytest.raises(AuthError, match="MIC"):
        server.accept(authenticate)


def spec_style_authenticate(challenge: bytes, mic: bytes) -> bytes:
    """An AUTHENTICATE whose NTLMv2 blob announces a MIC (MsvAvFlags 2), built with impacket's helpers."""
    server_challenge = challenge[24:32]
    response_key = impacket_ntlm.NTOWFv2("User", "Password", "Domain")
    blob = (b"\x01\x01" + bytes(6) + bytes(8) + b"\xaa" * 8 + bytes(4)
            + struct.pack("<HHI", 6, 4, 2) + bytes(4) + bytes(4))
    proof = hmac.new(response_key, server_challenge + blob, "md5").digest()
    nt_response = proof + blob
    payload_offset = 88
    domain, user = "Domain".encode("utf-16-le"), "User".encode("utf-16-le")
    offset = payload_offset
    layout = []
    for value in (bytes(24), nt_response, domain, user, b"", b""):
        layout.append(struct.pack("<HHI", len(value), len(value), offset))
        offset += len(value)
    flags = SPEC_FLAGS & ~impacket_ntlm.NTLMSSP_NEGOTIATE_KEY_EXCH
    header = b"NTLMSSP\0" + struct.pack("<I", 3) + b"".join(layout) + struct.pack("<I", flags) + bytes(8) + mic
    assert len(header) == payload_offset
    return header + bytes(24) + nt_response + domain + user


@pytest.mark.parametrize("token", [b"", b"NTLMSSP\0", b"NTLMSSP\0\3\0\0\0" + bytes(60), b"XTLMSSP\0\1\0\0\0" + bytes(8),
                                   b"NTLMSSP\0\3\0\0\0" + struct.pack("<HHI", 100, 100, 9999) + bytes(60)])
def test_malformed_tokens_are_refused(token):
    with pytest.raises(AuthError):
        context().accept(token)


def test_authenticate_with_fields_outside_the_message_is_refused():
    server = context(challenge=SPEC_CHALLENGE)
    server.accept(negotiate(SPEC_FLAGS))
    broken = SPEC_AUTHENTICATE[:20] + struct.pack("<HHI", 0x54, 0x54, 0xFFF0) + SPEC_AUTHENTICATE[28:]
    with pytest.raises(AuthError, match="outside"):
        server.accept(broken)


# -- SPNEGO -------------------------------------------------------------------------------------

def der(tag: int, value: bytes) -> bytes:
    if len(value) < 0x80:
        return bytes((tag, len(value))) + value
    length = len(value).to_bytes(2, "big")
    return bytes((tag, 0x82)) + length + value


KERBEROS_OID = bytes.fromhex("2a864886f712010202")


def neg_token_init(mechs: list[bytes], token: bytes | None) -> tuple[bytes, bytes]:
    """A GSS InitialContextToken with NegTokenInit, and its MechTypeList (what the MICs cover)."""
    mech_list = der(0x30, b"".join(der(0x06, mech) for mech in mechs))
    fields = der(0xA0, mech_list) + (der(0xA2, der(0x04, token)) if token is not None else b"")
    return der(0x60, der(0x06, bytes.fromhex("2b0601050502")) + der(0xA0, der(0x30, fields))), mech_list


def neg_token_resp(token: bytes | None = None, mic: bytes | None = None) -> bytes:
    fields = (der(0xA2, der(0x04, token)) if token is not None else b"") + \
        (der(0xA3, der(0x04, mic)) if mic is not None else b"")
    return der(0xA1, der(0x30, fields))


def parse_resp(token: bytes) -> dict[int, bytes]:
    """The fields of a server NegTokenResp, by tag number (values still DER-wrapped)."""
    assert token[0] == 0xA1
    from fsrvpd.spnego import _fields
    return {tag: token[start:end] for tag, (start, end) in _fields(token, 2 + (token[1] > 0x80) * (token[1] & 0x7F),
                                                                   len(token)).items()}


def challenge_of(answer: dict[int, bytes]) -> bytes:
    wrapped = answer[2]
    return wrapped[2 + (wrapped[1] > 0x80) * (wrapped[1] & 0x7F):]


def test_spnego_negotiates_ntlmssp_and_exchanges_mechlist_mics():
    server = SpnegoContext(context(INTEGRITY))
    negotiate_message = impacket_ntlm.getNTLMSSPType1("", "", signingRequired=True)
    init, mech_list = neg_token_init([NTLMSSP_OID], negotiate_message.getData())
    answer = parse_resp(server.accept(init))
    assert answer[0] == b"\x0a\x01\x01" and answer[1] == der(0x06, NTLMSSP_OID)
    authenticate, session_key = impacket_ntlm.getNTLMSSPType3(negotiate_message, challenge_of(answer), "User",
                                                              "Password", "Domain")
    client = ImpacketPeer(session_key, authenticate["flags"])
    client_mic = client.sign(mech_list)
    client.restart_key_streams()
    final = parse_resp(server.accept(neg_token_resp(authenticate.getData(), client_mic)))
    assert final[0] == b"\x0a\x01\x00"
    assert client.check_server(mech_list, final[3][2:], sealed=False) == mech_list
    assert server.principal.auth_type == AuthType.GSS_NEGOTIATE and server.principal.user == "User"
    # After the MICs the RC4 streams start over but the sequence numbers go on (Samba, MS-SPNG 3.2.5.1).
    client.restart_key_streams()
    assert server.unprotect(b"req", slice(0, 3), client.sign(b"req")) == b"req"
    body, verifier = server.protect(b"rsp", slice(0, 3))
    assert client.check_server(body, verifier, sealed=False) == b"rsp"


def test_spnego_asks_a_kerberos_first_client_for_ntlmssp_and_then_demands_the_mic():
    server = SpnegoContext(context(INTEGRITY))
    init, _ = neg_token_init([KERBEROS_OID, NTLMSSP_OID], b"kerberos AP-REQ")
    answer = parse_resp(server.accept(init))
    assert answer[1] == der(0x06, NTLMSSP_OID) and 2 not in answer
    negotiate_message = impacket_ntlm.getNTLMSSPType1("", "", signingRequired=True)
    answer = parse_resp(server.accept(neg_token_resp(negotiate_message.getData())))
    authenticate, _ = impacket_ntlm.getNTLMSSPType3(negotiate_message, challenge_of(answer), "User", "Password",
                                                    "Domain")
    with pytest.raises(AuthError, match="mechListMIC"):
        server.accept(neg_token_resp(authenticate.getData()))


@pytest.mark.parametrize("token", [b"", b"\x60\x00", b"\x60\x84\xff\xff\xff\xff", b"\x60\x03\x06\x01\x2a",
                                   neg_token_init([KERBEROS_OID], b"x")[0], b"\xa1\x00"])
def test_spnego_refuses_malformed_or_useless_tokens(token):
    with pytest.raises(AuthError):
        SpnegoContext(context()).accept(token)


def test_spnego_elements_may_not_reach_beyond_their_field():
    from fsrvpd.spnego import _octets
    token = b"\x04\x05abcde"
    assert _octets(token, (0, len(token))) == b"abcde"
    with pytest.raises(AuthError, match="past its container"):
        _octets(token, (0, 3))  # the field holds 3 bytes; the OCTET STRING claims 7

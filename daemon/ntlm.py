"""NTLMSSP, server side (MS-NLMP), as a security context for the DCE/RPC layer.

NEGOTIATE -> CHALLENGE -> AUTHENTICATE; NTLMv2 responses only, with extended session security
and 128-bit keys, so every signature is HMAC-MD5 keyed per direction and sealing is RC4 per
direction.  NTLMv1, LM, anonymous and guest logons are refused.

Written here on hashlib/hmac and Cryptodome's ARC4 (pycryptodomex, which impacket already pulls
in) rather than on impacket.ntlm: impacket's module is a client -- it builds NEGOTIATE and
AUTHENTICATE but never checks one, verifies no MIC, and its structure classes raise whatever
the byte layout provokes on a malformed token.  A server parses attacker-controlled tokens, so
every field here is read bounds-checked and every defect becomes one AuthError.

Checking a response needs the password's NT hash: `Accounts.nt_hash` is that seam.
`NtHashAccounts` has configured NT hashes (the embedded front door); the Samba front door reads
them from Samba's account database (samba.SambaPassdbAccounts).
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import secrets
import struct
from typing import Callable, Mapping

from Cryptodome.Cipher import ARC4

from .rpcauth import AuthError, AuthLevel, AuthType, Principal, SecurityContext

SIGNATURE = b"NTLMSSP\x00"
NEGOTIATE, CHALLENGE, AUTHENTICATE = 1, 2, 3

# NegotiateFlags (MS-NLMP 2.2.2.5)
NEGOTIATE_UNICODE = 0x00000001
REQUEST_TARGET = 0x00000004
NEGOTIATE_SIGN = 0x00000010
NEGOTIATE_SEAL = 0x00000020
NEGOTIATE_NTLM = 0x00000200
NEGOTIATE_ALWAYS_SIGN = 0x00008000
TARGET_TYPE_SERVER = 0x00020000
NEGOTIATE_EXTENDED_SESSIONSECURITY = 0x00080000
NEGOTIATE_TARGET_INFO = 0x00800000
NEGOTIATE_VERSION = 0x02000000
NEGOTIATE_128 = 0x20000000
NEGOTIATE_KEY_EXCH = 0x40000000
NEGOTIATE_56 = 0x80000000

# What fsrvpd insists on: Unicode strings, NTLMv2 session security, 128-bit keys.
REQUIRED_FLAGS = NEGOTIATE_UNICODE | NEGOTIATE_EXTENDED_SESSIONSECURITY | NEGOTIATE_128
# Flags granted when the client asks for them.
OPTIONAL_FLAGS = NEGOTIATE_SIGN | NEGOTIATE_SEAL | NEGOTIATE_KEY_EXCH | NEGOTIATE_56
ALWAYS_GRANTED = NEGOTIATE_NTLM | NEGOTIATE_ALWAYS_SIGN | NEGOTIATE_TARGET_INFO | NEGOTIATE_VERSION

# AV pair ids (MS-NLMP 2.2.2.1)
AV_EOL, AV_NB_COMPUTER, AV_NB_DOMAIN, AV_DNS_COMPUTER, AV_DNS_DOMAIN = 0, 1, 2, 3, 4
AV_FLAGS, AV_TIMESTAMP = 6, 7
AV_FLAG_MIC_PRESENT = 0x00000002

VERSION = struct.pack("<BBHBBBB", 6, 1, 0, 0, 0, 0, 15)  # Windows 7 numbering, NTLMSSP revision 15
MIC_OFFSET, MIC_SIZE = 72, 16
NTLMV2_MIN_RESPONSE = 16 + 28  # NTProofStr, then the fixed part of the client blob
_FILETIME_OF_UNIX_EPOCH = 116_444_736_000_000_000
_FIELD = struct.Struct("<HHI")  # length, maximum length, offset
_AUTHENTICATE_FIXED = 64  # everything before the optional version and MIC

_CLIENT_SIGN = b"session key to client-to-server signing key magic constant\x00"
_SERVER_SIGN = b"session key to server-to-client signing key magic constant\x00"
_CLIENT_SEAL = b"session key to client-to-server sealing key magic constant\x00"
_SERVER_SEAL = b"session key to server-to-client sealing key magic constant\x00"
_MAX_SEQUENCE = 0xFFFFFFFF


def _hmac_md5(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.md5).digest()


def ntowfv2(nt_hash: bytes, user: str, domain: str) -> bytes:
    """NTOWFv2 (MS-NLMP 3.3.2): the response key of an NTLMv2 logon."""
    return _hmac_md5(nt_hash, (user.upper() + domain).encode("utf-16-le"))


def ntlmv2_session_base_key(response_key: bytes, server_challenge: bytes, nt_response: bytes) -> bytes | None:
    """The SessionBaseKey if `nt_response` answers `server_challenge` for `response_key`, else None."""
    proof, blob = nt_response[:16], nt_response[16:]
    expected = _hmac_md5(response_key, server_challenge + blob)
    if not hmac.compare_digest(proof, expected):
        return None
    return _hmac_md5(response_key, proof)


class Accounts(abc.ABC):
    """Who may log on, and the check of their NTLMv2 responses."""

    @abc.abstractmethod
    def nt_hash(self, user: str) -> tuple[str, bytes] | None:
        """(the account's own name, its NT hash) for an account that may log on, else None."""

    def check_ntlmv2(self, user: str, domain: str, server_challenge: bytes,
                     nt_response: bytes) -> tuple[str, bytes] | None:
        """(the account's own name, SessionBaseKey) if the response proves the password, else None."""
        account = self.nt_hash(user)
        if account is None:
            return None
        name, nt_hash = account
        # The client hashes the domain as it was typed; Samba also accepts its upper case and none.
        for typed_domain in dict.fromkeys((domain, domain.upper(), "")):
            key = ntlmv2_session_base_key(ntowfv2(nt_hash, user, typed_domain), server_challenge, nt_response)
            if key is not None:
                return name, key
        return None


class NtHashAccounts(Accounts):
    """Accounts with their NT hashes at hand, matched case-insensitively as Windows does."""

    def __init__(self, nt_hashes: Mapping[str, str]) -> None:
        self._accounts = {user.casefold(): (user, bytes.fromhex(nt_hash)) for user, nt_hash in nt_hashes.items()}

    def nt_hash(self, user):
        return self._accounts.get(user.casefold())


class _Token:
    """Bounds-checked reads of one NTLMSSP message."""

    def __init__(self, data: bytes, expected_type: int) -> None:
        if len(data) < 12 or data[:8] != SIGNATURE:
            raise AuthError("not an NTLMSSP message")
        message_type = struct.unpack_from("<I", data, 8)[0]
        if message_type != expected_type:
            raise AuthError(f"NTLMSSP message type {message_type} where {expected_type} was expected")
        self.data = data

    def u32(self, offset: int) -> int:
        if offset + 4 > len(self.data):
            raise AuthError("NTLMSSP message too short")
        return struct.unpack_from("<I", self.data, offset)[0]

    def field(self, offset: int, name: str) -> bytes:
        """A payload field described by (length, maximum length, offset) at `offset`."""
        if offset + _FIELD.size > len(self.data):
            raise AuthError("NTLMSSP message too short")
        length, _maximum, start = _FIELD.unpack_from(self.data, offset)
        if length and (start < offset + _FIELD.size or start + length > len(self.data)):
            raise AuthError(f"NTLMSSP {name} lies outside the message")
        return self.data[start:start + length]

    def text(self, offset: int, name: str) -> str:
        raw = self.field(offset, name)
        try:
            return raw.decode("utf-16-le")
        except UnicodeDecodeError:
            raise AuthError(f"NTLMSSP {name} is not UTF-16") from None


def _av_pairs(data: bytes) -> dict[int, bytes]:
    """AV pairs up to MsvAvEOL; a list that runs past its data is refused."""
    pairs: dict[int, bytes] = {}
    offset = 0
    while True:
        if offset + 4 > len(data):
            raise AuthError("AV pair list without MsvAvEOL")
        av_id, length = struct.unpack_from("<HH", data, offset)
        if av_id == AV_EOL:
            return pairs
        value = data[offset + 4:offset + 4 + length]
        if len(value) != length:
            raise AuthError("AV pair runs past the response")
        pairs.setdefault(av_id, value)
        offset += 4 + length


def _encode_av_pairs(pairs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("<HH", av_id, len(value)) + value for av_id, value in pairs) + bytes(4)


class _Direction:
    """Signing and sealing state of one direction: keys, RC4 key stream, sequence number."""

    def __init__(self, session_key: bytes, sign_magic: bytes, seal_magic: bytes, key_exchange: bool) -> None:
        self._sign_key = hashlib.md5(session_key + sign_magic).digest()
        self._seal_key = hashlib.md5(session_key + seal_magic).digest()
        self._key_exchange = key_exchange
        self.sequence = 0
        self.reset_cipher()

    def reset_cipher(self) -> None:
        """Start the RC4 key stream over (MS-SPNG 3.2.5.1: after SPNEGO's mechListMIC)."""
        self._rc4 = ARC4.new(self._seal_key)

    def crypt(self, data: bytes) -> bytes:
        return self._rc4.encrypt(data)

    def signature(self, message: bytes) -> bytes:
        """MS-NLMP 3.4.4.2: version 1, HMAC-MD5 checksum (RC4'd with key exchange), sequence number."""
        if self.sequence > _MAX_SEQUENCE:
            raise AuthError("NTLMSSP sequence numbers exhausted")
        sequence = struct.pack("<I", self.sequence)
        self.sequence += 1
        checksum = _hmac_md5(self._sign_key, sequence + message)[:8]
        if self._key_exchange:
            checksum = self.crypt(checksum)
        return struct.pack("<I", 1) + checksum + sequence

    def check(self, message: bytes, signature: bytes) -> None:
        """The client's signature must be the next one in sequence, over exactly this message."""
        if not hmac.compare_digest(self.signature(message), signature):
            raise AuthError("bad NTLMSSP signature or sequence number")


class NtlmContext(SecurityContext):
    """One connection's NTLMSSP context (auth_type WINNT, or the mechanism inside SPNEGO)."""

    auth_type = AuthType.WINNT

    def __init__(self, level: AuthLevel, accounts: Accounts, domain: str, server_name: str,
                 clock: Callable[[], float], dns_name: str | None = None,
                 challenge_source: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.level = level
        self._accounts = accounts
        self._domain = domain
        self._server_name = server_name
        self._dns_name = dns_name or server_name.lower()
        self._clock = clock
        self._challenge_source = challenge_source
        self._negotiate: bytes | None = None
        self._challenge: bytes | None = None
        self._offered = 0
        self._principal: Principal | None = None
        self._mic_used = False
        self._inbound: _Direction | None = None
        self._outbound: _Direction | None = None

    @property
    def principal(self) -> Principal | None:
        return self._principal

    @property
    def mic_used(self) -> bool:
        """The client protected the handshake with a MIC: SPNEGO must then exchange mechListMICs."""
        return self._mic_used

    # -- handshake ----------------------------------------------------------------------------
    def accept(self, token: bytes) -> bytes:
        if self._negotiate is None:
            return self._answer_negotiate(token)
        if self._principal is None and self._inbound is None:
            self._accept_authenticate(token)
            return b""
        raise AuthError("NTLMSSP handshake already finished")

    def _answer_negotiate(self, token: bytes) -> bytes:
        flags = _Token(token, NEGOTIATE).u32(12)
        missing = REQUIRED_FLAGS & ~flags
        if missing:
            raise AuthError(f"client does not offer NTLMv2 session security with 128-bit keys "
                            f"(missing flags {missing:#010x})")
        self._offered = REQUIRED_FLAGS | ALWAYS_GRANTED | (flags & OPTIONAL_FLAGS)
        if flags & REQUEST_TARGET:
            self._offered |= REQUEST_TARGET | TARGET_TYPE_SERVER
        self._negotiate = token
        self._challenge = self._challenge_message(self._challenge_source(8))
        return self._challenge

    def _challenge_message(self, server_challenge: bytes) -> bytes:
        target_name = self._server_name.encode("utf-16-le")
        timestamp = int(self._clock() * 10_000_000) + _FILETIME_OF_UNIX_EPOCH
        target_info = _encode_av_pairs([
            (AV_NB_DOMAIN, self._domain.encode("utf-16-le")),
            (AV_NB_COMPUTER, self._server_name.encode("utf-16-le")),
            (AV_DNS_DOMAIN, self._domain.lower().encode("utf-16-le")),
            (AV_DNS_COMPUTER, self._dns_name.encode("utf-16-le")),
            (AV_TIMESTAMP, struct.pack("<Q", timestamp)),  # announces that clients should send a MIC
        ])
        header_size = 56
        return (SIGNATURE + struct.pack("<I", CHALLENGE)
                + _FIELD.pack(len(target_name), len(target_name), header_size)
                + struct.pack("<I", self._offered) + server_challenge + bytes(8)
                + _FIELD.pack(len(target_info), len(target_info), header_size + len(target_name))
                + VERSION + target_name + target_info)

    def _accept_authenticate(self, token: bytes) -> None:
        message = _Token(token, AUTHENTICATE)
        nt_response = message.field(20, "NtChallengeResponse")
        domain = message.text(28, "DomainName")
        user = message.text(36, "UserName")
        encrypted_key = message.field(52, "EncryptedRandomSessionKey")
        flags = self._offered & message.u32(60)
        if not user:
            raise AuthError("anonymous logon refused")
        if len(nt_response) < NTLMV2_MIN_RESPONSE:
            raise AuthError(f"{domain}\\{user}: NTLMv1 or LM response refused, NTLMv2 required")
        self._require_flags(flags, user)
        server_challenge = self._challenge[24:32]
        checked = self._accounts.check_ntlmv2(user, domain, server_challenge, nt_response)
        if checked is None:
            raise AuthError(f"{domain}\\{user}: unknown user or wrong password")
        account, session_base_key = checked
        exported_key = session_base_key
        if flags & NEGOTIATE_KEY_EXCH:
            if len(encrypted_key) != 16:
                raise AuthError("key exchange without a 16-byte EncryptedRandomSessionKey")
            exported_key = ARC4.new(session_base_key).encrypt(encrypted_key)
        self._check_mic(message, nt_response, exported_key)
        key_exchange = bool(flags & NEGOTIATE_KEY_EXCH)
        self._inbound = _Direction(exported_key, _CLIENT_SIGN, _CLIENT_SEAL, key_exchange)
        self._outbound = _Direction(exported_key, _SERVER_SIGN, _SERVER_SEAL, key_exchange)
        self._principal = Principal(account, self._domain, self.auth_type, self.level)

    def _require_flags(self, flags: int, user: str) -> None:
        needed = REQUIRED_FLAGS | NEGOTIATE_SIGN
        if self.level == AuthLevel.PKT_PRIVACY:
            needed |= NEGOTIATE_SEAL
        if needed & ~flags:
            raise AuthError(f"{user}: the negotiated NTLMSSP flags lack {needed & ~flags:#010x} "
                            f"needed at level {self.level.name}")

    def _check_mic(self, message: _Token, nt_response: bytes, exported_key: bytes) -> None:
        """MS-NLMP 3.2.5.1.2: a client whose response announces a MIC must have sent the right one."""
        flags = _av_pairs(nt_response[NTLMV2_MIN_RESPONSE:]).get(AV_FLAGS, bytes(4))
        if len(flags) != 4 or not struct.unpack("<I", flags)[0] & AV_FLAG_MIC_PRESENT:
            return
        data = message.data
        if len(data) < MIC_OFFSET + MIC_SIZE:
            raise AuthError("MIC announced but missing")
        mic = data[MIC_OFFSET:MIC_OFFSET + MIC_SIZE]
        zeroed = data[:MIC_OFFSET] + bytes(MIC_SIZE) + data[MIC_OFFSET + MIC_SIZE:]
        expected = _hmac_md5(exported_key, self._negotiate + self._challenge + zeroed)
        if not hmac.compare_digest(mic, expected):
            raise AuthError("bad MIC: the NTLMSSP handshake was altered")
        self._mic_used = True

    # -- per-PDU protection -------------------------------------------------------------------
    def _directions(self) -> tuple[_Direction, _Direction]:
        if self._inbound is None or self._outbound is None:
            raise AuthError("NTLMSSP handshake not finished")
        return self._inbound, self._outbound

    def protect(self, message: bytes, body: slice) -> tuple[bytes, bytes]:
        _, outbound = self._directions()
        if self.level == AuthLevel.PKT_PRIVACY:
            sealed = outbound.crypt(message[body])  # the key stream seals the body, then the checksum
            return sealed, outbound.signature(message)
        return message[body], outbound.signature(message)

    def unprotect(self, message: bytes, body: slice, verifier: bytes) -> bytes:
        inbound, _ = self._directions()
        if self.level == AuthLevel.PKT_PRIVACY:
            plain = inbound.crypt(message[body])
            inbound.check(message[:body.start] + plain + message[body.stop:], verifier)
            return plain
        inbound.check(message, verifier)
        return message[body]

    # -- GSS_GetMIC / GSS_VerifyMIC for SPNEGO ---------------------------------------------------
    def sign_mic(self, data: bytes) -> bytes:
        """Our mechListMIC; the RC4 key stream is rewound afterwards (MS-SPNG 3.2.5.1)."""
        _, outbound = self._directions()
        signature = outbound.signature(data)
        outbound.reset_cipher()
        return signature

    def verify_mic(self, data: bytes, mic: bytes) -> None:
        inbound, _ = self._directions()
        inbound.check(data, mic)
        inbound.reset_cipher()

"""The client end of NTLMSSP session security, on impacket's signing and sealing functions.

impacket's DCE/RPC client never checks a server's verifiers; tests use this peer to check ours
with an implementation that is not fsrvpd's.
"""

from __future__ import annotations

from Cryptodome.Cipher import ARC4
from impacket import ntlm as impacket_ntlm


class ImpacketPeer:
    """impacket's NTLM signing and sealing, client side."""

    def __init__(self, session_key: bytes, flags: int) -> None:
        self.flags = flags
        self.sign_key = impacket_ntlm.SIGNKEY(flags, session_key)
        self.seal_key = impacket_ntlm.SEALKEY(flags, session_key)
        self.server_sign_key = impacket_ntlm.SIGNKEY(flags, session_key, b"Server")
        self.server_seal_key = impacket_ntlm.SEALKEY(flags, session_key, b"Server")
        self.restart_key_streams()
        self.sequence = 0
        self.server_sequence = 0

    def restart_key_streams(self) -> None:
        self.handle = ARC4.new(self.seal_key).encrypt
        self.server_handle = ARC4.new(self.server_seal_key).encrypt

    def sign(self, message: bytes) -> bytes:
        signature = impacket_ntlm.SIGN(self.flags, self.sign_key, message, self.sequence, self.handle)
        self.sequence += 1
        return signature.getData()

    def seal(self, message: bytes, body: slice | None = None) -> tuple[bytes, bytes]:
        """The sealed `body` of `message` (all of it by default) and the signature over the plain message."""
        body = body or slice(0, len(message))
        sealed, signature = impacket_ntlm.SEAL(self.flags, self.sign_key, self.seal_key, message, message[body],
                                               self.sequence, self.handle)
        self.sequence += 1
        return sealed, signature.getData()

    def check_server(self, message: bytes, signature: bytes, sealed: bool, body: slice | None = None) -> bytes:
        """Check the server's next signature over `message` (unsealing `body` first); the plain body."""
        body = body or slice(0, len(message))
        plain = self.server_handle(message[body]) if sealed else message[body]
        expected = impacket_ntlm.MAC(self.flags, self.server_handle, self.server_sign_key, self.server_sequence,
                                     message[:body.start] + plain + message[body.stop:])
        self.server_sequence += 1
        assert expected.getData() == signature
        return plain

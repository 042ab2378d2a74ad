"""The seam between the DCE/RPC PDU layer and the security providers that authenticate a connection.

MS-FSRVP (3.1.4) wants callers authenticated by the RPC layer itself (NTLM, Kerberos or Negotiate)
at packet integrity or privacy.  The PDU layer (dcerpc.py) knows where tokens and verifiers sit
in a PDU; a `SecurityContext` knows what they mean.  The PDU layer hands each context the bytes
of one security leg (`accept`) and, once it is complete, every request and response PDU to check
or protect (`unprotect`, `protect`).  Contexts are pure like the PDU layer: no sockets, threads
or clocks of their own (a clock, where a provider needs one, is passed in).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from typing import Callable, Mapping


class AuthType(enum.IntEnum):
    """auth_type of the sec_trailer (MS-RPCE 2.2.1.1.7); the ones fsrvpd may be asked for."""

    NONE = 0
    GSS_NEGOTIATE = 9  # SPNEGO
    WINNT = 10  # NTLMSSP
    GSS_KERBEROS = 16


class AuthLevel(enum.IntEnum):
    """auth_level of the sec_trailer (MS-RPCE 2.2.1.1.8)."""

    NONE = 1
    CONNECT = 2
    CALL = 3
    PKT = 4
    PKT_INTEGRITY = 5
    PKT_PRIVACY = 6


# The levels a context protects PDUs at.  CONNECT and CALL protect no PDU at all: a client that
# wants no protection binds without credentials, which the daemon's policy then judges.
PROTECTED_LEVELS = frozenset({AuthLevel.PKT, AuthLevel.PKT_INTEGRITY, AuthLevel.PKT_PRIVACY})


class AuthError(Exception):
    """A security leg or a protected PDU was refused; the text says why, for the log only."""


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who the RPC layer authenticated, and how strongly their PDUs are protected."""

    user: str
    domain: str
    auth_type: AuthType
    level: AuthLevel

    def __str__(self) -> str:
        return f"{self.domain}\\{self.user} ({self.auth_type.name.lower()}, {self.level.name.lower()})"


class SecurityContext(abc.ABC):
    """One connection's security context, built leg by leg and then used on every PDU."""

    auth_type: AuthType
    level: AuthLevel
    verifier_size = 16
    signs_header = True  # the verifier covers the whole PDU, header and sec_trailer included

    @abc.abstractmethod
    def accept(self, token: bytes) -> bytes:
        """Process the client's token of one leg; the token for the client (possibly empty).

        Raises AuthError if the client cannot be authenticated."""

    @property
    @abc.abstractmethod
    def principal(self) -> Principal | None:
        """The authenticated client once the last leg succeeded, else None."""

    @abc.abstractmethod
    def protect(self, message: bytes, body: slice) -> tuple[bytes, bytes]:
        """Sign (and at privacy level seal) an outgoing PDU.

        `message` is the PDU up to, not including, its verifier, with the body in plain text;
        returns the body as it goes on the wire and the verifier."""

    @abc.abstractmethod
    def unprotect(self, message: bytes, body: slice, verifier: bytes) -> bytes:
        """Check (and at privacy level unseal) an incoming PDU; its plain-text body.

        `message` is the PDU up to its verifier as received.  Raises AuthError on a bad verifier
        or an out-of-sequence PDU; the context is then unusable."""


# A provider makes a fresh context for a bind at the level the client asked for.
SecurityProvider = Callable[[AuthLevel], SecurityContext]
SecurityProviders = Mapping[int, SecurityProvider]

"""Who may drive fsrvpd: Windows' rule (Administrators, Backup Operators) plus the config.

fsrvpd snapshots, clones and deletes storage as root, so every FSRVP call checks the caller, as
Windows does.  A caller is a member when its token holds BUILTIN\\Administrators or
BUILTIN\\Backup Operators, or a SID listed in `authorization.allow` (a user or a group), or its
account -- as the SMB session or the RPC layer authenticated it -- is listed by name (`account` or
`DOMAIN\\account`).  `authorization.clients` further limits callers to some IP networks, for
every call.  `authorization.open_queries` opens the three read-only queries to any authenticated
caller; state changes are never opened wider.

Behind Samba the caller's SIDs come from smbd's session token; the embedded front door has no
tokens, and there every user in its configuration is allowed (they exist only to drive fsrvpd).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, NamedTuple

from . import messages as m
from .transports.base import Caller

ADMINISTRATORS = "S-1-5-32-544"
BACKUP_OPERATORS = "S-1-5-32-551"
ALWAYS_ALLOWED_SIDS = frozenset({ADMINISTRATORS, BACKUP_OPERATORS})
SID = re.compile(r"^S-1-\d+(-\d+)+$", re.IGNORECASE)
READ_ONLY_REQUESTS = (m.GetSupportedVersionRequest, m.IsPathSupportedRequest, m.IsPathShadowCopiedRequest)


def is_sid(text: str) -> bool:
    return SID.match(text) is not None


def changes_state(request) -> bool:
    return not isinstance(request, READ_ONLY_REQUESTS)


class Decision(NamedTuple):
    allowed: bool
    why: str


class Authorizer:
    """Decides, call by call, whether a caller may make it; `decide` says why, for the audit log."""

    def __init__(self, allowed: Iterable[str] = (), clients: Iterable[str] = (), open_queries: bool = False):
        """`allowed`: SIDs (users or groups) and account names, `account` or `DOMAIN\\account`;
        `clients`: IP networks callers must come from (empty: any)."""
        allowed = list(allowed)
        self.sids = ALWAYS_ALLOWED_SIDS | {entry.upper() for entry in allowed if is_sid(entry)}
        self.names = {entry.casefold() for entry in allowed if not is_sid(entry)}
        self.clients = [ipaddress.ip_network(network, strict=False) for network in clients]
        self.open_queries = open_queries

    def decide(self, caller: Caller, request) -> Decision:
        if self.clients and not self._from_allowed_network(caller.address):
            return Decision(False, f"client address {caller.address} is outside authorization.clients")
        if self.open_queries and not changes_state(request):
            return Decision(True, "read-only query (authorization.open_queries)")
        if self.allows(caller):
            return Decision(True, "member of an allowed group or listed")
        return Decision(False, "not in Administrators, Backup Operators or authorization.allow")

    def allows(self, caller: Caller) -> bool:
        """Membership alone: the built-in groups, listed SIDs, or a listed account name."""
        if not self.sids.isdisjoint(sid.upper() for sid in caller.sids):
            return True
        return not self.names.isdisjoint(_account_names(caller))

    def _from_allowed_network(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            return False
        return any(ip in network for network in self.clients)


def _account_names(caller: Caller) -> set[str]:
    """The caller's account as the SMB session and the RPC layer name it, bare and with its domain."""
    accounts = [(caller.user, caller.domain)]
    if caller.rpc_principal is not None:
        accounts.append((caller.rpc_principal.user, caller.rpc_principal.domain))
    return {name.casefold() for user, domain in accounts if user for name in (user, f"{domain}\\{user}")}

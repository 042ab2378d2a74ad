"""Who may change shadow copies: Windows' rule (Administrators, Backup Operators) plus the config.

fsrvpd snapshots, clones and deletes storage as root, so every state-changing FSRVP call checks
the caller; the three read-only queries do not.  A caller is allowed when its token holds
BUILTIN\\Administrators or BUILTIN\\Backup Operators, or a SID listed in the configuration (a
user or a group), or its account is listed by name (`account` or `DOMAIN\\account`).

Behind Samba the caller's SIDs come from smbd's session token; the embedded front door has no
tokens, and there every user in its configuration is allowed (they exist only to drive fsrvpd).
"""

from __future__ import annotations

import re
from typing import Iterable

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


class Authorizer:
    """Decides whether a caller may make state-changing calls."""

    def __init__(self, allowed: Iterable[str] = ()):
        """`allowed`: SIDs (users or groups) and account names, `account` or `DOMAIN\\account`."""
        allowed = list(allowed)
        self.sids = ALWAYS_ALLOWED_SIDS | {entry.upper() for entry in allowed if is_sid(entry)}
        self.names = {entry.casefold() for entry in allowed if not is_sid(entry)}

    def allows(self, caller: Caller) -> bool:
        if not self.sids.isdisjoint(sid.upper() for sid in caller.sids):
            return True
        names = {caller.user.casefold(), f"{caller.domain}\\{caller.user}".casefold()} if caller.user else set()
        return not self.names.isdisjoint(names)

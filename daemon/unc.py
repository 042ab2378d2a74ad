r"""UNC share paths as FSRVP clients send them (`\\server\share` or `\\server\share\`).

A request's path is only ever compared with our own names; it is never resolved or connected to,
so a path naming another host (the ShadowCoerce attack) is refused before anything happens.
"""

from __future__ import annotations

import dataclasses
import re

MAX_UNC_CHARS = 1024
# Host: a NetBIOS/DNS name or an IPv4/IPv6 literal; nothing that could mean a device or long path.
HOST = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,255}$")
SHARE = re.compile(r"^[^\x00-\x1f\"\\/\[\]:|<>+=;,*?]{1,80}$")


class BadUnc(ValueError):
    """The path is malformed, or names a host that is not this server."""


@dataclasses.dataclass(frozen=True)
class Unc:
    host: str
    share: str


def parse_unc(path: str, own_host_names: set[str]) -> Unc:
    r"""Split `\\host\share[\]` and check that host is one of ours (casefolded names)."""
    if not path or len(path) > MAX_UNC_CHARS or "\x00" in path:
        raise BadUnc("empty, too long or containing NUL")
    if not path.startswith("\\\\") or path.startswith(("\\\\?\\", "\\\\.\\")):
        raise BadUnc(f"{path!r} is not a plain \\\\server\\share path")
    parts = path[2:].split("\\")
    if len(parts) == 3 and parts[2] == "":
        parts = parts[:2]
    if len(parts) != 2:
        raise BadUnc(f"{path!r} must name a share, not a directory inside one")
    host, share = parts
    if not HOST.fullmatch(host) or not SHARE.fullmatch(share) or share in (".", ".."):
        raise BadUnc(f"{path!r} has an invalid host or share name")
    if host.strip("[]").casefold() not in own_host_names:
        raise BadUnc(f"{host!r} is not this server")
    return Unc(host=host, share=share)

"""This host's own names and addresses, read locally: a UNC may name the server by any of them.

Nothing here resolves a name a client sent; it only lists what this machine calls itself, so the
comparison in unc.py never leaves the host (ShadowCoerce).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFADDR = 0x8915
IF_INET6 = "/proc/net/if_inet6"


def host_names_and_addresses() -> set[str]:
    """Host name, FQDN and every IPv4/IPv6 address configured on an interface."""
    names = {socket.gethostname(), socket.getfqdn()}
    return names | _ipv4_addresses() | _ipv6_addresses()


def _ipv4_addresses() -> set[str]:
    addresses = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, interface in socket.if_nameindex():
            request = struct.pack("256s", interface.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on this interface
                continue
            addresses.add(socket.inet_ntoa(answer[20:24]))
    return addresses


def _ipv6_addresses() -> set[str]:
    try:
        with open(IF_INET6) as table:
            return {str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))) for line in table if line.strip()}
    except OSError:  # IPv6 disabled
        return set()

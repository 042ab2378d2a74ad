"""The server's own names come from this machine, never from resolving what a client sent."""

import socket

from fsrvpd.hostnames import host_names_and_addresses


def test_own_names_include_host_name_loopback_and_interface_addresses():
    names = host_names_and_addresses()
    assert socket.gethostname() in names
    assert "127.0.0.1" in names
    assert all(name for name in names)

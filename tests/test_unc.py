r"""UNC share paths from FSRVP requests: only `\\<one of our names>\<share>[\]` gets through.

The path is never resolved or connected to, so refusing every other host and every other shape
(devices, directories, odd characters) is what keeps ShadowCoerce-style requests harmless.
"""

import pytest

from fsrvpd.config import parse
from fsrvpd.unc import MAX_UNC_CHARS, BadUnc, Unc, parse_unc

# As Config.own_host_names() gives them: casefolded.
OWN = {"fsrvpd", "fsrvpd.example.com", "192.0.2.10", "fd00::5", "localhost", "127.0.0.1", "::1"}

ACCEPTED = {
    "plain": (r"\\fsrvpd\vms", "fsrvpd", "vms"),
    "trailing backslash": (r"\\fsrvpd\vms" "\\", "fsrvpd", "vms"),
    "host in upper case": (r"\\FSRVPD\vms", "FSRVPD", "vms"),
    "share case kept": (r"\\fsrvpd\VMs", "fsrvpd", "VMs"),
    "fqdn in mixed case": (r"\\FSRVPD.Example.COM\vms", "FSRVPD.Example.COM", "vms"),
    "ipv4 literal": (r"\\192.0.2.10\vms", "192.0.2.10", "vms"),
    "ipv6 literal": (r"\\[fd00::5]\vms", "[fd00::5]", "vms"),
    "ipv6 literal in upper case": (r"\\[FD00::5]\vms" "\\", "[FD00::5]", "vms"),
    "ipv6 loopback": (r"\\[::1]\vms", "[::1]", "vms"),
    "share with space": (r"\\localhost\Virtual Machines", "localhost", "Virtual Machines"),
}


@pytest.mark.parametrize("path, host, share", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted(path, host, share):
    """Our own names, in any case, with or without the trailing backslash clients send."""
    assert parse_unc(path, OWN) == Unc(host=host, share=share)


FOREIGN = {
    "other host": r"\\attacker\vms",
    "other fqdn": r"\\fsrvpd.example.com.evil.net\vms",
    "other ipv4": r"\\10.0.0.66\vms",
    "other ipv6": r"\\[fd00::6]\vms",
}


@pytest.mark.parametrize("path", FOREIGN.values(), ids=FOREIGN.keys())
def test_foreign_host_refused(path):
    """A share on another host is never ours to snapshot or to connect to (ShadowCoerce)."""
    with pytest.raises(BadUnc, match="is not this server"):
        parse_unc(path, OWN)


MALFORMED = {
    "empty": "",
    "no share": r"\\fsrvpd",
    "no share, trailing backslash": r"\\fsrvpd" "\\",
    "no host": r"\\" "\\vms",
    "one leading backslash": r"\fsrvpd\vms",
    "no leading backslash": r"fsrvpd\vms",
    "directory below the share": r"\\fsrvpd\vms\disks",
    "directory below, trailing backslash": r"\\fsrvpd\vms\disks" "\\",
    "empty component": r"\\fsrvpd" "\\\\vms",
    "two trailing backslashes": r"\\fsrvpd\vms" "\\\\",
    "long-path device prefix": r"\\?\C:\vms",
    "long-path unc prefix": r"\\?\UNC\fsrvpd\vms",
    "device namespace": r"\\.\pipe\FssagentRpc",
    "device namespace share": r"\\.\vms",
    "forward slashes": "//fsrvpd/vms",
    "forward slash before share": r"\\fsrvpd/vms",
    "forward slash in share": r"\\fsrvpd\vms/disks",
    "NUL in share": "\\\\fsrvpd\\vms\x00",
    "NUL in host": "\\\\fsrvpd\x00\\vms",
    "overlong path": r"\\fsrvpd" "\\" + "v" * MAX_UNC_CHARS,
    "overlong share name": r"\\fsrvpd" "\\" + "v" * 81,
    "overlong host name": "\\\\" + "h" * 256 + r"\vms",
    "share .": r"\\fsrvpd\.",
    "share ..": r"\\fsrvpd\..",
    "space in host": r"\\fs rvpd\vms",
    "ipv6 zone in host": r"\\fe80::1%eth0\vms",
    "newline after share": "\\\\fsrvpd\\vms\n",
    "tab in share": "\\\\fsrvpd\\v\tms",
    **{f"share with {char!r}": rf"\\fsrvpd\v{char}ms" for char in '"[]:|<>+=;,*?'},
}


@pytest.mark.parametrize("path", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_refused(path):
    r"""Anything but a plain \\host\share is refused, whatever host it names."""
    with pytest.raises(BadUnc):
        parse_unc(path, OWN)


def test_configured_names_are_accepted():
    """The names Config.own_host_names() produces are the ones parse_unc matches against."""
    config = parse("server:\n  netbios_name: fs1\n  aliases: [FileServer]\nfront_door:\n  listen: FD00::5\n")
    for host in ("FS1", "fileserver", "[fd00::5]"):
        assert parse_unc(rf"\\{host}\vms", config.own_host_names()).host == host

"""The pure parts of the Samba front door: authorization, smb.conf text, config keys, PDU framing.
The e2e module (test_e2e_samba.py) runs all of them against a real smbd."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsrvpd import messages as m
from fsrvpd.authz import Authorizer, changes_state
from fsrvpd.config import ConfigError, load, parse
from fsrvpd.samba import (OWNER_PARAMETER, SambaError, base_shares, owned_shares, parse_smb_conf, render_share,
                          snapshot_share_parameters)
from fsrvpd.state import exposed_share_name, is_exposed_share_name
from fsrvpd.transports.base import Caller
from fsrvpd.transports.samba import _client_address, _pdus

USER_SID = "S-1-5-21-1-2-3-1105"
GROUP_SID = "S-1-5-21-1-2-3-2001"


def caller(user="alice", domain="CORP", sids=()):
    return Caller(user=user, domain=domain, address="192.0.2.10", sids=frozenset(sids))


def test_builtin_groups_listed_sids_and_listed_names_are_allowed():
    authorizer = Authorizer([GROUP_SID, "corp\\Bob", "carol"])
    assert authorizer.allows(caller(sids=[USER_SID, "S-1-5-32-544"]))
    assert authorizer.allows(caller(sids=[USER_SID, "S-1-5-32-551"]))
    assert authorizer.allows(caller(sids=[USER_SID, GROUP_SID.lower()]))
    assert authorizer.allows(caller(user="bob"))
    assert authorizer.allows(caller(user="Carol", domain="OTHER"))
    assert not authorizer.allows(caller(user="bob", domain="OTHER"))
    assert not authorizer.allows(caller(sids=[USER_SID, "S-1-1-0", "S-1-5-11"]))
    assert not Authorizer().allows(caller(user="", domain=""))


def test_only_the_three_queries_are_read_only():
    assert not changes_state(m.GetSupportedVersionRequest())
    read_only = {name for name in dir(m) if name.endswith("Request")
                 and not changes_state(getattr(m, name).__new__(getattr(m, name)))}
    assert read_only == {"GetSupportedVersionRequest", "IsPathSupportedRequest", "IsPathShadowCopiedRequest"}


SMB_CONF = """
# Global parameters
[global]
\tworkgroup = CORP
[vms]
\tpath = /tank/vms
\tread only = No
\twrite list = @writers
\tvfs objects = zfsacl
\tComment = Hyper-V
[printers]
\tpath = /var/spool/samba
\tprintable = Yes
[vms@{3f2a7c1e-9d4b-4e8a-8f00-000000000001}]
\tpath = /var/lib/fsrvpd/mnt/x
\tfsrvpd:base = vms
[nopath]
\tcomment = no path
"""


def test_smb_conf_sections_base_shares_and_owned_shares():
    sections = parse_smb_conf(SMB_CONF)
    assert sections["vms"]["comment"] == "Hyper-V" and sections["global"]["workgroup"] == "CORP"
    assert list(base_shares(sections)) == ["vms"]
    assert owned_shares(sections) == {"vms@{3f2a7c1e-9d4b-4e8a-8f00-000000000001}": "vms"}


def test_snapshot_share_copies_the_base_share_but_not_its_writability():
    base = parse_smb_conf(SMB_CONF)["vms"]
    params = snapshot_share_parameters(base, "/mnt/copy", read_only=True, base_name="vms")
    assert params == {"vfs objects": "zfsacl", "path": "/mnt/copy", "read only": "yes",
                      "comment": "Shadow copy of vms", OWNER_PARAMETER: "vms"}
    assert snapshot_share_parameters(base, "/mnt/copy", read_only=False, base_name="vms")["read only"] == "no"
    assert render_share("a@{x}", {"path": "/p"}) == "[a@{x}]\n\tpath = /p\n"
    with pytest.raises(SambaError):
        render_share("a", {"comment": "two\nlines"})


def test_exposed_share_names_are_recognised():
    name = exposed_share_name("data$", __import__("uuid").UUID("3f2a7c1e-9d4b-4e8a-8f00-000000000001"))
    assert is_exposed_share_name(name) and is_exposed_share_name(name.upper())
    assert not is_exposed_share_name("vms") and not is_exposed_share_name("vms@{not-a-guid}")


def test_samba_mode_configuration():
    config = parse("front_door: {mode: samba, smb_conf: /etc/samba/smb.conf}\n"
                   "authorization: {allow: ['CORP\\backup-svc', S-1-5-21-1-2-3-2001]}\n"
                   "shares: {vms: {dataset: tank/vms}}\n")
    assert config.front_door == "samba" and config.allowed == ("CORP\\backup-svc", "S-1-5-21-1-2-3-2001")
    assert config.share("VMS").path is None and config.share("vms").store == "tank/vms"
    with pytest.raises(ConfigError, match=r"<config>:1: shares.vms.path: comes from Samba"):
        parse("shares: {vms: {path: /tank/vms}}\nfront_door: {mode: samba}\n")
    with pytest.raises(ConfigError, match="users belong to Samba"):
        parse("front_door: {mode: samba}\nusers: {backup: {nt_hash: 00000000000000000000000000000000}}\n")


def test_pdus_are_split_for_message_mode_and_addresses_unmapped():
    pdu = lambda size: bytes(8) + size.to_bytes(2, "little") + bytes(size - 10)  # noqa: E731
    assert [len(p) for p in _pdus(pdu(24) + pdu(40) + b"tail")] == [24, 40, 4]
    assert _client_address("::ffff:192.0.2.7") == "192.0.2.7" and _client_address("fd00::7") == "fd00::7"


def test_samba_example_configuration_parses():
    example = load(str(Path(__file__).parents[1] / "etc" / "fsrvpd-samba.example.yaml"))
    assert example.front_door == "samba" and example.share("vms").store == "tank/vms"

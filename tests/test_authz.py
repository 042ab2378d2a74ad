"""Authorization decisions: groups and listed accounts, client networks, open queries -- and the
audit line every call leaves, checked on a real daemon."""

from __future__ import annotations

import pytest

from fsrvpd import messages as m
from fsrvpd.authz import BACKUP_OPERATORS, Authorizer
from fsrvpd.client import FsrvpError
from fsrvpd.constants import HResult
from fsrvpd.rpcauth import AuthLevel, AuthType, Principal
from fsrvpd.transports.base import Caller

QUERY = m.GetSupportedVersionRequest()
CHANGE = m.SetContextRequest(0)


def caller(user="alice", domain="CORP", address="192.0.2.7", sids=(), principal=None):
    return Caller(user, domain, address, frozenset(sids), principal)


@pytest.mark.parametrize("request_", [QUERY, CHANGE], ids=["query", "state change"])
def test_members_pass_and_others_do_not_by_default(request_):
    authorizer = Authorizer(["corp\\bob"])
    assert authorizer.decide(caller(sids=[BACKUP_OPERATORS]), request_).allowed
    assert authorizer.decide(caller(user="bob"), request_).allowed
    assert not authorizer.decide(caller(user="mallory"), request_).allowed


def test_the_rpc_principal_counts_as_the_account():
    principal = Principal("bob", "CORP", AuthType.WINNT, AuthLevel.PKT_INTEGRITY)
    assert Authorizer(["bob"]).decide(caller(user="", domain="", principal=principal), CHANGE).allowed


def test_open_queries_open_only_the_read_only_queries():
    authorizer = Authorizer(open_queries=True)
    assert authorizer.decide(caller(), QUERY).allowed
    assert not authorizer.decide(caller(), CHANGE).allowed


def test_client_networks_limit_every_call_even_for_members():
    authorizer = Authorizer(clients=["10.0.0.0/8", "2001:db8::/32"], open_queries=True)
    member = [BACKUP_OPERATORS]
    assert authorizer.decide(caller(address="10.1.2.3", sids=member), CHANGE).allowed
    assert authorizer.decide(caller(address="2001:db8::5"), QUERY).allowed
    refused = authorizer.decide(caller(address="192.0.2.7", sids=member), QUERY)
    assert not refused.allowed and "192.0.2.7" in refused.why


@pytest.mark.zfs
def test_daemon_refuses_callers_outside_the_allowed_networks_and_audits_each_call(zfs_pool, tmp_path,
                                                                                samba_clients):
    from tests.support.daemon import FsrvpDaemon

    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    daemon.config["authorization"] = {"clients": ["10.0.0.0/8"]}
    daemon.start()
    try:
        with daemon.client() as client:
            with pytest.raises(FsrvpError) as refused:
                client.get_supported_version()
            assert refused.value.result == HResult.E_ACCESSDENIED
        assert "GetSupportedVersion by" in daemon.log() and "authz=denied (client address 127.0.0.1" in daemon.log()
        daemon.stop()
        daemon.config["authorization"] = {"clients": ["127.0.0.0/8"]}
        daemon.start()
        with daemon.client() as client:
            assert client.get_supported_version() == (1, 1)
        assert "authz=allowed" in daemon.log() and "result=0x00000000" in daemon.log()
    finally:
        daemon.stop()


@pytest.mark.parametrize("setting, key", [("clients: [not-a-network]", "authorization.clients"),
                                          ("open_queries: maybe", "authorization.open_queries")])
def test_bad_authorization_settings_name_line_and_key(setting, key):
    from fsrvpd.config import ConfigError, parse

    with pytest.raises(ConfigError) as error:
        parse(f"authorization:\n  {setting}\n", "f.yaml")
    assert str(error.value).startswith(f"f.yaml:2: {key}:")

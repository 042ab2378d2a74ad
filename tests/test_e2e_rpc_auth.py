"""RPC-level authentication against a real fsrvpd process: Samba's rpcclient signing and sealing
with NTLMSSP and with SPNEGO, our own client at each level, and callers below the configured
minimum level refused with E_ACCESSDENIED (MS-FSRVP 3.1.4)."""

from __future__ import annotations

import re

import pytest
from impacket.dcerpc.v5 import rpcrt

from fsrvpd.client import FsrvpError
from fsrvpd.constants import HResult
from tests.support.daemon import FsrvpDaemon, ours_on_storage

pytestmark = [pytest.mark.zfs, pytest.mark.samba_client]

GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
EXPOSED = re.compile(rf"^({GUID})\(({GUID})\): share \S+ exposed as a snapshot of \\\\[^\\]+\\vms", re.MULTILINE)
NO_KERBEROS = ("--use-kerberos=off",)  # no KDC here: SPNEGO must settle on NTLMSSP at once
ACCESS_DENIED = "0x80070005"


def authenticated_cycle(daemon: FsrvpDaemon, binding: str) -> None:
    """fss_create_expose then fss_delete over `binding`; nothing of ours is left on the pool."""
    output = daemon.rpcclient("fss_create_expose backup ro vms", binding=binding, options=NO_KERBEROS)
    exposed = EXPOSED.search(output)
    assert exposed, output + daemon.log()
    set_id, copy_id = exposed.groups()
    assert "shadow-copy deleted" in daemon.rpcclient(f"fss_delete vms {set_id} {copy_id}", binding=binding,
                                                     options=NO_KERBEROS)
    assert daemon.removals_done() and ours_on_storage(daemon.pool) == []


@pytest.mark.parametrize("binding, principal", [
    ("ncacn_np:127.0.0.1[sign]", "(winnt, pkt_integrity)"),
    ("ncacn_np:127.0.0.1[seal]", "(winnt, pkt_privacy)"),
    ("ncacn_np:127.0.0.1[sign,spnego]", "(gss_negotiate, pkt_integrity)"),
    ("ncacn_np:127.0.0.1[seal,spnego]", "(gss_negotiate, pkt_privacy)"),
], ids=["ntlm-sign", "ntlm-seal", "spnego-sign", "spnego-seal"])
def test_rpcclient_signing_and_sealing_run_a_backup_cycle(daemon, binding, principal):
    authenticated_cycle(daemon, binding)
    assert f"RPC authentication of WORKGROUP\\backup {principal}" in daemon.log()


def test_unauthenticated_rpcclient_is_denied_at_the_default_level(daemon):
    for command in ("fss_get_sup_version", "fss_create_expose backup ro vms"):
        output = daemon.rpcclient(command, binding="127.0.0.1")
        assert ACCESS_DENIED in output or "ACCESS_DENIED" in output, output
    assert ours_on_storage(daemon.pool) == []
    assert "below rpc.min_auth_level integrity" in daemon.log()


@pytest.mark.parametrize("level", [rpcrt.RPC_C_AUTHN_LEVEL_PKT_INTEGRITY, rpcrt.RPC_C_AUTHN_LEVEL_PKT_PRIVACY],
                         ids=["integrity", "privacy"])
def test_our_client_runs_a_cycle_at_each_level(daemon, level):
    with daemon.client(rpc_auth_level=level) as client:
        mapping, = client.backup_cycle(["vms"])
        client.delete_share_mapping(mapping.set_id, mapping.copy_id, "vms")
    assert daemon.removals_done() and ours_on_storage(daemon.pool) == []


def test_our_client_without_rpc_authentication_is_denied(daemon):
    with daemon.client(rpc_auth_level=None) as client:
        with pytest.raises(FsrvpError) as denied:
            client.set_context(0)
        assert denied.value.result == HResult.E_ACCESSDENIED
        with pytest.raises(FsrvpError):
            client.get_supported_version()


@pytest.fixture
def daemon_at(zfs_pool, tmp_path, samba_clients):
    """A daemon whose rpc.min_auth_level the test chooses."""
    started = []

    def start(level: str) -> FsrvpDaemon:
        running = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
        running.config["rpc"] = {"min_auth_level": level}
        started.append(running.start())
        return running

    yield start
    for running in started:
        running.stop()


def test_level_none_serves_unauthenticated_binds_as_samba_does(daemon_at):
    daemon = daemon_at("none")
    authenticated_cycle(daemon, "ncacn_np:127.0.0.1")
    with daemon.client(rpc_auth_level=None) as client:
        assert client.get_supported_version() == (1, 1)


def test_level_privacy_denies_signing_only(daemon_at):
    daemon = daemon_at("privacy")
    assert ACCESS_DENIED in daemon.rpcclient("fss_get_sup_version", binding="ncacn_np:127.0.0.1[sign]")
    authenticated_cycle(daemon, "ncacn_np:127.0.0.1[seal]")
    with daemon.client(rpc_auth_level=rpcrt.RPC_C_AUTHN_LEVEL_PKT_INTEGRITY) as client:
        with pytest.raises(FsrvpError) as denied:
            client.get_supported_version()
        assert denied.value.result == HResult.E_ACCESSDENIED

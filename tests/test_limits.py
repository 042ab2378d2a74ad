"""Limits that keep one client from exhausting the daemon: shares per set, fragment and request
sizes, string lengths, connections and calls per second per client.  Each is configurable
(`limits:` in the YAML), has a safe default and fails with a clear answer.

Pure parts first (configuration, the per-client counters, the state machine), then a real daemon
with tight limits driven by impacket's SMB client and our FSRVP client."""

from __future__ import annotations

import struct
import time
import uuid

import pytest
from impacket.smbconnection import SMBConnection

from fsrvpd import config as fsrvpd_config
from fsrvpd import dcerpc
from fsrvpd.client import FsrvpError, RpcFault
from fsrvpd.constants import FSRVP_INTERFACE_UUID, HResult
from fsrvpd.rpcauth import AuthLevel
from fsrvpd.rpcserver import ClientLimits
from fsrvpd.state import Refused, ShadowCopyMachine
from tests.fuzz.targets import RPCCLIENT_BIND
from tests.support.daemon import PASSWORD, USER, FsrvpDaemon, RawPipe


def test_defaults_are_the_safe_ones():
    parsed = fsrvpd_config.parse("logging: {level: info}\n")
    assert parsed.min_auth_level == AuthLevel.PKT_INTEGRITY
    assert parsed.limits == fsrvpd_config.Limits(max_shares_per_set=64, max_fragment_bytes=4280,
                                                  max_request_bytes=65536, max_string_chars=1024,
                                                  max_connections_per_client=16, max_calls_per_second=50)


def test_every_limit_is_configurable():
    parsed = fsrvpd_config.parse("rpc: {min_auth_level: privacy}\nlimits:\n  max_shares_per_set: 2\n"
                                 "  max_fragment_bytes: 2048\n  max_request_bytes: 8192\n  max_string_chars: 300\n"
                                 "  max_connections_per_client: 3\n  max_calls_per_second: 2.5\n")
    assert parsed.min_auth_level == AuthLevel.PKT_PRIVACY
    assert parsed.limits == fsrvpd_config.Limits(2, 2048, 8192, 300, 3, 2.5)


@pytest.mark.parametrize("text, message", [
    ("rpc: {min_auth_level: connect}", "rpc.min_auth_level: 'connect' is not one of none, integrity, privacy"),
    ("limits: {max_shares_per_set: 0}", "limits.max_shares_per_set: 0 is outside 1..512"),
    ("limits: {max_fragment_bytes: 1000}", "limits.max_fragment_bytes: 1000 is outside 1432..65535"),
    ("limits: {max_calls_per_second: lots}", "limits.max_calls_per_second: 'lots' is not a number"),
    ("limits: {max_connections: 3}", "limits.max_connections: is not a known setting"),
])
def test_bad_limits_are_named_by_line_and_key(text, message):
    with pytest.raises(fsrvpd_config.ConfigError) as error:
        fsrvpd_config.parse(text, "fsrvpd.yaml")
    assert str(error.value) == f"fsrvpd.yaml:1: {message}"


def test_connections_per_client_are_counted_per_address():
    limits = ClientLimits(max_connections=2, calls_per_second=10)
    assert limits.open("10.0.0.1") and limits.open("10.0.0.1") and not limits.open("10.0.0.1")
    assert limits.open("10.0.0.2")
    limits.close("10.0.0.1")
    assert limits.open("10.0.0.1")


def test_call_rate_allows_a_burst_then_the_rate():
    now = [100.0]
    limits = ClientLimits(max_connections=1, calls_per_second=4, clock=lambda: now[0])
    assert [limits.allow_call("a") for _ in range(5)] == [True] * 4 + [False]
    assert limits.allow_call("b")  # another client has its own bucket
    now[0] += 0.5
    assert [limits.allow_call("a") for _ in range(3)] == [True, True, False]


def test_reconnecting_does_not_refill_the_call_rate():
    now = [100.0]
    limits = ClientLimits(max_connections=1, calls_per_second=2, clock=lambda: now[0])
    assert limits.open("a") and limits.allow_call("a") and limits.allow_call("a")
    limits.close("a")
    assert limits.open("a") and not limits.allow_call("a")
    limits.close("a")
    now[0] += 5
    assert limits.open("a")  # refilled meanwhile: the idle bucket is forgotten, a full one starts
    assert limits._buckets == {}


def test_shares_per_set_limit():
    machine = ShadowCopyMachine(max_shares_per_set=2)
    machine.set_context(0, "client", 0.0)
    scs = machine.start_set(uuid.uuid4(), "client", "user", 0.0)
    for name in ("a", "b"):
        machine.add(scs.set_id, uuid.uuid4(), name, f"\\\\s\\{name}", {"backend": "zfs", "name": name}, 0.0)
    with pytest.raises(Refused) as refused:
        machine.add(scs.set_id, uuid.uuid4(), "c", "\\\\s\\c", {"backend": "zfs", "name": "c"}, 0.0)
    assert refused.value.result == HResult.E_INVALIDARG and "limits.max_shares_per_set" in refused.value.why


def test_a_connection_over_the_limit_gets_bind_nak_local_limit_exceeded():
    connection = dcerpc.ServerConnection({FSRVP_INTERFACE_UUID: (1, 0)},
                                         refuse_binds=dcerpc.BindNakReason.LOCAL_LIMIT_EXCEEDED)
    events = connection.receive_data(RPCCLIENT_BIND)
    answer = connection.data_to_send()
    assert answer[2] == 13 and struct.unpack_from("<H", answer, 16)[0] == 2
    assert connection.closed and isinstance(events[0], dcerpc.ConnectionClosed)


# -- a real daemon with tight limits --------------------------------------------------------------

ADMISSION_SECONDS = 10.0  # how long a new connection may be refused while an old one is still counted
TIGHT = {"max_shares_per_set": 1, "max_fragment_bytes": 2048, "max_request_bytes": 4096, "max_string_chars": 300,
         "max_connections_per_client": 2, "max_calls_per_second": 5}


@pytest.fixture
def tight(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path)
    daemon.config["limits"] = dict(TIGHT)
    with daemon.start():
        yield daemon


def raw_pipe_once_admitted(daemon) -> RawPipe:
    """A pipe on a new connection.  Right after a client closed its connection the daemon may
    still count it (it sees the close a moment later) and refuse a new one at the limit: retry."""
    deadline = time.monotonic() + ADMISSION_SECONDS
    while True:
        try:
            return RawPipe(daemon.port)
        except Exception:  # impacket's "No answer!": closed at once, over the limit
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def smb_session(daemon) -> SMBConnection:
    smb = SMBConnection("127.0.0.1", "127.0.0.1", sess_port=daemon.port, timeout=10)
    smb.login(USER, PASSWORD)
    return smb


@pytest.mark.zfs
def test_smb_connections_over_the_limit_are_closed(tight):
    first, second = smb_session(tight), smb_session(tight)
    with pytest.raises(Exception, match="No answer"):  # impacket's words for a connection closed at once
        smb_session(tight)
    assert "limits.max_connections_per_client" in tight.log()
    first.close()
    time.sleep(0.5)
    smb_session(tight).close()
    second.close()


@pytest.mark.zfs
def test_pipes_over_the_limit_get_bind_nak(tight):
    smb = smb_session(tight)
    pipes = [RawPipe(tight.port, smb) for _ in range(3)]
    for pipe in pipes:
        pipe.write(RPCCLIENT_BIND)
    answers = [pipe.answers(limit=1)[0] for pipe in pipes]
    assert [answer[2] for answer in answers] == [12, 12, 13]  # bind_ack, bind_ack, bind_nak
    assert struct.unpack_from("<H", answers[2], 16)[0] == 2  # local_limit_exceeded
    smb.close()


@pytest.mark.zfs
def test_calls_over_the_rate_get_server_too_busy(tight):
    with tight.client() as client:
        statuses = []
        for _ in range(12):
            try:
                client.get_supported_version()
                statuses.append(0)
            except RpcFault as fault:
                statuses.append(fault.status)
        assert statuses[:5] == [0] * 5 and dcerpc.RPC_S_SERVER_TOO_BUSY in statuses
        time.sleep(1.2)
        assert client.get_supported_version() == (1, 1)  # the same connection goes on


@pytest.mark.zfs
def test_request_size_string_and_share_limits(tight):
    with tight.client() as client:
        client.set_context(0)
        set_id = client.start_shadow_copy_set()
        client.add_to_shadow_copy_set(set_id, "vms")
        with pytest.raises(FsrvpError) as too_many:
            client.add_to_shadow_copy_set(set_id, "sql")
        assert too_many.value.result == HResult.E_INVALIDARG
        client.abort(set_id)
        time.sleep(1.2)  # five calls so far: let the rate limit refill
        with pytest.raises(RpcFault) as long_string:
            client.is_path_supported("\\\\FSRVPTEST\\" + "v" * 400)
        assert long_string.value.status == dcerpc.NCA_S_FAULT_NDR
    pipe = raw_pipe_once_admitted(tight)
    pipe.write(RPCCLIENT_BIND)
    pipe.answers(limit=1)
    first_fragment = struct.pack("<BBBB4sHHI", 5, 0, 0, 1, b"\x10\0\0\0", 1024, 0, 2) + struct.pack("<IHH", 5000, 0, 8)
    pipe.write(first_fragment + bytes(1024 - len(first_fragment)))
    fault, = pipe.answers()
    assert fault[2] == 3 and struct.unpack_from("<I", fault, 24)[0] == dcerpc.RPC_S_ACCESS_DENIED
    assert "request exceeds 4096 bytes" in tight.log()
    assert tight.alive()


@pytest.mark.zfs
def test_fragments_larger_than_the_limit_are_refused(tight):
    pipe = RawPipe(tight.port)
    pipe.write(RPCCLIENT_BIND)
    ack, = pipe.answers(limit=1)
    assert struct.unpack_from("<HH", ack, 16) == (2048, 2048)
    oversized = struct.pack("<BBBB4sHHI", 5, 0, 0, 3, b"\x10\0\0\0", 3000, 0, 2) + struct.pack("<IHH", 2976, 0, 0)
    pipe.write(oversized + bytes(3000 - len(oversized)))
    fault, = pipe.answers()
    assert fault[2] == 3 and struct.unpack_from("<I", fault, 24)[0] == dcerpc.NCA_S_PROTO_ERROR
    pipe.smb.close()

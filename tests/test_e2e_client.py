"""The same daemon driven by our own FSRVP client: the full cycle with every field checked, every
kind of bad input, garbage on the pipe, restarts, the Message Sequence Timer and client retries.

Each test runs a real fsrvpd process on a fresh zfs-fuse pool (fixture `daemon`).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import uuid

import pytest

from fsrvpd import messages as m
from fsrvpd.client import FsrvpError, RpcFault
from fsrvpd.constants import ATTR_AUTO_RECOVERY, Context, HResult
from fsrvpd.dcerpc import NCA_S_FAULT_NDR, NCA_S_OP_RNG_ERROR
from tests.support.daemon import NETBIOS_NAME, FsrvpDaemon, RawPipe, ours_after_cleanup, ours_on_storage

pytestmark = pytest.mark.zfs

NULL = uuid.UUID(int=0)
UNC_VMS = f"\\\\{NETBIOS_NAME}\\vms\\"
H = HResult


def result_of(client, request) -> H:
    return H(client.call(request).result)


def exposed_set(client, *shares: str, context: int = 0):
    """SetContext..Expose; the set id and the copy ids, in share order."""
    client.set_context(context)
    set_id = client.start_shadow_copy_set()
    copy_ids = [client.add_to_shadow_copy_set(set_id, share) for share in shares]
    client.prepare(set_id)
    client.commit(set_id)
    client.expose(set_id)
    return set_id, copy_ids


def test_backup_cycle_fields_and_cleanup(daemon):
    with daemon.client() as client:
        assert client.get_supported_version() == (1, 1)
        assert client.is_path_supported("vms") == (True, NETBIOS_NAME)
        assert client.is_path_shadow_copied("vms") == (False, 0)
        before = time.time()
        mappings = client.backup_cycle(["vms", "sql"], auto_recovery=True)
        for share, mapping in zip(("vms", "sql"), mappings):
            assert mapping.share_name_unc == f"\\\\{NETBIOS_NAME}\\{share}\\"
            assert mapping.shadow_copy_share_name == f"\\\\{NETBIOS_NAME}\\{share}@{{{mapping.copy_id}}}"
            assert before - 2 <= m.unix_from_filetime(mapping.creation_timestamp) <= time.time() + 2
        set_id = mappings[0].set_id
        assert client.is_path_shadow_copied("vms") == (True, 0)
        client.recovery_complete(set_id)
        for share, mapping in zip(("vms", "sql"), mappings):
            client.delete_share_mapping(set_id, mapping.copy_id, share)
        assert client.is_path_shadow_copied("vms") == (False, 0)
    assert ours_after_cleanup(daemon.pool) == []


def test_bad_input_gets_the_spec_error_codes_and_the_daemon_keeps_serving(daemon):
    wrong = uuid.uuid4()
    with daemon.client() as client:
        assert result_of(client, m.StartShadowCopySetRequest(uuid.uuid4())) == H.FSRVP_E_BAD_STATE  # no context
        assert result_of(client, m.SetContextRequest(0x5)) == H.FSRVP_E_UNSUPPORTED_CONTEXT
        assert result_of(client, m.SetContextRequest(ATTR_AUTO_RECOVERY | 0x2)) == H.FSRVP_E_UNSUPPORTED_CONTEXT
        client.set_context(0)
        assert result_of(client, m.StartShadowCopySetRequest(NULL)) == H.E_INVALIDARG
        set_id = client.start_shadow_copy_set()
        refusals = {
            m.AddToShadowCopySetRequest(uuid.uuid4(), set_id, f"\\\\{NETBIOS_NAME}\\nosuchshare"): H.FSRVP_E_OBJECT_NOT_FOUND,
            m.AddToShadowCopySetRequest(uuid.uuid4(), set_id, ""): H.E_INVALIDARG,
            m.AddToShadowCopySetRequest(uuid.uuid4(), set_id, "vms"): H.E_INVALIDARG,
            m.AddToShadowCopySetRequest(uuid.uuid4(), set_id, f"\\\\{NETBIOS_NAME}\\vms\\dir"): H.E_INVALIDARG,
            m.AddToShadowCopySetRequest(NULL, set_id, UNC_VMS): H.E_INVALIDARG,
            m.AddToShadowCopySetRequest(uuid.uuid4(), NULL, UNC_VMS): H.E_INVALIDARG,
            m.AddToShadowCopySetRequest(uuid.uuid4(), wrong, UNC_VMS): H.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH,
            m.PrepareShadowCopySetRequest(set_id, 1000): H.FSRVP_E_BAD_STATE,  # nothing added yet
            m.CommitShadowCopySetRequest(set_id, 1000): H.FSRVP_E_BAD_STATE,
            m.ExposeShadowCopySetRequest(set_id, 1000): H.FSRVP_E_BAD_STATE,
            m.RecoveryCompleteShadowCopySetRequest(set_id): H.FSRVP_E_BAD_STATE,
            m.CommitShadowCopySetRequest(wrong, 1000): H.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH,
            m.AbortShadowCopySetRequest(NULL): H.E_INVALIDARG,
            m.GetShareMappingRequest(wrong, set_id, UNC_VMS, 2): H.E_INVALIDARG,
            m.GetShareMappingRequest(wrong, set_id, UNC_VMS, 1): H.FSRVP_E_BAD_STATE,
            m.DeleteShareMappingRequest(wrong, wrong, UNC_VMS): H.FSRVP_E_OBJECT_NOT_FOUND,
            m.IsPathSupportedRequest(f"\\\\{NETBIOS_NAME}\\nosuchshare"): H.FSRVP_E_OBJECT_NOT_FOUND,
            m.IsPathShadowCopiedRequest(""): H.E_INVALIDARG,
            m.StartShadowCopySetRequest(uuid.uuid4()): H.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS,
        }
        for request, expected in refusals.items():
            assert result_of(client, request) == expected, request
        copy_id = client.add_to_shadow_copy_set(set_id, "vms")
        assert result_of(client, m.AddToShadowCopySetRequest(uuid.uuid4(), set_id, UNC_VMS)) == \
            H.FSRVP_E_OBJECT_ALREADY_EXISTS
        client.commit(set_id)
        client.expose(set_id)
        assert result_of(client, m.GetShareMappingRequest(wrong, set_id, UNC_VMS, 1)) == H.E_INVALIDARG
        assert result_of(client, m.DeleteShareMappingRequest(set_id, copy_id, f"\\\\{NETBIOS_NAME}\\sql")) == \
            H.FSRVP_E_OBJECT_NOT_FOUND
        client.abort(set_id)
    assert ours_after_cleanup(daemon.pool) == []
    with daemon.client() as client:
        assert client.get_supported_version() == (1, 1)


# Share paths a ShadowCoerce-style caller might send: other hosts by name, IP literal (in every
# spelling), device and long-path prefixes, WebDAV forms, overlong names, path traversal.
COERCING_PATHS = [
    "\\\\attacker\\share", "\\\\attacker.example\\vms\\", "\\\\127.0.0.2\\vms", "\\\\127.0.0.2\\vms\\",
    "\\\\10.0.0.1\\vms", "\\\\[::ffff:127.0.0.2]\\vms", "\\\\2130706434\\vms", "\\\\0x7f000002\\vms",
    "\\\\127.0.0.2@445\\vms", "\\\\127.0.0.2@SSL@80\\vms", "\\\\attacker@80\\DavWWWRoot\\vms",
    "\\\\?\\UNC\\127.0.0.2\\vms", f"\\\\?\\UNC\\{NETBIOS_NAME}\\vms", "\\\\.\\UNC\\127.0.0.2\\vms",
    "\\\\?\\C:\\", "//127.0.0.2/vms", "\\\\127.0.0.2/vms", f"\\\\{NETBIOS_NAME}\\vms\\..\\..\\127.0.0.2\\vms",
    f"\\\\{NETBIOS_NAME}\\..", f"\\\\{NETBIOS_NAME}\\.", f"\\\\{NETBIOS_NAME}\\vms/..",
    f"\\\\{NETBIOS_NAME}\\vms/../sql", f"\\\\{NETBIOS_NAME}\\..\\vms", f"\\\\{NETBIOS_NAME}/vms",
    "\\\\" + "a" * 300 + "\\vms", f"\\\\{NETBIOS_NAME}\\" + "v" * 100, "\\\\" + "x." * 500 + "\\vms",
]


def ndr_string(text: str) -> bytes:
    """A [string] wchar_t* exactly as given, embedded NULs included (our encoder refuses those)."""
    units = text.encode("utf-16-le") + b"\0\0"
    return struct.pack("<III", len(units) // 2, 0, len(units) // 2) + units + bytes(-len(units) % 4)


class ListenerOnAnotherHost:
    """TCP listeners on 127.0.0.2 (SMB, NetBIOS, WebDAV ports) recording every connection."""

    PORTS = (445, 139, 80)

    def __init__(self) -> None:
        self.connections: list = []
        self._listeners = [socket.create_server(("127.0.0.2", port)) for port in self.PORTS]
        for listener in self._listeners:
            listener.settimeout(0.1)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for listener in self._listeners:
                try:
                    self.connections.append(listener.accept())
                except (TimeoutError, OSError):
                    pass

    def __enter__(self) -> ListenerOnAnotherHost:
        self._watcher.start()
        return self

    def __exit__(self, *exc_info) -> None:
        time.sleep(0.5)  # anything the daemon started connecting would have arrived by now
        self._stop.set()
        self._watcher.join()
        for listener in self._listeners:
            listener.close()


def test_coercing_share_paths_are_refused_without_connecting_anywhere(zfs_pool, tmp_path, samba_clients):
    """ShadowCoerce (CVE-2022-30154): no path in a request may make the server connect anywhere."""
    daemon = FsrvpDaemon(zfs_pool, tmp_path)
    daemon.config["limits"] = {"max_calls_per_second": 10000}  # some 250 calls in a burst
    with daemon.start(), ListenerOnAnotherHost() as listener, daemon.client() as client:
        client.set_context(0)
        set_id = client.start_shadow_copy_set()
        for path in COERCING_PATHS:
            for request in (m.IsPathSupportedRequest(path), m.IsPathShadowCopiedRequest(path),
                            m.AddToShadowCopySetRequest(uuid.uuid4(), set_id, path)):
                try:
                    result = result_of(client, request)
                except RpcFault as fault:  # longer than limits.max_string_chars: refused while decoding
                    assert fault.status == NCA_S_FAULT_NDR and len(path) >= 1024, (path, fault)
                    continue
                assert result in (H.E_INVALIDARG, H.FSRVP_E_OBJECT_NOT_FOUND), (path, request, result)
        for opnum, path in ((m.Opnum.IsPathSupported, f"\\\\{NETBIOS_NAME}\\vms\0\\\\127.0.0.2\\vms"),
                            (m.Opnum.IsPathShadowCopied, "\\\\127.0.0.2\\vms\0")):
            with pytest.raises(RpcFault) as embedded_nul:
                client.raw_rpc_call(int(opnum), ndr_string(path))
            assert embedded_nul.value.status == NCA_S_FAULT_NDR
        client.abort(set_id)
        assert client.is_path_supported("vms") == (True, NETBIOS_NAME)  # still serving
    assert listener.connections == []
    assert ours_on_storage(daemon.pool) == []


def test_shares_that_are_not_a_dataset_root_are_not_supported(zfs_pool, tmp_path, samba_clients):
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",))
    subdirectory = os.path.join(daemon.paths["vms"], "inside")
    os.mkdir(subdirectory)
    zfs_pool.dataset("vms/child")
    daemon.config["shares"]["inside"] = {"path": subdirectory}
    daemon.start()
    try:
        with daemon.client() as client:
            for share in ("inside", "vms"):  # a plain directory; a dataset with one below it
                assert result_of(client, m.IsPathSupportedRequest(client.unc(share))) == H.FSRVP_E_NOT_SUPPORTED
    finally:
        daemon.stop()


def pipe_answers(daemon, garbage: bytes) -> list[bytes]:
    """Write raw bytes on a fresh FssagentRpc pipe; what comes back until the daemon closes it."""
    pipe = RawPipe(daemon.port)
    pipe.write(garbage)
    answers = pipe.answers()
    pipe.smb.close()
    return answers


@pytest.mark.parametrize("garbage", [os.urandom(2000), b"\x05\x00\x0b\x03" + os.urandom(2000), b"\x05\x00\x00\x03"
                                     + b"\x10\x00\x00\x00\x20\x00\x00\x00" + os.urandom(24)],
                         ids=["random", "broken-bind", "request-before-bind"])
def test_garbage_on_the_pipe_costs_only_that_connection(daemon, garbage):
    answers = pipe_answers(daemon, garbage)
    assert len(answers) <= 1  # at most one bind_nak or fault, then the connection is closed
    assert all(answer[:2] == b"\x05\x00" and answer[2] in (3, 13) for answer in answers), answers
    with daemon.client() as client:
        with pytest.raises(RpcFault) as unknown_opnum:
            client.raw_rpc_call(42, b"")
        assert unknown_opnum.value.status == NCA_S_OP_RNG_ERROR
        with pytest.raises(RpcFault) as bad_stub:
            client.raw_rpc_call(int(m.Opnum.AddToShadowCopySet), b"\x01\x02\x03")
        assert bad_stub.value.status == NCA_S_FAULT_NDR
        assert client.get_supported_version() == (1, 1)  # the same connection goes on
    assert daemon.alive()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["clean-stop", "crash"])
def test_restarted_daemon_reloads_its_sets_and_republishes_their_shares(daemon, stop_signal):
    with open(os.path.join(daemon.paths["vms"], "f"), "w") as handle:
        handle.write("as committed\n")
    with daemon.client() as client:
        set_id, (copy_id,) = exposed_set(client, "vms")
    daemon.stop(stop_signal)
    daemon.start()
    assert "as committed" in daemon.smbclient(f"vms@{{{copy_id}}}", "get f -")
    with daemon.client() as client:
        assert client.get_share_mapping(set_id, copy_id, "vms").copy_id == copy_id
        client.recovery_complete(set_id)
        client.delete_share_mapping(set_id, copy_id, "vms")
    assert ours_after_cleanup(daemon.pool) == []


@pytest.mark.parametrize("context", [Context.BACKUP, Context.NAS_ROLLBACK], ids=["backup", "persistent"])
def test_sequence_timer_removes_an_abandoned_set_with_its_snapshots(zfs_pool, tmp_path, samba_clients, context):
    """A persistent context does not save a set that was never recovered (MS-FSRVP 3.1.5)."""
    daemon = FsrvpDaemon(zfs_pool, tmp_path, shares=("vms",), sequence_seconds=2, sequence_long_seconds=4).start()
    try:
        with daemon.client() as client:
            set_id, (copy_id,) = exposed_set(client, "vms", context=context)
            assert ours_on_storage(zfs_pool)
            assert ours_after_cleanup(zfs_pool) == []  # the timer fires after 2 s
            with pytest.raises(FsrvpError) as gone:
                client.get_share_mapping(set_id, copy_id, "vms")
            assert gone.value.result == H.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH
            assert "NT_STATUS_BAD_NETWORK_NAME" in daemon.smbclient(f"vms@{{{copy_id}}}", "ls")
            exposed_set(client, "vms")  # the context was released: a new backup can start
    finally:
        daemon.stop()


def test_client_starting_over_drops_its_unfinished_set(daemon):
    with daemon.client() as client:
        client.set_context(0)
        set_id = client.start_shadow_copy_set()
        client.add_to_shadow_copy_set(set_id, "vms")
        client.commit(set_id)
        assert ours_on_storage(daemon.pool)
        client.set_context(0)  # the same client retries: the committed set and its snapshot go
        assert ours_after_cleanup(daemon.pool) == []
        with pytest.raises(FsrvpError) as dropped:
            client.expose(set_id)
        assert dropped.value.result == H.FSRVP_E_SHADOWCOPYSET_ID_MISMATCH
        new_set = client.start_shadow_copy_set()
        client.abort(new_set)

"""FsrvpClient without a network: a fake in place of impacket's DCE/RPC object decodes what the
client sends with messages.decode_request and answers with scripted responses."""

from __future__ import annotations

import struct
import uuid
from typing import Callable

import pytest
from impacket.dcerpc.v5 import rpcrt

from fsrvpd import messages as m
from fsrvpd.client import FsrvpClient, FsrvpError, RpcFault
from fsrvpd.constants import ATTR_AUTO_RECOVERY, HResult, Opnum
from fsrvpd.ndr import NdrError

SERVER_SET_ID = uuid.UUID("5e7a0000-0000-4000-8000-000000000001")


class FakeDce:
    """Records every call and answers each request with `answer(request)` (default: success)."""

    def __init__(self, answer: Callable[[object], object] | None = None) -> None:
        self.requests: list[object] = []
        self.raw_calls: list[tuple[int, bytes]] = []
        self.answer = answer or self.succeed
        self._pending: bytes | None = None
        self.disconnected = False

    def call(self, opnum: int, stub: bytes) -> None:
        self.raw_calls.append((opnum, stub))
        request = m.decode_request(opnum, stub)
        self.requests.append(request)
        self._pending = m.encode_response(opnum, self.answer(request))

    def recv(self) -> bytes:
        pending, self._pending = self._pending, None
        return pending

    def disconnect(self) -> None:
        self.disconnected = True

    @staticmethod
    def succeed(request):
        if isinstance(request, m.StartShadowCopySetRequest):
            return m.StartShadowCopySetResponse(0, SERVER_SET_ID)
        if isinstance(request, m.AddToShadowCopySetRequest):
            return m.AddToShadowCopySetResponse(0, uuid.uuid5(SERVER_SET_ID, request.share_name))
        if isinstance(request, m.GetShareMappingRequest):
            return m.GetShareMappingResponse(0, 1, m.ShareMapping1(
                request.set_id, request.copy_id, request.share_name, request.share_name.rstrip("\\") + "@{x}", 1))
        if isinstance(request, m.GetSupportedVersionRequest):
            return m.GetSupportedVersionResponse(0, 1, 1)
        return m.failure_response(request, 0)


def connected(dce: FakeDce, **options) -> FsrvpClient:
    client = FsrvpClient("192.0.2.7", **options)
    client._dce = dce
    return client


def test_plain_share_names_become_uncs_with_the_server_name():
    assert FsrvpClient("192.0.2.7").unc("vms") == "\\\\192.0.2.7\\vms\\"
    assert FsrvpClient("192.0.2.7", server_name="FS1").unc("vms") == "\\\\FS1\\vms\\"
    assert FsrvpClient("192.0.2.7").unc("\\\\other\\vms") == "\\\\other\\vms"


def test_helpers_send_the_stubs_messages_encodes():
    dce = FakeDce()
    client = connected(dce, server_name="FS1")
    copy_id = client.add_to_shadow_copy_set(SERVER_SET_ID, "vms", client_copy_id=uuid.UUID(int=9))
    assert copy_id == uuid.uuid5(SERVER_SET_ID, "\\\\FS1\\vms\\")
    assert dce.raw_calls == [m.encode_request(m.AddToShadowCopySetRequest(uuid.UUID(int=9), SERVER_SET_ID,
                                                                          "\\\\FS1\\vms\\"))]


def test_backup_cycle_runs_the_creation_sequence_and_returns_the_mappings():
    dce = FakeDce()
    mappings = connected(dce, server_name="FS1").backup_cycle(["vms", "db"], context=0x19, auto_recovery=True)
    assert [type(r) for r in dce.requests] == [
        m.SetContextRequest, m.StartShadowCopySetRequest, m.AddToShadowCopySetRequest, m.AddToShadowCopySetRequest,
        m.PrepareShadowCopySetRequest, m.CommitShadowCopySetRequest, m.ExposeShadowCopySetRequest,
        m.GetShareMappingRequest, m.GetShareMappingRequest]
    assert dce.requests[0].context == 0x19 | ATTR_AUTO_RECOVERY
    assert [(r.set_id, r.timeout_ms) for r in dce.requests[4:7]] == [(SERVER_SET_ID, 1_800_000),
                                                                     (SERVER_SET_ID, 60_000), (SERVER_SET_ID, 60_000)]
    assert [mapping.share_name_unc for mapping in mappings] == ["\\\\FS1\\vms\\", "\\\\FS1\\db\\"]
    assert all(mapping.set_id == SERVER_SET_ID for mapping in mappings)


def test_a_failed_step_aborts_the_set_and_raises_the_hresult():
    def refuse_commit(request):
        if isinstance(request, m.CommitShadowCopySetRequest):
            return m.failure_response(request, HResult.FSRVP_E_WAIT_TIMEOUT)
        return FakeDce.succeed(request)

    dce = FakeDce(refuse_commit)
    with pytest.raises(FsrvpError) as raised:
        connected(dce).backup_cycle(["vms"])
    assert raised.value.result == HResult.FSRVP_E_WAIT_TIMEOUT
    assert "FSRVP_E_WAIT_TIMEOUT" in str(raised.value) and raised.value.operation == "CommitShadowCopySet"
    assert dce.requests[-1] == m.AbortShadowCopySetRequest(SERVER_SET_ID)


def test_call_returns_failed_responses_without_raising():
    dce = FakeDce(lambda request: m.failure_response(request, HResult.E_ACCESSDENIED))
    response = connected(dce).call(m.IsPathSupportedRequest("\\\\x\\y"))
    assert response == m.IsPathSupportedResponse(HResult.E_ACCESSDENIED, False, None)


def test_success_without_a_mapping_is_a_malformed_answer():
    dce = FakeDce(lambda request: m.failure_response(request, 0))
    with pytest.raises(NdrError):
        connected(dce).get_share_mapping(SERVER_SET_ID, uuid.UUID(int=1), "vms")


def test_tuple_helpers():
    def answer(request):
        if isinstance(request, m.IsPathSupportedRequest):
            return m.IsPathSupportedResponse(0, True, "FS1")
        return m.IsPathShadowCopiedResponse(0, True, 3)

    client = connected(FakeDce(answer))
    assert client.is_path_supported("vms") == (True, "FS1")
    assert client.is_path_shadow_copied("vms") == (True, 3)


class FaultingDce(FakeDce):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def recv(self) -> bytes:
        raise rpcrt.DCERPCException(self.message)


@pytest.mark.parametrize("message, status", [
    ("rpc_x_bad_stub_data", 0x000006F7),
    ("nca_s_op_rng_error", 0x1C010002),
    ("Unknown DCE RPC fault status code: 8000ffff", 0x8000FFFF),
    ("something else", None),
])
def test_faults_become_rpc_fault_with_the_status(message, status):
    client = connected(FaultingDce(message))
    with pytest.raises(RpcFault) as raised:
        client.raw_rpc_call(Opnum.SetContext, struct.pack("<I", 0))
    assert raised.value.status == status


def test_close_disconnects_once():
    dce = FakeDce()
    client = connected(dce)
    client.close()
    client.close()
    assert dce.disconnected
    with pytest.raises(RuntimeError):
        client.get_supported_version()

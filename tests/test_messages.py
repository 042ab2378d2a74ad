"""Tests of the FSRVP stubs: round trips, hand-built golden bytes, and malformed stubs.

Golden stubs are assembled with struct from the IDL (MS-FSRVP section 6) and the NDR rules,
field by field with their offsets, independently of fsrvpd.ndr.
"""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fsrvpd import messages as m
from fsrvpd.constants import HResult, Opnum
from fsrvpd.ndr import NdrError

SET_ID = uuid.UUID("a1a2a3a4-b1b2-c1c2-d1d2-d3d4d5d6d7d8")
SET_ID_WIRE = bytes.fromhex("a4a3a2a1" "b2b1" "c2c1" "d1d2d3d4d5d6d7d8")
COPY_ID = uuid.UUID("01020304-0506-0708-090a-0b0c0d0e0f10")
COPY_ID_WIRE = bytes.fromhex("04030201" "0605" "0807" "090a0b0c0d0e0f10")

u32s = st.integers(0, 0xFFFFFFFF)
i32s = st.integers(-(1 << 31), (1 << 31) - 1)
u64s = st.integers(0, (1 << 64) - 1)
guids = st.builds(uuid.UUID, int=st.integers(0, (1 << 128) - 1))
wire_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
hresults = st.one_of(st.sampled_from(list(HResult)).map(int), u32s)

REQUESTS = {
    m.GetSupportedVersionRequest: st.builds(m.GetSupportedVersionRequest),
    m.SetContextRequest: st.builds(m.SetContextRequest, u32s),
    m.StartShadowCopySetRequest: st.builds(m.StartShadowCopySetRequest, guids),
    m.AddToShadowCopySetRequest: st.builds(m.AddToShadowCopySetRequest, guids, guids, wire_text),
    m.CommitShadowCopySetRequest: st.builds(m.CommitShadowCopySetRequest, guids, u32s),
    m.ExposeShadowCopySetRequest: st.builds(m.ExposeShadowCopySetRequest, guids, u32s),
    m.RecoveryCompleteShadowCopySetRequest: st.builds(m.RecoveryCompleteShadowCopySetRequest, guids),
    m.AbortShadowCopySetRequest: st.builds(m.AbortShadowCopySetRequest, guids),
    m.IsPathSupportedRequest: st.builds(m.IsPathSupportedRequest, wire_text),
    m.IsPathShadowCopiedRequest: st.builds(m.IsPathShadowCopiedRequest, wire_text),
    m.GetShareMappingRequest: st.builds(m.GetShareMappingRequest, guids, guids, wire_text, u32s),
    m.DeleteShareMappingRequest: st.builds(m.DeleteShareMappingRequest, guids, guids, wire_text),
    m.PrepareShadowCopySetRequest: st.builds(m.PrepareShadowCopySetRequest, guids, u32s),
}
mappings = st.builds(m.ShareMapping1, guids, guids, wire_text, wire_text, u64s)
RESPONSES = {
    m.StatusResponse: st.builds(m.StatusResponse, hresults),
    m.GetSupportedVersionResponse: st.builds(m.GetSupportedVersionResponse, hresults, u32s, u32s),
    m.StartShadowCopySetResponse: st.builds(m.StartShadowCopySetResponse, hresults, guids),
    m.AddToShadowCopySetResponse: st.builds(m.AddToShadowCopySetResponse, hresults, guids),
    m.IsPathSupportedResponse: st.builds(m.IsPathSupportedResponse, hresults, st.booleans(), st.none() | wire_text),
    m.IsPathShadowCopiedResponse: st.builds(m.IsPathShadowCopiedResponse, hresults, st.booleans(), i32s),
    m.GetShareMappingResponse: st.one_of(
        st.builds(m.GetShareMappingResponse, hresults, st.just(1), st.none() | mappings),
        st.builds(m.GetShareMappingResponse, hresults, u32s.filter(lambda level: level != 1), st.none()),
    ),
}
ALL_OPNUMS = sorted(m.OPERATIONS)


def wire_string(text: str) -> bytes:
    """max_count, offset, actual_count, then UTF-16LE with the NUL (no trailing padding)."""
    units = text.encode("utf-16-le") + b"\0\0"
    return struct.pack("<III", len(units) // 2, 0, len(units) // 2) + units


VALID_REQUESTS = {
    Opnum.GetSupportedVersion: m.GetSupportedVersionRequest(),
    Opnum.SetContext: m.SetContextRequest(0x19),
    Opnum.StartShadowCopySet: m.StartShadowCopySetRequest(SET_ID),
    Opnum.AddToShadowCopySet: m.AddToShadowCopySetRequest(COPY_ID, SET_ID, "\\\\fs\\vms\\"),
    Opnum.CommitShadowCopySet: m.CommitShadowCopySetRequest(SET_ID, 60000),
    Opnum.ExposeShadowCopySet: m.ExposeShadowCopySetRequest(SET_ID, 60000),
    Opnum.RecoveryCompleteShadowCopySet: m.RecoveryCompleteShadowCopySetRequest(SET_ID),
    Opnum.AbortShadowCopySet: m.AbortShadowCopySetRequest(SET_ID),
    Opnum.IsPathSupported: m.IsPathSupportedRequest("\\\\fs\\vms"),
    Opnum.IsPathShadowCopied: m.IsPathShadowCopiedRequest("\\\\fs\\v"),
    Opnum.GetShareMapping: m.GetShareMappingRequest(COPY_ID, SET_ID, "\\\\fs\\vms\\", 1),
    Opnum.DeleteShareMapping: m.DeleteShareMappingRequest(SET_ID, COPY_ID, "\\\\fs\\vms\\"),
    Opnum.PrepareShadowCopySet: m.PrepareShadowCopySetRequest(SET_ID, 1800000),
}


def valid_request_stub(opnum: int) -> bytes:
    """A stub with every field set, for truncation and mutation tests."""
    return m.encode_request(VALID_REQUESTS[opnum])[1]


def test_table_covers_the_13_opnums_and_the_strategies_cover_the_table():
    assert sorted(m.OPERATIONS) == [op.value for op in Opnum] == list(range(13))
    assert all(type(VALID_REQUESTS[opnum]) is m.OPERATIONS[opnum].request for opnum in Opnum)
    assert {op.request for op in m.OPERATIONS.values()} == set(REQUESTS)
    assert {op.response for op in m.OPERATIONS.values()} == set(RESPONSES)


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("request_type", REQUESTS, ids=lambda t: t.__name__)
@given(data=st.data())
def test_every_request_round_trips(request_type, data):
    request = data.draw(REQUESTS[request_type])
    opnum, stub = m.encode_request(request)
    assert m.OPERATIONS[opnum].request is request_type
    assert m.decode_request(opnum, stub) == request


@pytest.mark.parametrize("opnum", ALL_OPNUMS, ids=lambda n: Opnum(n).name)
@given(data=st.data())
def test_every_response_round_trips(opnum, data):
    response = data.draw(RESPONSES[m.OPERATIONS[opnum].response])
    assert m.decode_response(opnum, m.encode_response(opnum, response)) == response


def test_requests_of_the_same_shape_stay_distinct():
    commit, expose = m.CommitShadowCopySetRequest(SET_ID, 5), m.ExposeShadowCopySetRequest(SET_ID, 5)
    assert commit != expose
    (commit_opnum, commit_stub), (expose_opnum, expose_stub) = m.encode_request(commit), m.encode_request(expose)
    assert (commit_opnum, expose_opnum) == (4, 5) and commit_stub == expose_stub
    assert type(m.decode_request(5, m.encode_request(commit)[1])) is m.ExposeShadowCopySetRequest


# -- golden bytes ---------------------------------------------------------------------------------
def test_golden_set_context():
    # [in] unsigned long Context -> u32.  Out: only the DWORD result.
    context = 0x00000019 | 0x00400000
    assert m.encode_request(m.SetContextRequest(context)) == (1, struct.pack("<I", context))
    assert m.decode_request(1, bytes.fromhex("19004000")) == m.SetContextRequest(context)
    assert m.encode_response(1, m.StatusResponse(HResult.FSRVP_E_UNSUPPORTED_CONTEXT)) == bytes.fromhex("1b230480")


def test_golden_add_to_shadow_copy_set():
    share = "\\\\fs\\vms\\"  # 9 characters + NUL = 10 UTF-16 units
    stub = (COPY_ID_WIRE  # 0: ClientShadowCopyId, GUID bytes_le
            + SET_ID_WIRE  # 16: ShadowCopySetId
            + struct.pack("<III", 10, 0, 10)  # 32: [ref, string] ShareName: max_count, offset, actual_count
            + "\\\\fs\\vms\\\0".encode("utf-16-le"))  # 44: 20 bytes of UTF-16LE incl. NUL; ends at 64
    request = m.AddToShadowCopySetRequest(COPY_ID, SET_ID, share)
    assert m.encode_request(request) == (3, stub)
    assert m.decode_request(3, stub) == request
    # Out: [ref] GUID *pShadowCopyId, then the result.
    response = m.AddToShadowCopySetResponse(0, COPY_ID)
    assert m.encode_response(3, response) == COPY_ID_WIRE + bytes(4)
    assert m.decode_response(3, COPY_ID_WIRE + bytes(4)) == response


def test_golden_get_share_mapping_response():
    base_unc = "\\\\fs\\vms\\"  # 10 units: 12 + 20 = 32 bytes
    exposed = "\\\\fs\\vms@{x}"  # 12 characters + NUL = 13 units: 12 + 26 = 38 bytes
    timestamp = 0x01D9_0000_1234_5678
    stub = (struct.pack("<I", 1)  # 0: union discriminant = Level 1
            + struct.pack("<I", 0x00020000)  # 4: arm: unique pointer to FSSAGENT_SHARE_MAPPING_1
            + SET_ID_WIRE  # 8: the struct (8-aligned for its LONGLONG): ShadowCopySetId
            + COPY_ID_WIRE  # 24: ShadowCopyId
            + struct.pack("<I", 0x00020004)  # 40: ShareNameUNC pointer
            + struct.pack("<I", 0x00020008)  # 44: ShadowCopyShareName pointer
            + struct.pack("<Q", timestamp)  # 48: CreationTimestamp
            + wire_string(base_unc)  # 56: deferred referent of ShareNameUNC, ends at 88
            + wire_string(exposed)  # 88: deferred referent of ShadowCopyShareName, ends at 126
            + bytes(2)  # 126: pad to 4
            + struct.pack("<I", 0))  # 128: the DWORD result
    mapping = m.ShareMapping1(SET_ID, COPY_ID, base_unc, exposed, timestamp)
    response = m.GetShareMappingResponse(0, 1, mapping)
    assert m.encode_response(10, response) == stub
    assert m.decode_response(10, stub) == response


def test_golden_get_share_mapping_failures_keep_the_discriminant():
    # What Samba sends when it fails the call: the requested level, a NULL arm for level 1.
    assert m.encode_response(10, m.GetShareMappingResponse(0x80070057, 1, None)) == struct.pack("<III", 1, 0,
                                                                                                0x80070057)
    # Any other level has an empty arm: the discriminant alone.
    assert m.encode_response(10, m.GetShareMappingResponse(0x80070057, 2, None)) == struct.pack("<II", 2, 0x80070057)


def test_golden_is_path_supported_response():
    # [out] BOOL*, then [out, string] LPWSTR*: a unique pointer (0 = NULL) and its referent.
    null_owner = m.IsPathSupportedResponse(HResult.FSRVP_E_NOT_SUPPORTED, False, None)
    assert m.encode_response(8, null_owner) == struct.pack("<III", 0, 0, 0x8004230C)
    owner = m.IsPathSupportedResponse(0, True, "FS")
    stub = struct.pack("<II", 1, 0x00020000) + wire_string("FS") + bytes(2) + struct.pack("<I", 0)
    assert m.encode_response(8, owner) == stub
    assert m.decode_response(8, stub) == owner


def test_golden_small_responses():
    assert m.encode_response(0, m.GetSupportedVersionResponse(0, 1, 1)) == struct.pack("<III", 1, 1, 0)
    assert m.encode_response(2, m.StartShadowCopySetResponse(0, SET_ID)) == SET_ID_WIRE + bytes(4)
    assert m.encode_response(9, m.IsPathShadowCopiedResponse(0, True, -1)) == struct.pack("<Iii", 1, -1, 0)
    assert m.encode_request(m.GetSupportedVersionRequest()) == (0, b"")


# -- failure responses ----------------------------------------------------------------------------
@pytest.mark.parametrize("opnum", ALL_OPNUMS, ids=lambda n: Opnum(n).name)
def test_failure_response_carries_the_result_and_empty_outputs(opnum):
    request = m.decode_request(opnum, valid_request_stub(opnum))
    response = m.failure_response(request, HResult.E_ACCESSDENIED)
    assert type(response) is m.OPERATIONS[opnum].response
    assert response.result == HResult.E_ACCESSDENIED
    assert m.decode_response(opnum, m.encode_response(opnum, response)) == response


def test_failure_responses_hold_null_outputs():
    assert m.failure_response(m.StartShadowCopySetRequest(SET_ID), 1).set_id == m.NULL_GUID
    assert m.failure_response(m.IsPathSupportedRequest("x"), 1) == m.IsPathSupportedResponse(1, False, None)
    request = m.GetShareMappingRequest(COPY_ID, SET_ID, "x", 7)
    assert m.failure_response(request, 1) == m.GetShareMappingResponse(1, 7, None)


# -- malformed stubs ------------------------------------------------------------------------------
@pytest.mark.parametrize("opnum", ALL_OPNUMS, ids=lambda n: Opnum(n).name)
def test_every_truncation_of_a_valid_request_raises_ndr_error(opnum):
    stub = valid_request_stub(opnum)
    m.decode_request(opnum, stub)
    for length in range(len(stub)):
        with pytest.raises(NdrError):
            m.decode_request(opnum, stub[:length])


def test_every_truncation_of_a_valid_response_raises_ndr_error():
    mapping = m.ShareMapping1(SET_ID, COPY_ID, "\\\\fs\\vms\\", "\\\\fs\\vms@{x}", 1)
    stub = m.encode_response(10, m.GetShareMappingResponse(0, 1, mapping))
    for length in range(len(stub)):
        with pytest.raises(NdrError):
            m.decode_response(10, stub[:length])


def add_request_with_string(counts: tuple[int, int, int], units: bytes) -> bytes:
    return COPY_ID_WIRE + SET_ID_WIRE + struct.pack("<III", *counts) + units


@pytest.mark.parametrize("counts, units", [
    ((3, 1, 2), "a\0".encode("utf-16-le")),  # offset != 0
    ((1, 0, 2), "a\0".encode("utf-16-le")),  # actual_count > max_count
    ((0, 0, 0), b""),  # no NUL at all
    ((2, 0, 2), "ab".encode("utf-16-le")),  # not NUL-terminated
    ((3, 0, 3), "a\0b".encode("utf-16-le")),  # NUL inside the string
    ((3, 0, 3), "ab".encode("utf-16-le") + b"\0"),  # odd byte count: half a NUL
    ((2, 0, 2), bytes.fromhex("00d8 0000")),  # lone high surrogate
    ((2, 0, 2), bytes.fromhex("00dc 0000")),  # lone low surrogate
    ((0xFFFFFFFF, 0, 0xFFFFFFFF), b"\0\0"),  # huge max_count
    ((0x40000000, 0, 1), b"\0\0"),  # huge max_count, small actual_count
    ((5, 0, 5), "ab\0".encode("utf-16-le")),  # counts promise more than the stub holds
])
def test_bad_string_encodings_raise_ndr_error(counts, units):
    with pytest.raises(NdrError):
        m.decode_request(Opnum.AddToShadowCopySet, add_request_with_string(counts, units))


def test_share_mapping_with_null_string_pointer_is_refused():
    stub = (struct.pack("<II", 1, 0x00020000) + SET_ID_WIRE + COPY_ID_WIRE + struct.pack("<II", 0, 0x00020008)
            + struct.pack("<Q", 0) + wire_string("x") + bytes(4))
    with pytest.raises(NdrError, match="NULL"):
        m.decode_response(10, stub)


def test_trailing_bytes_are_ignored():
    # Samba's IDL declares an undocumented 52-byte `magic` input on these two calls.
    magic = bytes(range(52))
    assert m.decode_request(0, magic) == m.GetSupportedVersionRequest()
    assert m.decode_request(8, valid_request_stub(8) + magic) == m.IsPathSupportedRequest("\\\\fs\\vms")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(opnum=st.sampled_from(ALL_OPNUMS), stub=st.binary(max_size=160))
def test_arbitrary_stubs_decode_or_raise_only_ndr_error(opnum, stub):
    for decode, expected in ((m.decode_request, m.OPERATIONS[opnum].request),
                             (m.decode_response, m.OPERATIONS[opnum].response)):
        try:
            decoded = decode(opnum, stub)
        except NdrError:
            continue
        assert type(decoded) is expected


@given(opnum=st.sampled_from(ALL_OPNUMS), data=st.data())
def test_mutated_valid_stubs_decode_or_raise_only_ndr_error(opnum, data):
    stub = bytearray(valid_request_stub(opnum))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(stub)))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "insert" or not stub:
            stub[position:position] = data.draw(st.binary(min_size=1, max_size=4))
        elif action == "set":
            stub[min(position, len(stub) - 1)] = data.draw(st.integers(0, 255))
        else:
            del stub[min(position, len(stub) - 1)]
    try:
        decoded = m.decode_request(opnum, bytes(stub))
    except NdrError:
        return
    assert type(decoded) is m.OPERATIONS[opnum].request


@pytest.mark.parametrize("opnum", [-1, 13, 255, 1 << 16, None])
def test_unknown_opnums_are_not_ndr_errors(opnum):
    for call in (lambda: m.decode_request(opnum, b""), lambda: m.decode_response(opnum, b"")):
        with pytest.raises(m.UnknownOpnum) as raised:
            call()
        assert not isinstance(raised.value, NdrError)


# -- programming errors ---------------------------------------------------------------------------
def test_encode_response_refuses_another_operations_response():
    with pytest.raises(TypeError):
        m.encode_response(0, m.StatusResponse(0))


def test_encode_request_refuses_non_requests():
    with pytest.raises(TypeError):
        m.encode_request(m.StatusResponse(0))


def test_values_ndr_cannot_carry_raise_ndr_error():
    with pytest.raises(NdrError):
        m.encode_request(m.SetContextRequest(-1))
    with pytest.raises(NdrError):
        m.encode_request(m.IsPathSupportedRequest("a\0b"))
    with pytest.raises(NdrError):
        m.encode_response(10, m.GetShareMappingResponse(0, 2, m.ShareMapping1(SET_ID, COPY_ID, "a", "b", 0)))
    with pytest.raises(NdrError):
        m.encode_response(10, m.GetShareMappingResponse(0, 1, m.ShareMapping1(SET_ID, COPY_ID, None, "b", 0)))


# -- FILETIME -------------------------------------------------------------------------------------
def test_filetime_epochs():
    assert m.filetime_from_unix(0) == 116_444_736_000_000_000
    assert m.filetime_from_unix(1.5) == 116_444_736_000_000_000 + 15_000_000
    assert m.filetime_from_unix(-11_644_473_600) == 0
    assert m.unix_from_filetime(116_444_736_000_000_000) == 0.0
    assert m.unix_from_filetime(0) == -11_644_473_600


@given(st.floats(min_value=-1e10, max_value=1e11, allow_nan=False))
def test_filetime_round_trips_to_within_its_resolution(seconds):
    assert abs(m.unix_from_filetime(m.filetime_from_unix(seconds)) - seconds) <= 1e-7 + abs(seconds) * 1e-15


@pytest.mark.parametrize("seconds", [-11_644_473_601, 1e13, float("inf")])
def test_times_outside_filetime_are_refused(seconds):
    with pytest.raises((ValueError, OverflowError)):
        m.filetime_from_unix(seconds)

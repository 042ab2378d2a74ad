"""Tests of the NDR 2.0 primitives.

Expected bytes are written out with struct from the C706 rules, so a codec mistake cannot agree
with itself.
"""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given, strategies as st

from fsrvpd.ndr import DEFAULT_MAX_STRING_CHARS, FIRST_REFERENT_ID, NdrError, NdrReader, NdrWriter

guids = st.builds(uuid.UUID, int=st.integers(0, (1 << 128) - 1))
# Any Unicode text a [string] can carry: no NUL, no lone surrogates; non-BMP characters included.
wire_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=64)


def string_bytes(max_count: int, offset: int, actual_count: int, units: bytes) -> bytes:
    return struct.pack("<III", max_count, offset, actual_count) + units


def read_string(data: bytes, **reader_options) -> str:
    return NdrReader(data, **reader_options).string()


# -- golden layouts ------------------------------------------------------------------------------
def test_guid_uses_the_mixed_endian_layout():
    value = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
    expected = bytes.fromhex("33221100" "5544" "7766" "8899aabbccddeeff")
    writer = NdrWriter()
    writer.guid(value)
    assert writer.getvalue() == expected
    assert NdrReader(expected).guid() == value


def test_string_is_counts_then_utf16_with_terminating_nul():
    expected = string_bytes(3, 0, 3, "ab".encode("utf-16-le") + b"\0\0")
    writer = NdrWriter()
    writer.string("ab")
    assert writer.getvalue() == expected
    assert read_string(expected) == "ab"


def test_non_bmp_characters_count_as_two_utf16_units():
    expected = string_bytes(3, 0, 3, bytes.fromhex("3dd8 00de") + b"\0\0")  # U+1F600 as a surrogate pair
    writer = NdrWriter()
    writer.string("\U0001F600")
    assert writer.getvalue() == expected
    assert read_string(expected) == "\U0001F600"


def test_empty_string_still_carries_its_nul():
    writer = NdrWriter()
    writer.string("")
    assert writer.getvalue() == string_bytes(1, 0, 1, b"\0\0")


def test_primitives_align_to_their_size_from_the_stub_start():
    writer = NdrWriter()
    writer.u16(0x1234)
    writer.u32(0xDEADBEEF)
    writer.u16(7)
    writer.u64(0x0102030405060708)
    expected = (struct.pack("<H", 0x1234) + bytes(2) + struct.pack("<I", 0xDEADBEEF) + struct.pack("<H", 7)
                + bytes(6) + struct.pack("<Q", 0x0102030405060708))
    assert writer.getvalue() == expected
    reader = NdrReader(expected)
    assert (reader.u16(), reader.u32(), reader.u16(), reader.u64()) == (0x1234, 0xDEADBEEF, 7, 0x0102030405060708)
    assert reader.remaining == 0


def test_string_after_odd_length_data_is_realigned_for_the_next_field():
    writer = NdrWriter()
    writer.string("a")  # 12 + 4 bytes: already aligned
    writer.string("ab")  # 12 + 6 bytes: the next u32 needs 2 bytes of padding
    writer.u32(5)
    data = writer.getvalue()
    assert data[-6:] == bytes(2) + struct.pack("<I", 5)
    reader = NdrReader(data)
    assert (reader.string(), reader.string(), reader.u32()) == ("a", "ab", 5)


def test_unique_pointers_get_fresh_non_zero_ids_and_null_is_zero():
    writer = NdrWriter()
    writer.referent_id(True)
    writer.referent_id(False)
    writer.referent_id(True)
    assert writer.getvalue() == struct.pack("<III", FIRST_REFERENT_ID, 0, FIRST_REFERENT_ID + 4)


def test_boolean32_reads_any_non_zero_value_as_true():
    reader = NdrReader(struct.pack("<III", 0, 1, 0x80000000))
    assert [reader.boolean32() for _ in range(3)] == [False, True, True]


def test_signed_values():
    writer = NdrWriter()
    writer.i32(-2)
    assert writer.getvalue() == b"\xfe\xff\xff\xff"
    assert NdrReader(writer.getvalue()).i32() == -2


def test_trailing_bytes_are_left_unread_not_refused():
    reader = NdrReader(struct.pack("<I", 1) + b"extra")
    assert reader.u32() == 1
    assert reader.remaining == 5


# -- round trips --------------------------------------------------------------------------------
@given(st.lists(st.one_of(
    st.tuples(st.just("u16"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("u32"), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("i32"), st.integers(-(1 << 31), (1 << 31) - 1)),
    st.tuples(st.just("u64"), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("guid"), guids),
    st.tuples(st.just("string"), wire_text),
), max_size=12))
def test_any_sequence_of_primitives_round_trips(items):
    writer = NdrWriter()
    for method, value in items:
        getattr(writer, method)(value)
    reader = NdrReader(writer.getvalue())
    assert [(method, getattr(reader, method)()) for method, _ in items] == items
    assert reader.remaining == 0


# -- malformed input ----------------------------------------------------------------------------
@pytest.mark.parametrize("data, complaint", [
    (string_bytes(3, 1, 2, "a\0".encode("utf-16-le")), "offset"),
    (string_bytes(1, 0, 2, "a\0".encode("utf-16-le")), "exceeds max_count"),
    (string_bytes(0, 0, 0, b""), "empty"),
    (string_bytes(2, 0, 2, "ab".encode("utf-16-le")), "not NUL-terminated"),
    (string_bytes(4, 0, 4, "a\0b\0".encode("utf-16-le")), "NUL before the end"),
    (string_bytes(2, 0, 2, bytes.fromhex("3dd8 0000")), "invalid UTF-16"),  # high surrogate alone
    (string_bytes(3, 0, 3, bytes.fromhex("00de 4100 0000")), "invalid UTF-16"),  # low surrogate alone
    (string_bytes(3, 0, 3, "ab".encode("utf-16-le") + b"\0"), "truncated"),  # odd byte count
    (string_bytes(0xFFFFFFFF, 0, 0xFFFFFFFF, b""), "exceeds the limit"),
    (string_bytes(DEFAULT_MAX_STRING_CHARS + 1, 0, 1, b"\0\0"), "exceeds the limit"),
    (struct.pack("<II", 1, 0), "truncated"),
])
def test_malformed_strings_raise_ndr_error(data, complaint):
    with pytest.raises(NdrError, match=complaint):
        read_string(data)


def test_string_limit_is_a_parameter():
    data = string_bytes(5, 0, 5, "abcd\0".encode("utf-16-le"))
    assert read_string(data, max_string_chars=5) == "abcd"
    with pytest.raises(NdrError):
        read_string(data, max_string_chars=4)


def test_actual_count_below_max_count_is_accepted():
    assert read_string(string_bytes(10, 0, 2, "a\0".encode("utf-16-le"))) == "a"


@pytest.mark.parametrize("method, size", [("u16", 2), ("u32", 4), ("i32", 4), ("u64", 8), ("guid", 16)])
def test_every_truncation_of_a_primitive_raises_ndr_error(method, size):
    for length in range(size):
        with pytest.raises(NdrError, match="truncated"):
            getattr(NdrReader(bytes(length)), method)()


def test_missing_alignment_padding_is_truncation():
    reader = NdrReader(b"\1\0\0")
    reader.u16()
    with pytest.raises(NdrError, match="truncated"):
        reader.u32()


@given(st.binary(max_size=64))
def test_arbitrary_bytes_into_every_reader_method_raise_only_ndr_error(data):
    for method in ("u16", "u32", "i32", "u64", "guid", "string", "boolean32", "referent_id"):
        try:
            getattr(NdrReader(data), method)()
        except NdrError:
            pass


@pytest.mark.parametrize("method, value", [
    ("u32", -1), ("u32", 1 << 32), ("u16", 1 << 16), ("i32", 1 << 31), ("u64", -1), ("u32", "1"), ("u32", None),
    ("guid", "00112233-4455-6677-8899-aabbccddeeff"), ("string", "a\0b"), ("string", "\ud800"), ("string", b"a"),
])
def test_values_ndr_cannot_carry_raise_ndr_error_when_written(method, value):
    with pytest.raises(NdrError):
        getattr(NdrWriter(), method)(value)

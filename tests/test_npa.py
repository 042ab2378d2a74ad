"""named_pipe_auth, sans-I/O: real handshakes captured from Debian's smbd 4.17, the level-8 layout
of Samba 4.20+ (spliced from a real one), framing, and malformed input of every length."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from fsrvpd import npa

DATA = Path(__file__).parent / "data"
# Captured from smbd 4.17.12 (Debian 12) opening \PIPE\FssagentRpc for `rpcclient -U backup` and
# `-U root` against a standalone server whose `backup` is in BUILTIN\Backup Operators.
BACKUP_OPERATOR = (DATA / "npa-level7-backup-operator.bin").read_bytes()
ROOT = (DATA / "npa-level7-root.bin").read_bytes()
DOMAIN_SID = "S-1-5-21-3186522500-3584310155-2161924435"


def test_a_real_level_7_handshake_gives_the_callers_identity_and_address():
    request = npa.parse_request(BACKUP_OPERATOR)
    assert (request.level, request.transport) == (7, npa.NCACN_NP)
    assert (request.account, request.domain, request.unix_name) == ("backup", "LABSMB", "backup")
    assert (request.remote_client_addr, request.local_server_addr, request.local_server_port) == \
        ("127.0.0.1", "127.0.0.1", 14451)
    assert request.sids[:2] == (f"{DOMAIN_SID}-1000", f"{DOMAIN_SID}-513")
    assert "S-1-5-32-551" in request.sids and request.complete

    root = npa.parse_request(ROOT)
    assert root.account == "root" and "S-1-5-32-551" not in root.sids and "S-1-5-32-544" not in root.sids


def _token_end(blob: bytes, sids: tuple[str, ...]) -> int:
    """Where a level-7 token's rights_mask ends: after the SIDs, the 8-aligned privilege mask and it."""
    start = blob.index(struct.pack("<II", len(sids), len(sids)) + b"\x01\x05") + 8
    end = start + sum(8 + 4 * (len(sid.split("-")) - 3) for sid in sids)
    return (end + 7) // 8 * 8 + 8 + 4


def as_level_8(blob: bytes, claims: tuple[int, int, int] = (0, 0, 0), device_sids: tuple[str, ...] = ()) -> bytes:
    """The same handshake as Samba 4.20+ sends it: level 8, and the token's new claim and device-SID
    fields after rights_mask (empty claim arrays, then the device SIDs and evaluate_claims)."""
    request = npa.parse_request(blob)
    at = _token_end(blob, request.sids)
    extra = struct.pack("<4I", *claims, len(device_sids))
    extra += struct.pack("<3I", *claims) if any(claims) else struct.pack("<3I", 0, 0, 0)
    extra += struct.pack("<I", len(device_sids)) + b"".join(_sid(sid) for sid in device_sids)
    extra += struct.pack("<H", 1) + b"\x00\x00"  # evaluate_claims, then the pad before the next uint32
    # The unix token follows: its group count, then padding to 8 for its uids, which the shift changes.
    old_pad, new_pad = -(at + 4) % 8, -(at + len(extra) + 4) % 8
    body = (blob[4:8] + struct.pack("<II", 8, 8) + blob[16:at] + extra + blob[at:at + 4] + bytes(new_pad)
            + blob[at + 4 + old_pad:])
    return struct.pack(">I", len(body)) + body


def _sid(text: str) -> bytes:
    parts = [int(part) for part in text.split("-")[1:]]
    return bytes([parts[0], len(parts) - 2]) + parts[1].to_bytes(6, "big") + struct.pack(f"<{len(parts) - 2}I",
                                                                                        *parts[2:])


def test_level_8_reads_past_the_new_token_fields():
    request = npa.parse_request(as_level_8(BACKUP_OPERATOR, device_sids=("S-1-5-32-544",)))
    assert (request.level, request.account, request.domain) == (8, "backup", "LABSMB")
    assert "S-1-5-32-551" in request.sids and request.complete
    assert "S-1-5-32-544" not in request.sids  # the client machine's groups are not the caller's


def test_level_8_with_claims_keeps_the_sids_and_says_the_rest_is_unread():
    request = npa.parse_request(as_level_8(BACKUP_OPERATOR, claims=(0, 2, 0)))
    assert not request.complete
    assert "S-1-5-32-551" in request.sids and request.account == ""


def test_reply_is_a_message_mode_pipe_at_the_requests_level():
    reply = npa.encode_reply(7)
    assert reply == (struct.pack(">I", 32) + b"NPAM" + struct.pack("<IIHH4xQI", 7, 7, 2, 0x05FF, 4096, 0))
    assert npa.encode_reply(8)[8:16] == struct.pack("<II", 8, 8)


def test_connection_handshake_in_pieces_then_messages_both_ways():
    connection = npa.NpaServerConnection()
    events = []
    for i in range(0, len(BACKUP_OPERATOR), 100):
        events += connection.receive_data(BACKUP_OPERATOR[i:i + 100])
    assert [type(e) for e in events] == [npa.HandshakeReceived]
    assert connection.data_to_send() == npa.encode_reply(7)

    events = connection.receive_data(b"\x03\x00abc\x02\x00d")
    assert events == [npa.MessageReceived(b"abc")]
    assert connection.receive_data(b"e") == [npa.MessageReceived(b"de")]
    connection.send_message(b"xyz")
    assert connection.data_to_send() == b"\x03\x00xyz"
    with pytest.raises(ValueError):
        connection.send_message(b"x" * 65536)


def test_bad_handshakes_get_an_answer_and_a_closed_connection():
    unknown_level = bytearray(BACKUP_OPERATOR)
    unknown_level[8:16] = struct.pack("<II", 6, 6)
    for blob, status in ((bytes(unknown_level), npa.NT_STATUS_INVALID_LEVEL),
                         (BACKUP_OPERATOR[:4] + b"XXXX" + BACKUP_OPERATOR[8:], npa.NT_STATUS_INVALID_PARAMETER),
                         (struct.pack(">I", 0x01000000), npa.NT_STATUS_INVALID_PARAMETER)):
        connection = npa.NpaServerConnection()
        events = connection.receive_data(blob)
        assert [type(e) for e in events] == [npa.ProtocolError] and connection.closed
        assert connection.data_to_send()[-4:] == struct.pack("<I", status)
        assert connection.receive_data(b"more") == []


def test_an_empty_message_ends_the_connection():
    connection = npa.NpaServerConnection()
    connection.receive_data(ROOT)
    assert [type(e) for e in connection.receive_data(b"\x00\x00")] == [npa.ProtocolError]
    assert connection.closed


@pytest.mark.parametrize("blob", [BACKUP_OPERATOR, ROOT, as_level_8(ROOT)], ids=["bo", "root", "level8"])
def test_every_truncation_is_refused_cleanly(blob):
    for length in range(len(blob)):
        cut = struct.pack(">I", max(length - 4, 0)) + blob[4:length]
        with pytest.raises(npa.NpaError):
            npa.parse_request(cut)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_handshakes_raise_npa_error_or_parse(data):
    blob = bytearray(data.draw(st.sampled_from([BACKUP_OPERATOR, ROOT])))
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(4, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        npa.parse_request(bytes(blob))
    except npa.NpaError:
        pass

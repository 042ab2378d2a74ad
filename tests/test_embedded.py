"""The embedded front door against real SMB clients: Samba's smbclient/rpcclient and impacket's client.

The front door runs on an event loop in a background thread, as in the daemon; the tests drive it
from the main thread with the real command-line clients, so nothing of SMB is imitated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import struct
import subprocess
import threading
import time

import pytest
from impacket import ntlm, smb, smb3
from impacket import smb3structs as smb2
from impacket.nmb import NetBIOSError
from impacket.ntlm import compute_nthash
from impacket.smbconnection import SMBConnection, SessionError

from fsrvpd.constants import PIPE_NAME
from fsrvpd.transports.base import Caller, ShareSpec
from fsrvpd.transports.embedded import EmbeddedFrontDoor

pytestmark = pytest.mark.samba_client

USER, PASSWORD = "backup", "backup"
SNAPSHOT_SHARE = "vms@{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}"
CONTENT = b"snapshot bytes\n"
CLIENT_TIMEOUT = 20


@pytest.fixture(scope="module")
def loop():
    """The daemon's event loop, running in its own thread like fsrvpd's main loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


class PipeRecorder:
    """A handle_pipe that keeps the first bytes of each opened pipe and who opened it."""

    def __init__(self):
        self.opened: queue.Queue[tuple[bytes, Caller]] = queue.Queue()

    async def __call__(self, reader, writer, caller):
        self.opened.put((await reader.read(4096), caller))
        writer.close()


class Server:
    """An EmbeddedFrontDoor started on the test loop, serving `base` as the share `share`."""

    def __init__(self, loop, base: str, handle_pipe, port: int = 0):
        self.loop = loop
        self.door = EmbeddedFrontDoor("127.0.0.1", port, {USER: compute_nthash(PASSWORD).hex()}, "FSRVPTEST")
        self.run(self.door.start(handle_pipe))
        self.publish("share", base, read_only=False)

    def stop(self) -> None:
        self.run(self.door.stop())

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=CLIENT_TIMEOUT)

    def publish(self, name: str, path: str, read_only: bool) -> None:
        self.run(self.door.publish_share(ShareSpec(name, path, read_only)))

    def smbclient(self, *args: str, password: str = PASSWORD) -> subprocess.CompletedProcess:
        return subprocess.run(["smbclient", "-p", str(self.door.port), "-U", f"{USER}%{password}", *args],
                              capture_output=True, text=True, timeout=CLIENT_TIMEOUT)

    def rpcclient(self, password: str = PASSWORD) -> subprocess.CompletedProcess:
        return subprocess.run(["rpcclient", "-p", str(self.door.port), "-U", f"{USER}%{password}", "127.0.0.1",
                               "-c", "fss_get_sup_version"], capture_output=True, text=True, timeout=CLIENT_TIMEOUT)

    def impacket_connection(self, **options) -> SMBConnection:
        return SMBConnection("127.0.0.1", "127.0.0.1", sess_port=self.door.port, timeout=CLIENT_TIMEOUT, **options)

    def impacket_client(self) -> SMBConnection:
        client = self.impacket_connection()
        client.login(USER, PASSWORD)
        return client


def directory_with_f(path):
    """A directory to share, holding the file `f`."""
    path.mkdir()
    (path / "f").write_bytes(CONTENT)
    return path


@pytest.fixture
def base_dir(tmp_path):
    return directory_with_f(tmp_path / "base")


@pytest.fixture
def recorder():
    return PipeRecorder()


@pytest.fixture
def server(loop, base_dir, recorder):
    served = Server(loop, str(base_dir), recorder)
    yield served
    served.stop()


def refused(result: subprocess.CompletedProcess, status: str) -> bool:
    """smbclient reports a refused command but may still exit 0 (`rm`, `rename`)."""
    return status in result.stdout + result.stderr


def test_fsrvp_pipe_open_reaches_the_handler_with_the_smb_caller(server, recorder):
    server.rpcclient()  # fails after the bind: the recorder answers nothing

    first_bytes, caller = recorder.opened.get(timeout=CLIENT_TIMEOUT)
    assert first_bytes[0] == 0x05 and first_bytes[2] == 0x0B  # DCE/RPC v5 bind PDU
    assert caller == Caller(user=USER, domain="WORKGROUP", address="127.0.0.1")


def test_wrong_password_reaches_neither_pipe_nor_share(server, recorder):
    assert refused(server.rpcclient(password="wrong"), "NT_STATUS_LOGON_FAILURE")
    assert refused(server.smbclient("//127.0.0.1/share", "-c", "ls", password="wrong"), "NT_STATUS_LOGON_FAILURE")
    assert recorder.opened.empty()


@pytest.mark.parametrize("user, password", [(USER, "wrong"), ("stranger", "x"), ("", "")],
                         ids=["wrong password", "unknown user", "anonymous"])
def test_failed_logon_leaves_the_connection_without_access(server, user, password):
    """impacket itself would let this connection tree-connect anyway."""
    client = server.impacket_connection()
    with pytest.raises(SessionError) as logon:
        client.login(user, password)
    assert logon.value.getErrorCode() == 0xC000006D  # STATUS_LOGON_FAILURE
    with pytest.raises(SessionError) as tree:
        client.connectTree("share")
    assert tree.value.getErrorCode() == 0xC0000022  # STATUS_ACCESS_DENIED


def test_every_logon_gets_its_own_challenge(server, monkeypatch):
    """impacket's constant NTLM challenge would let a captured logon be replayed."""
    challenges = []
    answer_challenge = ntlm.getNTLMSSPType3

    def recording(negotiate, challenge, *args, **kwargs):
        challenges.append(ntlm.NTLMAuthChallenge(challenge)["challenge"])
        return answer_challenge(negotiate, challenge, *args, **kwargs)

    monkeypatch.setattr(ntlm, "getNTLMSSPType3", recording)
    server.impacket_client().logoff()
    server.impacket_client().logoff()
    assert len(challenges) == 2 and challenges[0] != challenges[1]


@pytest.mark.parametrize("tamper", [{"SigningActivated": False}, {"SessionKey": b"k" * 16}],
                         ids=["unsigned", "signed with another key"])
def test_requests_after_logon_must_carry_a_valid_signature(server, tamper):
    """impacket only offered signing and never checked it: anyone on the path could act in a session."""
    client = server.impacket_client()
    session = client.getSMBServer()._Session
    assert session["SigningRequired"]
    session.update(tamper)
    with pytest.raises(NetBIOSError):  # the server hangs up
        client.connectTree("share")


def test_smb1_is_refused(server):
    with pytest.raises(NetBIOSError):  # the server hangs up on SMB1
        server.impacket_connection(preferredDialect=smb.SMB_DIALECT)
    smb1_only = server.smbclient("//127.0.0.1/share", "--option=client min protocol=NT1", "-m", "NT1", "-c", "ls")
    assert refused(smb1_only, "protocol negotiation failed")


def test_ipc_share_opens_pipes_only(server, tmp_path, monkeypatch):
    """impacket would serve the daemon's working directory on IPC$."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret").write_text("not for clients")
    client = server.impacket_client()
    ipc = client.connectTree("IPC$")
    with pytest.raises(SessionError) as opened:
        client.openFile(ipc, "secret", desiredAccess=smb2.FILE_READ_DATA)
    assert opened.value.getErrorCode() == 0xC0000034  # STATUS_OBJECT_NAME_NOT_FOUND
    client.closeFile(ipc, client.openFile(ipc, "srvsvc"))


def fake_pdu(call_id: int, length: int) -> bytes:
    """A DCE/RPC response PDU of `length` bytes: all the front door reads of what a pipe carries."""
    return bytes([5, 0, 2, 3]) + b"\x10\x00\x00\x00" + struct.pack("<HHI", length, 0, call_id) + bytes(length - 16)


async def answer_with_two_messages(reader, writer, caller):
    """A pipe server that answers every request with two PDUs at once."""
    while await reader.read(4096):
        writer.write(fake_pdu(1, 200) + fake_pdu(2, 100))
        await writer.drain()


@pytest.fixture
def pipe_served_by(loop, base_dir):
    """Opens an FSRVP pipe whose server is the given handler: an impacket client, its IPC$ tree
    and the pipe; the front doors are stopped afterwards."""
    servers = []

    def open_pipe(handle_pipe):
        servers.append(served := Server(loop, str(base_dir), handle_pipe))
        client = served.impacket_client()
        ipc = client.connectTree("IPC$")
        return client, ipc, client.openFile(ipc, PIPE_NAME, desiredAccess=smb2.FILE_READ_DATA | smb2.FILE_WRITE_DATA)

    yield open_pipe
    for served in servers:
        served.stop()


@pytest.fixture
def answering_pipe(pipe_served_by):
    """An open FSRVP pipe whose server answers twice."""
    return pipe_served_by(answer_with_two_messages)


def transceive(client, ipc, pipe, max_output: int) -> bytes:
    return client.getSMBServer().ioctl(ipc, pipe, smb2.FSCTL_PIPE_TRANSCEIVE, smb2.SMB2_0_IOCTL_IS_FSCTL,
                                       fake_pdu(7, 24), maxOutputResponse=max_output)


def failed_transceive(client, ipc, pipe, max_output: int) -> smb3.SessionError:
    """The error a transceive is answered with (its status, and the packet it came in)."""
    with pytest.raises(smb3.SessionError) as failed:
        transceive(client, ipc, pipe, max_output)
    return failed.value


def test_transceive_answers_with_one_message(answering_pipe):
    """Windows and rpcclient make calls with FSCTL_PIPE_TRANSCEIVE: one message per answer, as on a
    message-mode pipe; the next one waits for a READ."""
    client, ipc, pipe = answering_pipe
    assert transceive(client, ipc, pipe, 4280) == fake_pdu(1, 200)
    assert client.readFile(ipc, pipe, bytesToRead=4280) == fake_pdu(2, 100)


def test_transceive_of_a_message_longer_than_the_output_buffer_says_so(answering_pipe):
    """MS-SMB2 3.3.5.15.3: the start of the message with STATUS_BUFFER_OVERFLOW; READ gets the rest."""
    client, ipc, pipe = answering_pipe
    overflowed = failed_transceive(client, ipc, pipe, 64)
    assert overflowed.get_error_code() == 0x80000005  # STATUS_BUFFER_OVERFLOW
    start = smb2.SMB2Ioctl_Response(overflowed.get_error_packet()["Data"])["Buffer"]
    assert start + client.readFile(ipc, pipe, bytesToRead=136) == fake_pdu(1, 200)
    assert client.readFile(ipc, pipe, bytesToRead=4280) == fake_pdu(2, 100)


def test_transceive_into_a_buffer_too_small_for_a_pdu_header_is_refused(answering_pipe):
    """Refused before the request is written, so the pipe is as it was."""
    client, ipc, pipe = answering_pipe
    assert failed_transceive(client, ipc, pipe, 15).get_error_code() == 0xC000000D  # STATUS_INVALID_PARAMETER
    assert transceive(client, ipc, pipe, 4280) == fake_pdu(1, 200)


async def answer_in_part_and_close(reader, writer, caller):
    """A pipe server that goes away in the middle of its answer."""
    await reader.read(4096)
    writer.write(fake_pdu(1, 200)[:50])
    writer.close()


def test_transceive_whose_answer_breaks_off_reports_the_pipe_disconnected(pipe_served_by):
    client, ipc, pipe = pipe_served_by(answer_in_part_and_close)
    assert failed_transceive(client, ipc, pipe, 4280).get_error_code() == 0xC00000B0  # STATUS_PIPE_DISCONNECTED


def test_get_reads_a_file(server):
    result = server.smbclient("//127.0.0.1/share", "-c", "get f -")
    assert result.returncode == 0, result.stderr
    assert CONTENT.decode() in result.stdout


@pytest.fixture
def snapshot_dir(tmp_path):
    return directory_with_f(tmp_path / "snapshot")


def test_read_only_share_published_while_a_client_stays_connected(server, tmp_path, snapshot_dir):
    held = server.impacket_client()
    held_tree = held.connectTree("share")
    upload = tmp_path / "upload"
    upload.write_bytes(b"new")

    server.publish(SNAPSHOT_SHARE, str(snapshot_dir), read_only=True)

    unc = f"//127.0.0.1/{SNAPSHOT_SHARE}"
    assert CONTENT.decode() in server.smbclient(unc, "-c", "get f -").stdout
    for command in (f"put {upload} new", f"put {upload} f", "rm f", "rename f g", "mkdir d"):
        assert refused(server.smbclient(unc, "-c", command), "NT_STATUS_ACCESS_DENIED"), command
    assert os.listdir(snapshot_dir) == ["f"] and (snapshot_dir / "f").read_bytes() == CONTENT
    base_file = held.openFile(held_tree, "f", desiredAccess=smb2.FILE_READ_DATA)
    assert held.readFile(held_tree, base_file) == CONTENT  # the tree connected before the publish still works


def test_read_only_share_refuses_changes_through_a_read_handle(server, snapshot_dir):
    """The handle itself may only read: writing or setting info on it is refused, whatever the storage allows."""
    server.publish(SNAPSHOT_SHARE, str(snapshot_dir), read_only=True)
    client = server.impacket_client()
    tree = client.connectTree(SNAPSHOT_SHARE)
    with pytest.raises(SessionError, match="STATUS_ACCESS_DENIED"):
        client.openFile(tree, "f")  # impacket's default access includes writing
    readable = client.openFile(tree, "f", desiredAccess=smb2.FILE_READ_DATA)
    assert client.readFile(tree, readable) == CONTENT

    with pytest.raises(SessionError, match="STATUS_ACCESS_DENIED"):
        client.writeFile(tree, readable, b"x")
    times = smb.SMBSetFileBasicInfo()
    times["CreationTime"] = times["LastAccessTime"] = times["LastWriteTime"] = times["ChangeTime"] = \
        116444736000000000  # 1970
    times["ExtFileAttributes"] = 0
    mtime = (snapshot_dir / "f").stat().st_mtime
    with pytest.raises(smb3.SessionError, match="STATUS_ACCESS_DENIED"):
        client.getSMBServer().setInfo(tree, readable, times.getData(), smb2.SMB2_0_INFO_FILE,
                                      smb2.SMB2_FILE_BASIC_INFO)

    assert (snapshot_dir / "f").read_bytes() == CONTENT and (snapshot_dir / "f").stat().st_mtime == mtime


def test_writable_share_accepts_put(server, tmp_path, base_dir):
    upload = tmp_path / "upload"
    upload.write_bytes(b"new")
    server.publish(SNAPSHOT_SHARE, str(base_dir), read_only=False)

    result = server.smbclient(f"//127.0.0.1/{SNAPSHOT_SHARE}", "-c", f"put {upload} new")

    assert result.returncode == 0, result.stdout + result.stderr
    assert (base_dir / "new").read_bytes() == b"new"


def test_share_listing_follows_publish_and_unpublish(server, base_dir):
    server.publish(SNAPSHOT_SHARE, str(base_dir), read_only=True)
    assert server.door.share_names() == {"share", SNAPSHOT_SHARE}
    listing = server.smbclient("-L", "127.0.0.1")
    assert SNAPSHOT_SHARE.upper() in listing.stdout, listing.stdout + listing.stderr

    server.run(server.door.unpublish_share(SNAPSHOT_SHARE))

    assert server.door.share_names() == {"share"}
    assert SNAPSHOT_SHARE.upper() not in server.smbclient("-L", "127.0.0.1").stdout
    gone = server.smbclient(f"//127.0.0.1/{SNAPSHOT_SHARE}", "-c", "ls")
    assert refused(gone, "NT_STATUS_BAD_NETWORK_NAME")


def held_open_here(path) -> bool:
    """Whether this process (the server's) has a descriptor on `path`."""
    descriptors = f"/proc/{os.getpid()}/fd"
    with contextlib.suppress(FileNotFoundError):  # a descriptor may close while we look
        return any(os.path.realpath(os.path.join(descriptors, fd)) == str(path) for fd in os.listdir(descriptors))
    return held_open_here(path)


def test_dropped_connection_leaves_no_file_open(server, base_dir):
    """impacket leaks what a vanished client left open: that would keep a snapshot busy for good."""
    client = server.impacket_client()
    tree = client.connectTree("share")
    client.openFile(tree, "f", desiredAccess=smb2.FILE_READ_DATA)
    assert held_open_here(base_dir / "f")

    client.getSMBServer().get_socket().close()

    deadline = time.monotonic() + CLIENT_TIMEOUT
    while held_open_here(base_dir / "f") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not held_open_here(base_dir / "f")


class RecordingHandler(logging.Handler):
    """Stands for the daemon's own log handlers, which hang off the root logger."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.name}: {record.getMessage()}")


def test_captured_ntlm_hash_is_never_logged(server):
    # Not caplog: recent pytest hooks it onto non-propagating loggers too, so it would see
    # impacket's raw records, which never reach the daemon's handlers.
    recording = RecordingHandler()
    root, smb_log = logging.getLogger(), logging.getLogger("fsrvpd.smb")
    saved_level = smb_log.level
    root.addHandler(recording)
    smb_log.setLevel(logging.DEBUG)
    try:
        server.impacket_client().logoff()
    finally:
        root.removeHandler(recording)
        smb_log.setLevel(saved_level)
    text = "\n".join(recording.lines)
    assert "impacket:" in text  # impacket's log does arrive, so the next check means something
    assert f"{USER}::" not in text.lower()


def test_stop_ends_open_pipes_and_connections(loop, base_dir):
    pipe_closed = threading.Event()

    async def hold_until_closed(reader, writer, caller):
        await reader.read()
        pipe_closed.set()

    served = Server(loop, str(base_dir), hold_until_closed)
    client = served.impacket_client()
    ipc = client.connectTree("IPC$")
    pipe = client.openFile(ipc, PIPE_NAME, desiredAccess=smb2.FILE_READ_DATA | smb2.FILE_WRITE_DATA)

    def read_pipe():
        with contextlib.suppress(Exception):  # what a read cut short by stop() answers does not matter here
            client.readFile(ipc, pipe)

    reading = threading.Thread(target=read_pipe)
    reading.start()
    time.sleep(0.2)  # lets the read park impacket's connection thread on the pipe

    served.stop()

    assert pipe_closed.wait(CLIENT_TIMEOUT)
    reading.join(CLIENT_TIMEOUT)
    assert not reading.is_alive()


def test_restarts_on_the_same_port(loop, base_dir):
    first = Server(loop, str(base_dir), PipeRecorder())
    first.impacket_client().connectTree("share")  # leaves a connection open across stop()
    first.stop()

    again = Server(loop, str(base_dir), PipeRecorder(), port=first.door.port)
    try:
        assert again.impacket_client().listPath("share", "f")
    finally:
        again.stop()

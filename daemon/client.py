"""Our FSRVP client: impacket carries DCE/RPC over SMB, our own messages.py makes the stubs.

Tests and benchmarks drive the daemon with it.  It sends exactly the bytes messages.py encodes
(impacket's NDR structures are not involved), so `raw_rpc_call` can also send malformed stubs.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from typing import Any

from impacket import hresult_errors, smbconnection
from impacket.nmb import NetBIOSError
from impacket.dcerpc.v5 import rpcrt, transport
from impacket.uuid import uuidtup_to_bin

from . import messages as m
from .constants import ATTR_AUTO_RECOVERY, FSRVP_INTERFACE_UUID, FSRVP_INTERFACE_VERSION, PIPE_NAME, HResult
from .dcerpc import ends_request
from .ndr import NdrError

# Timeouts the Windows client uses (MS-FSRVP 3.2.3, product notes 11-13).
PREPARE_TIMEOUT_MS = 1_800_000
COMMIT_TIMEOUT_MS = 60_000
EXPOSE_TIMEOUT_MS = 60_000

_FAULT_STATUS_OF_MESSAGE = {message: status for status, message in rpcrt.rpc_status_codes.items()}
_FAULT_STATUS_OF_MESSAGE.update({f"{short} - {verbose}": status
                                 for status, (short, verbose) in hresult_errors.ERROR_MESSAGES.items()})
_UNKNOWN_FAULT = re.compile(r"fault status code: ([0-9a-fA-F]{8})$")


class FsrvpError(Exception):
    """The server answered an operation with a non-zero HRESULT."""

    def __init__(self, operation: str, result: int) -> None:
        try:
            name = HResult(result).name
        except ValueError:
            name = "unknown HRESULT"
        super().__init__(f"{operation} failed: {result:#010x} ({name})")
        self.operation = operation
        self.result = result


class RpcFault(Exception):
    """The server answered a call with a DCE/RPC fault PDU instead of a response."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class _TransceivingPipe(transport.SMBTransport):
    """The pipe as Windows' RPC runtime and Samba's rpcclient use it: a request's last fragment goes
    out, and its answer comes back, in one FSCTL_PIPE_TRANSCEIVE (one SMB round trip per call
    instead of a WRITE and a READ).  Binds and AUTH3 (which has no answer) are written as before."""

    _unanswered: bytes | None = None

    def send(self, data, forceWriteAndx=0, forceRecv=0):  # impacket's names: it passes them by keyword
        if ends_request(data):
            self._unanswered = data
        else:
            super().send(data, forceWriteAndx, forceRecv)

    def recv(self, forceRecv=0, count=0):
        if self._unanswered is None:  # an answer's further fragments, or a bind's answer
            return super().recv(forceRecv, count)
        request, self._unanswered = self._unanswered, None
        # impacket keeps the pipe's tree and file ids private to SMBTransport
        return self.get_smb_connection().transactNamedPipe(self._SMBTransport__tid, self._SMBTransport__handle,
                                                           request)


def _fault_status(message: str) -> int | None:
    """impacket reports a fault as text only; recover the status it came from."""
    if message in _FAULT_STATUS_OF_MESSAGE:
        return _FAULT_STATUS_OF_MESSAGE[message]
    unknown = _UNKNOWN_FAULT.search(message)
    return int(unknown.group(1), 16) if unknown else None


class FsrvpClient:
    """One bound FssagentRpc pipe.

    Credentials authenticate the SMB session and, with NTLM, the RPC bind at `rpc_auth_level`
    (rpcrt.RPC_C_AUTHN_LEVEL_*): packet privacy by default, as MS-FSRVP asks of clients.  None
    binds unauthenticated, which Samba and fsrvpd with `rpc.min_auth_level: none` accept over an
    authenticated SMB session.
    `timeout` bounds every SMB wait, so it must outlast the longest Commit or Prepare expected.
    """

    def __init__(self, host: str, port: int = 445, username: str = "", password: str = "", domain: str = "",
                 nthash: str = "", server_name: str | None = None, *, timeout: float = 300.0,
                 rpc_auth_level: int | None = rpcrt.RPC_C_AUTHN_LEVEL_PKT_PRIVACY) -> None:
        self.host = host
        self.port = port
        self.server_name = server_name or host
        self._credentials = (username, password, domain, nthash)
        self._timeout = timeout
        self._rpc_auth_level = rpc_auth_level
        self._dce: Any = None

    # -- connection -----------------------------------------------------------------------------
    def connect(self) -> None:
        username, password, domain, nthash = self._credentials
        pipe = _TransceivingPipe(self.host, dstport=self.port, filename="\\" + PIPE_NAME, username=username,
                                 password=password, domain=domain, nthash=nthash)
        pipe.set_connect_timeout(self._timeout)
        dce = pipe.get_dce_rpc()
        if self._rpc_auth_level is not None:
            dce.set_credentials(*pipe.get_credentials())
            dce.set_auth_type(rpcrt.RPC_C_AUTHN_WINNT)
            dce.set_auth_level(self._rpc_auth_level)
        dce.connect()
        try:
            major, minor = FSRVP_INTERFACE_VERSION
            dce.bind(uuidtup_to_bin((str(FSRVP_INTERFACE_UUID), f"{major}.{minor}")))
        except Exception:
            dce.disconnect()
            raise
        self._dce = dce

    def close(self) -> None:
        """Hang up; a connection the server already dropped (it crashed, say) is just forgotten."""
        if self._dce is not None:
            dce, self._dce = self._dce, None
            with contextlib.suppress(OSError, NetBIOSError, smbconnection.SessionError):
                dce.disconnect()

    def __enter__(self) -> FsrvpClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------------------
    def raw_rpc_call(self, opnum: int, stub: bytes) -> bytes:
        """Sends any stub under any opnum; the response stub, or RpcFault."""
        if self._dce is None:
            raise RuntimeError("FsrvpClient is not connected")
        try:
            self._dce.call(opnum, stub)
            return self._dce.recv()
        except rpcrt.DCERPCException as exc:
            message = exc.error_string or str(exc)
            raise RpcFault(message, _fault_status(message)) from exc

    def call(self, request: Any) -> Any:
        """The response dataclass, whatever its result."""
        opnum, stub = m.encode_request(request)
        return m.decode_response(opnum, self.raw_rpc_call(opnum, stub))

    def _succeed(self, request: Any) -> Any:
        response = self.call(request)
        if response.result != 0:
            raise FsrvpError(type(request).__name__.removesuffix("Request"), response.result)
        return response

    def unc(self, share: str) -> str:
        """A full UNC as given; a plain share name as \\\\server_name\\share\\ (what diskshadow sends)."""
        return share if share.startswith("\\\\") else f"\\\\{self.server_name}\\{share}\\"

    # -- operations -------------------------------------------------------------------------------
    def get_supported_version(self) -> tuple[int, int]:
        response = self._succeed(m.GetSupportedVersionRequest())
        return response.min_version, response.max_version

    def set_context(self, context: int) -> None:
        self._succeed(m.SetContextRequest(context))

    def start_shadow_copy_set(self, client_set_id: uuid.UUID | None = None) -> uuid.UUID:
        return self._succeed(m.StartShadowCopySetRequest(client_set_id or uuid.uuid4())).set_id

    def add_to_shadow_copy_set(self, set_id: uuid.UUID, share: str,
                               client_copy_id: uuid.UUID | None = None) -> uuid.UUID:
        request = m.AddToShadowCopySetRequest(client_copy_id or uuid.uuid4(), set_id, self.unc(share))
        return self._succeed(request).copy_id

    def prepare(self, set_id: uuid.UUID, timeout_ms: int = PREPARE_TIMEOUT_MS) -> None:
        self._succeed(m.PrepareShadowCopySetRequest(set_id, timeout_ms))

    def commit(self, set_id: uuid.UUID, timeout_ms: int = COMMIT_TIMEOUT_MS) -> None:
        self._succeed(m.CommitShadowCopySetRequest(set_id, timeout_ms))

    def expose(self, set_id: uuid.UUID, timeout_ms: int = EXPOSE_TIMEOUT_MS) -> None:
        self._succeed(m.ExposeShadowCopySetRequest(set_id, timeout_ms))

    def recovery_complete(self, set_id: uuid.UUID) -> None:
        self._succeed(m.RecoveryCompleteShadowCopySetRequest(set_id))

    def abort(self, set_id: uuid.UUID) -> None:
        self._succeed(m.AbortShadowCopySetRequest(set_id))

    def is_path_supported(self, share: str) -> tuple[bool, str | None]:
        response = self._succeed(m.IsPathSupportedRequest(self.unc(share)))
        return response.supported, response.owner_machine_name

    def is_path_shadow_copied(self, share: str) -> tuple[bool, int]:
        response = self._succeed(m.IsPathShadowCopiedRequest(self.unc(share)))
        return response.present, response.compatibility

    def get_share_mapping(self, set_id: uuid.UUID, copy_id: uuid.UUID, share: str) -> m.ShareMapping1:
        request = m.GetShareMappingRequest(copy_id, set_id, self.unc(share), m.SHARE_MAPPING_LEVEL_1)
        response = self._succeed(request)
        if response.level != m.SHARE_MAPPING_LEVEL_1 or response.mapping is None:
            raise NdrError(f"GetShareMapping succeeded without a level 1 mapping (level {response.level})")
        return response.mapping

    def delete_share_mapping(self, set_id: uuid.UUID, copy_id: uuid.UUID, share: str) -> None:
        self._succeed(m.DeleteShareMappingRequest(set_id, copy_id, self.unc(share)))

    def backup_cycle(self, shares: list[str], context: int = 0, auto_recovery: bool = False) -> list[m.ShareMapping1]:
        """SetContext, Start, Add each share, Prepare, Commit, Expose; the mappings, in share order.

        The set is left Exposed: RecoveryComplete and DeleteShareMapping are the caller's.  If a
        step before Expose fails, the set is aborted (as a Windows client does) and the error raised.
        """
        self.set_context(context | ATTR_AUTO_RECOVERY if auto_recovery else context)
        set_id = self.start_shadow_copy_set()
        try:
            copy_ids = [self.add_to_shadow_copy_set(set_id, share) for share in shares]
            self.prepare(set_id)
            self.commit(set_id)
            self.expose(set_id)
        except (FsrvpError, RpcFault):
            self._abort_quietly(set_id)
            raise
        return [self.get_share_mapping(set_id, copy_id, share) for copy_id, share in zip(copy_ids, shares)]

    def _abort_quietly(self, set_id: uuid.UUID) -> None:
        """Best effort: the original failure is what the caller needs to see."""
        try:
            self.abort(set_id)
        except (FsrvpError, RpcFault):
            pass

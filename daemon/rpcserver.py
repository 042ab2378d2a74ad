"""One FSRVP pipe connection: bytes from the front door through DCE/RPC and NDR to the service.

This is the thin I/O adapter around the sans-I/O layers (dcerpc.py, messages.py): it reads the
stream, feeds the PDU layer, answers each call and writes what the layer wants sent.  A bad PDU
or stub costs the client a fault or its connection, never the daemon.

Policy lives here too: the minimum RPC authentication level (calls below it get E_ACCESSDENIED,
as MS-FSRVP 3.1.4 says) and the per-client limits on open pipes and calls per second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

from . import dcerpc
from . import logs
from . import messages
from .config import MIN_AUTH_LEVELS, Config, Limits
from .constants import FSRVP_INTERFACE_UUID, FSRVP_INTERFACE_VERSION, HResult, Opnum, hresult_name
from .ndr import NdrError
from .ntlm import Accounts, NtlmContext
from .rpcauth import AuthLevel, AuthType, SecurityProviders
from .service import FsrvpService
from .spnego import SpnegoContext
from .transports.base import Caller

log = logging.getLogger("fsrvpd.rpc")

READ_SIZE = 65536
_LEVEL_SETTING = {level: name for name, level in MIN_AUTH_LEVELS.items()}


def security_providers(accounts: Accounts, domain: str, server_name: str,
                       dns_name: str | None = None) -> SecurityProviders:
    """NTLMSSP, bare and inside SPNEGO, checked against the front door's accounts."""

    def ntlm(level: AuthLevel) -> NtlmContext:
        return NtlmContext(level, accounts, domain, server_name, clock=time.time, dns_name=dns_name)

    return {AuthType.WINNT: ntlm, AuthType.GSS_NEGOTIATE: lambda level: SpnegoContext(ntlm(level))}


@dataclasses.dataclass(frozen=True)
class PipeSettings:
    """What every pipe needs from the configuration."""

    min_auth_level: AuthLevel
    security_providers: SecurityProviders
    limits: Limits

    @classmethod
    def from_config(cls, config: Config, accounts: Accounts) -> PipeSettings:
        providers = security_providers(accounts, config.domain, config.netbios_name, config.fqdn)
        return cls(config.min_auth_level, providers, config.limits)


class ClientLimits:
    """Per client address, shared by all its pipes: how many may be open, and a call rate.

    The rate is a token bucket holding one second's worth of calls, so a client may burst up to
    `calls_per_second` calls and then proceeds at that rate."""

    def __init__(self, max_connections: int, calls_per_second: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_connections = max_connections
        self._rate = calls_per_second
        self._clock = clock
        self._open: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)

    def open(self, address: str) -> bool:
        """Count a new pipe of `address`; False (and not counted) if it would exceed the limit."""
        self._forget_idle_clients()
        if self._open.get(address, 0) >= self._max_connections:
            return False
        self._open[address] = self._open.get(address, 0) + 1
        return True

    def close(self, address: str) -> None:
        self._open[address] -= 1
        if not self._open[address]:
            del self._open[address]

    def allow_call(self, address: str) -> bool:
        tokens = self._tokens(address)
        allowed = tokens >= 1
        self._buckets[address] = (tokens - 1 if allowed else tokens, self._clock())
        return allowed

    def _tokens(self, address: str) -> float:
        now = self._clock()
        tokens, then = self._buckets.get(address, (self._rate, now))
        return min(self._rate, tokens + (now - then) * self._rate)

    def _forget_idle_clients(self) -> None:
        """Drop the buckets of clients with no pipe open once they have refilled: reconnecting
        must not buy a fresh burst, and departed clients must not pile up."""
        for address in [address for address in self._buckets if address not in self._open]:
            if self._tokens(address) >= self._rate:
                del self._buckets[address]


async def serve_pipe(service: FsrvpService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     caller: Caller, settings: PipeSettings, clients: ClientLimits) -> None:
    """Serve one opened pipe until the client closes it or the PDU layer gives up on it."""
    admitted = clients.open(caller.address)
    if not admitted:
        log.warning("refusing another pipe from %s: it already has %d open (limits.max_connections_per_client)",
                    caller.address, settings.limits.max_connections_per_client)
    connection = dcerpc.ServerConnection(
        {FSRVP_INTERFACE_UUID: FSRVP_INTERFACE_VERSION}, max_recv_frag=settings.limits.max_fragment_bytes,
        max_xmit_frag=settings.limits.max_fragment_bytes, max_call_bytes=settings.limits.max_request_bytes,
        security_providers=settings.security_providers,
        refuse_binds=None if admitted else dcerpc.BindNakReason.LOCAL_LIMIT_EXCEEDED)
    log.debug("pipe opened by %s\\%s from %s", caller.domain, caller.user, caller.address)
    try:
        while not connection.closed:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            for event in await receive(connection, data):
                if isinstance(event, dcerpc.ConnectionClosed):
                    log.info("closing pipe of %s: %s", caller.address, event.reason)
                elif isinstance(event, dcerpc.AuthenticationResult):
                    _log_authentication(event, caller)
                elif not connection.closed:
                    await answer(service, connection, event, caller, settings, clients)
            writer.write(connection.data_to_send())
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    except Exception:
        log.exception("pipe of %s failed; dropping that connection", caller.address)
    finally:
        if admitted:
            clients.close(caller.address)
        writer.close()


async def receive(connection: dcerpc.ServerConnection, data: bytes) -> list[dcerpc.Event]:
    """The PDU layer's events for `data`, in a worker thread when it may check a leg of RPC
    authentication: behind smbd the account lookup runs Samba's pdbedit, which must not stall every
    other pipe's calls."""
    if connection.may_authenticate(data):
        return await asyncio.to_thread(connection.receive_data, data)
    return connection.receive_data(data)


def _log_authentication(result: dcerpc.AuthenticationResult, caller: Caller) -> None:
    if result.principal is not None:
        log.info("RPC authentication of %s from %s", result.principal, caller.address)
    else:
        log.warning("RPC authentication from %s failed: %s", caller.address, result.reason)


async def answer(service: FsrvpService, connection: dcerpc.ServerConnection, call: dcerpc.RpcCall,
                 caller: Caller, settings: PipeSettings, clients: ClientLimits) -> None:
    """Answer one call, with its journal fields on every record it logs and its result counted."""
    try:
        operation = Opnum(call.opnum).name
    except ValueError:
        operation = "unknown"
    caller = dataclasses.replace(caller, rpc_principal=call.principal)
    principal = call.principal or caller
    started = time.monotonic()
    with logs.call_fields(**{logs.CLIENT: caller.address, logs.PRINCIPAL: f"{principal.domain}\\{principal.user}",
                             logs.OPERATION: operation}):
        result = await _answer(service, connection, call, caller, operation, settings, clients)
    service.observer.call_answered(operation, result, time.monotonic() - started)


async def _answer(service: FsrvpService, connection: dcerpc.ServerConnection, call: dcerpc.RpcCall,
                  caller: Caller, operation: str, settings: PipeSettings, clients: ClientLimits) -> int:
    """Send the response or a fault; returns the HRESULT answered or the fault status."""
    if not clients.allow_call(caller.address):
        log.warning("call from %s refused: over limits.max_calls_per_second (%g)", caller.address,
                    settings.limits.max_calls_per_second)
        connection.send_fault(call, dcerpc.RPC_S_SERVER_TOO_BUSY)
        return dcerpc.RPC_S_SERVER_TOO_BUSY
    try:
        request = messages.decode_request(call.opnum, call.stub, settings.limits.max_string_chars)
    except messages.UnknownOpnum:
        log.info("unknown opnum %d from %s", call.opnum, caller.address)
        connection.send_fault(call, dcerpc.NCA_S_OP_RNG_ERROR)
        return dcerpc.NCA_S_OP_RNG_ERROR
    except NdrError as exc:
        log.info("undecodable %s stub from %s: %s", operation, caller.address, exc)
        connection.send_fault(call, dcerpc.NCA_S_FAULT_NDR)
        return dcerpc.NCA_S_FAULT_NDR
    level = call.principal.level if call.principal else AuthLevel.NONE
    if level < settings.min_auth_level:
        # MS-FSRVP 3.1.4: a caller below the required authentication level gets E_ACCESSDENIED.
        log.warning("%s from %s denied: RPC authentication %s is below rpc.min_auth_level %s", operation,
                    caller.address, call.principal or "none", _LEVEL_SETTING[settings.min_auth_level],
                    extra={logs.HRESULT: f"{HResult.E_ACCESSDENIED:#010x}"})
        connection.send_response(call, messages.encode_response(
            call.opnum, messages.failure_response(request, HResult.E_ACCESSDENIED)))
        return HResult.E_ACCESSDENIED
    with logs.call_fields(**{logs.SET_ID: getattr(request, "set_id", None),
                             logs.SHARE: getattr(request, "share_name", None)}):
        try:
            response = await service.handle(request, caller)
        except Exception:
            log.exception("%s from %s failed inside fsrvpd", operation, caller.address)
            connection.send_fault(call, HResult.E_UNEXPECTED)
            return HResult.E_UNEXPECTED
        log.log(logging.DEBUG if response.result == HResult.S_OK else logging.INFO, "%s from %s -> %s", operation,
                caller.address, hresult_name(response.result),
                extra={logs.HRESULT: f"{response.result:#010x}", logs.SET_ID: getattr(response, "set_id", None)
                       or getattr(request, "set_id", None)})
    connection.send_response(call, messages.encode_response(call.opnum, response))
    return response.result

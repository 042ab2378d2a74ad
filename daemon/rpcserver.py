"""One FSRVP pipe connection: bytes from the front door through DCE/RPC and NDR to the service.

This is the thin I/O adapter around the sans-I/O layers (dcerpc.py, messages.py): it reads the
stream, feeds the PDU layer, answers each call and writes what the layer wants sent.  A bad PDU
or stub costs the client a fault or its connection, never the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Mapping

from . import dcerpc
from . import messages
from .constants import FSRVP_INTERFACE_UUID, FSRVP_INTERFACE_VERSION, HResult, Opnum
from .ndr import NdrError
from .ntlm import NtHashAccounts, NtlmContext
from .rpcauth import AuthLevel, AuthType, SecurityProviders
from .service import FsrvpService
from .spnego import SpnegoContext
from .transports.base import Caller

log = logging.getLogger("fsrvpd.rpc")

READ_SIZE = 65536


def embedded_security_providers(nt_hashes: Mapping[str, str], domain: str, server_name: str,
                                dns_name: str | None = None) -> SecurityProviders:
    """NTLMSSP, bare and inside SPNEGO, checked against the configured users' NT hashes."""
    accounts = NtHashAccounts(nt_hashes)

    def ntlm(level: AuthLevel) -> NtlmContext:
        return NtlmContext(level, accounts, domain, server_name, clock=time.time, dns_name=dns_name)

    return {AuthType.WINNT: ntlm, AuthType.GSS_NEGOTIATE: lambda level: SpnegoContext(ntlm(level))}


async def serve_pipe(service: FsrvpService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     caller: Caller) -> None:
    """Serve one opened pipe until the client closes it or the PDU layer gives up on it."""
    connection = dcerpc.ServerConnection({FSRVP_INTERFACE_UUID: FSRVP_INTERFACE_VERSION})
    log.debug("pipe opened by %s\\%s from %s", caller.domain, caller.user, caller.address)
    try:
        while not connection.closed:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, dcerpc.ConnectionClosed):
                    log.info("closing pipe of %s: %s", caller.address, event.reason)
                elif not connection.closed:
                    await answer(service, connection, event, caller)
            writer.write(connection.data_to_send())
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    except Exception:
        log.exception("pipe of %s failed; dropping that connection", caller.address)
    finally:
        writer.close()


async def answer(service: FsrvpService, connection: dcerpc.ServerConnection, call: dcerpc.RpcCall,
                 caller: Caller) -> None:
    try:
        request = messages.decode_request(call.opnum, call.stub)
    except messages.UnknownOpnum:
        log.info("unknown opnum %d from %s", call.opnum, caller.address)
        connection.send_fault(call, dcerpc.NCA_S_OP_RNG_ERROR)
        return
    except NdrError as exc:
        log.info("undecodable %s stub from %s: %s", Opnum(call.opnum).name, caller.address, exc)
        connection.send_fault(call, dcerpc.NCA_S_FAULT_NDR)
        return
    try:
        response = await service.handle(request, caller)
    except Exception:
        log.exception("%s from %s failed inside fsrvpd", Opnum(call.opnum).name, caller.address)
        connection.send_fault(call, HResult.E_UNEXPECTED)
        return
    log.debug("%s -> %#010x", Opnum(call.opnum).name, response.result)
    connection.send_response(call, messages.encode_response(call.opnum, response))

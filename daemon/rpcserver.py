"""One FSRVP pipe connection: bytes from the front door through DCE/RPC and NDR to the service.

This is the thin I/O adapter around the sans-I/O layers (dcerpc.py, messages.py): it reads the
stream, feeds the PDU layer, answers each call and writes what the layer wants sent.  A bad PDU
or stub costs the client a fault or its connection, never the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import dcerpc
from . import logs
from . import messages
from .constants import FSRVP_INTERFACE_UUID, FSRVP_INTERFACE_VERSION, HResult, Opnum, hresult_name
from .ndr import NdrError
from .service import FsrvpService
from .transports.base import Caller

log = logging.getLogger("fsrvpd.rpc")

READ_SIZE = 65536


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
    """Answer one call, with its journal fields on every record it logs and its result counted."""
    try:
        operation = Opnum(call.opnum).name
    except ValueError:
        operation = "unknown"
    started = time.monotonic()
    with logs.call_fields(**{logs.CLIENT: caller.address, logs.PRINCIPAL: f"{caller.domain}\\{caller.user}",
                             logs.OPERATION: operation}):
        result = await _answer(service, connection, call, caller, operation)
    service.observer.call_answered(operation, result, time.monotonic() - started)


async def _answer(service: FsrvpService, connection: dcerpc.ServerConnection, call: dcerpc.RpcCall,
                  caller: Caller, operation: str) -> int:
    """Send the response or a fault; returns the HRESULT answered or the fault status."""
    try:
        request = messages.decode_request(call.opnum, call.stub)
    except messages.UnknownOpnum:
        log.info("unknown opnum %d from %s", call.opnum, caller.address)
        connection.send_fault(call, dcerpc.NCA_S_OP_RNG_ERROR)
        return dcerpc.NCA_S_OP_RNG_ERROR
    except NdrError as exc:
        log.info("undecodable %s stub from %s: %s", operation, caller.address, exc)
        connection.send_fault(call, dcerpc.NCA_S_FAULT_NDR)
        return dcerpc.NCA_S_FAULT_NDR
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

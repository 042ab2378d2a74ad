"""A DCE/RPC connection with no transport: impacket's client talking straight to a ServerConnection."""

from __future__ import annotations

import struct
from typing import Callable

from fsrvpd import dcerpc

ECHO_FAULT_OPNUM = 99  # the one call the far end faults as an unknown operation


class InMemoryPipe:
    """The transport impacket's DCERPC_v5 drives, delivering straight to a ServerConnection.

    The far end answers each call with its own stub (opnum 99 with nca_s_op_rng_error).  What the
    client sent and the server's events are kept; `tamper` may rewrite each PDU on its way in, and
    subclasses may inspect the server's output in `delivered`."""

    def __init__(self, server: dcerpc.ServerConnection, tamper: Callable[[bytes], bytes] | None = None) -> None:
        self.server = server
        self.tamper = tamper
        self.sent: list[bytes] = []
        self.events: list = []
        self.to_client = bytearray()

    def send(self, data: bytes, forceWriteAndx: int = 0, forceRecv: int = 0) -> None:
        self.sent.append(data)
        for event in self.server.receive_data(self.tamper(data) if self.tamper else data):
            self.events.append(event)
            if isinstance(event, dcerpc.RpcCall) and event.opnum == ECHO_FAULT_OPNUM:
                self.server.send_fault(event, dcerpc.NCA_S_OP_RNG_ERROR)
            elif isinstance(event, dcerpc.RpcCall):
                self.server.send_response(event, event.stub)
        self.delivered(self.server.data_to_send())

    def delivered(self, output: bytes) -> None:
        self.to_client += output

    def recv(self, forceRecv: int = 0, count: int = 0) -> bytes:
        """`count` bytes, or the next whole PDU as a message-mode pipe delivers it."""
        size = count or struct.unpack_from("<H", self.to_client, 8)[0]
        data = bytes(self.to_client[:size])
        del self.to_client[:size]
        return data

    def doesSupportNTLMv2(self) -> bool:
        return True

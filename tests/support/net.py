"""Clients from more than one address on one loopback machine.

FSRVP tells clients apart by IP address (SetContext from another address answers
SET_IN_PROGRESS; from the same one it is a retry that drops the unfinished set).  The kernel
picks 127.0.0.1 as the source of every loopback connection, so `SourceAddressRelay` listens on
127.0.0.1 and forwards each connection to the daemon from another address of 127.0.0.0/8: the
daemon sees a real TCP peer at that address, whatever client connects to the relay.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["SourceAddressRelay"]

CHUNK = 65536


class SourceAddressRelay:
    """Forward connections made to `port` (on 127.0.0.1) to `target`, from `source_address`."""

    def __init__(self, source_address: str, target: tuple[str, int]):
        self.source_address = source_address
        self.target = target
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> SourceAddressRelay:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in list(self._threads):
            thread.join()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by __exit__
            try:
                upstream = socket.create_connection(self.target, source_address=(self.source_address, 0))
            except OSError:  # the daemon is down: the client sees its connection closed, as it would
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(_pump, client, upstream)
            self._spawn(_pump, upstream, client)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(CHUNK):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)

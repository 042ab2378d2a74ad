"""systemd's notification protocol: readiness, reloads, stopping and the watchdog.

Each notification is one datagram of `KEY=VALUE` lines to the socket named by $NOTIFY_SOCKET
(a leading '@' means the abstract namespace).  The protocol is this small and stable, so the
daemon speaks it itself and does not depend on systemd-python for it; not under systemd (no
$NOTIFY_SOCKET) every notification is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("fsrvpd.systemd")


class Notifier:
    """Sends notifications to the service manager, and knows the watchdog's interval."""

    def __init__(self, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        watchdog_usec = environ.get("WATCHDOG_USEC")
        watchdog_pid = environ.get("WATCHDOG_PID")
        for_us = watchdog_pid is None or watchdog_pid == str(os.getpid())
        # systemd's advice: ping at half the interval, so one late ping is not fatal.
        self.watchdog_interval = int(watchdog_usec) / 2e6 if watchdog_usec and for_us else None

    def send(self, **fields: object) -> None:
        if self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> None:
        self.send(RELOADING=1, STATUS="reloading the configuration",
                  MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping: finishing the call in flight")

    async def feed_watchdog(self) -> None:
        """Ping from the event loop itself: if the loop stops turning, the pings stop and systemd
        restarts the daemon (WatchdogSec=)."""
        while True:
            self.send(WATCHDOG=1)
            await asyncio.sleep(self.watchdog_interval)

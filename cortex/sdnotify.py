"""systemd's notify protocol, spoken directly: one datagram per message to ``$NOTIFY_SOCKET``.

The protocol is a few ``KEY=value`` lines sent over a unix datagram socket, so a dependency
(``python-systemd``, ``sdnotify``) would cost more than it saves. Under ``Type=notify`` the gateway says
``READY=1`` once it listens, ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC`` while its loop runs (a hung
loop stops the pings and systemd restarts the service), ``RELOADING=1``/``READY=1`` around a config
reload and ``STOPPING=1`` when it starts draining. Outside systemd (no ``NOTIFY_SOCKET``) every call does
nothing. A failed send is logged once and never raised: readiness reporting must not take the gateway down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

__all__ = ["SdNotify"]

log = logging.getLogger(__name__)


class SdNotify:
    """A sender of systemd notifications (a no-op when ``address`` is empty).

    Args:
        address: the notify socket's path; a leading ``@`` names an abstract socket.
        watchdog_usec: the service's watchdog period in microseconds (0 = no watchdog).
    """

    def __init__(self, address: str = "", *, watchdog_usec: int = 0) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls) -> SdNotify:
        """Read ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` (honoured only when ``WATCHDOG_PID`` is unset or ours)."""
        address = os.environ.get("NOTIFY_SOCKET", "")
        usec = 0
        pid = os.environ.get("WATCHDOG_PID", "")
        if not pid or pid == str(os.getpid()):
            try:
                usec = max(0, int(os.environ.get("WATCHDOG_USEC", "0")))
            except ValueError:
                usec = 0
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to tell."""
        return bool(self.address)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping the watchdog: half its period, as systemd recommends (None = no watchdog)."""
        if not self.enabled or self.watchdog_usec <= 0:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message; True when it was sent."""
        if not self.enabled:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``: the gateway listens and serves."""
        return self.send("READY=1", *((f"STATUS={status}",) if status else ()))

    def reloading(self) -> bool:
        """``RELOADING=1`` with the monotonic time systemd wants beside it; follow with :meth:`ready`."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1``: draining has begun."""
        return self.send("STOPPING=1", *((f"STATUS={status}",) if status else ()))

    async def watchdog(self) -> None:
        """Ping the watchdog at :attr:`watchdog_interval_s` until cancelled (returns at once without one).

        The pings come from the event loop itself, so a loop stuck in a long synchronous call misses them
        and systemd restarts the service, which is the point of the watchdog.
        """
        interval = self.watchdog_interval_s
        if interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Close the socket (sending again reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

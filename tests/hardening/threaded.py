"""A raw TCP node on its own thread, for what an asyncio server cannot stage: the kernel's timing.

A node served from the test's own loop can only act when that loop runs, so it cannot close a connection
(or send stray bytes) *between* asyncio's last poll and cortex's next write. This one runs plain blocking
sockets on a thread: the test blocks its loop for a moment, the node acts, and the bytes or the FIN sit
unread in cortex's socket, exactly the race a pool must survive.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

__all__ = ["ThreadedNode", "read_request"]


def read_request(conn: socket.socket) -> bytes:
    """One request (head and Content-Length body) from a blocking socket; b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


class ThreadedNode:
    """Accepts connections on loopback and runs ``serve(conn, index)`` for each, one thread per connection."""

    def __init__(self, serve: Callable[[socket.socket, int], None]) -> None:
        self._serve = serve
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> ThreadedNode:
        self._acceptor.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._acceptor.join(5)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv (close alone does not)
        for thread in self._threads:
            thread.join(5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5.0)
            index = self.accepted
            self.accepted += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._run, args=(conn, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket, index: int) -> None:
        try:
            self._serve(conn, index)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

"""A loopback packet tap: kernel timestamps of the HTTP traffic to and from one port.

Used by ``bench/cold_load.py`` to time cortex's release of queued requests *on the wire*: the kernel stamps
each packet as it is sent over ``lo``, so when cortex wrote a request is measured independently of how busy
the receiving process is (a Python simulator takes ~0.5 ms per request to accept, which would otherwise be
counted against cortex).

It is a raw ``AF_PACKET`` socket bound to ``lo`` (root or ``CAP_NET_RAW``); every packet carries the stamp
the kernel gave it when it queued it (``SO_TIMESTAMPNS``, ``CLOCK_REALTIME``). Only differences between two
packets of one capture are reported, so the clock's epoch never matters. Loopback shows each packet twice
(once going out, once coming in, the same instant); only the outgoing copy is kept.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
SOL_PACKET = 263
PACKET_STATISTICS = 6
ETH_HLEN = 14


@dataclass(frozen=True, slots=True)
class Packet:
    at: float
    """Kernel timestamp, seconds (``CLOCK_REALTIME``: compare packets of one capture only)."""
    src: int
    dst: int
    payload: bytes
    """The first bytes of the TCP payload (enough to tell requests and answers apart)."""


class WireTap:
    """Capture TCP packets with a payload to or from ``port`` on ``lo`` while the context is open.

    Nothing reads the socket while traffic is being measured: the kernel stamps each packet as it queues it
    on the socket, so the packets are only read (and parsed) when asked for, after the measured round. A
    reading thread would compete for the CPU with the processes being timed. The queue is 64 MiB; the
    kernel's drop counter is checked on every read, and a round with drops is reported, not trusted.
    """

    def __init__(self, port: int, keep_bytes: int = 256) -> None:
        self.port = port
        self.keep = keep_bytes
        self.packets: list[Packet] = []
        self.dropped = 0
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.bind(("lo", 0))
        self._sock.setblocking(False)

    def __enter__(self) -> WireTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def captured(self) -> list[Packet]:
        """The packets captured since the last :meth:`clear` (read from the socket now)."""
        self._drain()
        return list(self.packets)

    def clear(self) -> None:
        """Forget every packet so far, and the drop count."""
        self._drain()
        self.packets.clear()
        self.dropped = 0

    def _drain(self) -> None:
        sock = self._sock
        while True:
            try:
                data, anc, _flags, addr = sock.recvmsg(65600, 64)
            except BlockingIOError:
                break
            if addr[2] != PACKET_OUTGOING:
                continue
            pkt = self._parse(data, anc)
            if pkt is not None:
                self.packets.append(pkt)
        _received, dropped = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.dropped += dropped

    def _parse(self, data: bytes, anc: list[tuple[int, int, bytes]]) -> Packet | None:
        if len(data) < ETH_HLEN + 20 or data[12:14] != b"\x08\x00":
            return None  # IPv4 only: the benchmarks bind 127.0.0.1
        ip = data[ETH_HLEN:]
        if ip[9] != socket.IPPROTO_TCP:
            return None
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        tcp = ip[ihl:total]
        src, dst = struct.unpack_from("!HH", tcp, 0)
        if self.port not in (src, dst):
            return None
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if not payload:
            return None
        at = 0.0
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                at = sec + nsec / 1e9
        return Packet(at, src, dst, bytes(payload[: self.keep]))


def released(
    packets: list[Packet], port: int, path: bytes, answer_mark: bytes, request_path: bytes
) -> dict[str, object]:
    """From the node's answer to the request for ``path`` that contains ``answer_mark`` (the ``loaded``
    reload answer) to each later request for ``request_path`` sent to ``port``: milliseconds, sorted."""
    asked: dict[int, bool] = {}
    loaded_at: float | None = None
    sends: list[float] = []
    for p in packets:
        if p.dst == port:
            if p.payload.startswith(b"POST " + path):
                asked[p.src] = True
            elif loaded_at is not None and p.payload.startswith(b"POST " + request_path):
                sends.append(p.at)
        elif p.src == port and loaded_at is None and asked.get(p.dst) and answer_mark in p.payload:
            loaded_at = p.at
    if loaded_at is None:
        return {"loaded_seen": False, "sends_ms": []}
    return {"loaded_seen": True, "loaded_at": loaded_at, "sends_ms": sorted((t - loaded_at) * 1e3 for t in sends)}

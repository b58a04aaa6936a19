"""A minimal HTTP/1.1 client over a raw socket: it sends exactly the bytes a test wrote.

aiohttp (and every SDK) refuses to send a header that is not Latin-1, a raw ``\\xff``, a broken chunk or a
body that disagrees with its ``Content-Length``; hostile clients do not. Replies are parsed just enough for
assertions (status, headers, a ``Content-Length`` or chunked body, or one read to close).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Reply", "exchange", "request_bytes"]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    method: bytes = b"POST",
    host: bytes = b"127.0.0.1",
    length: bool = True,
) -> bytes:
    """One request's bytes; ``Content-Length`` is added unless ``length`` is False or a header sets it."""
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: " + host, b"Connection: close"]
    given = headers or []
    names = {name.lower() for name, _ in given}
    if length and b"content-length" not in names and b"transfer-encoding" not in names:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.extend(name + b": " + value for name, value in given)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def exchange(port: int, raw: bytes, *, timeout_s: float = 5.0) -> Reply:
    """Send ``raw`` on a new connection and read one reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(raw)
            await writer.drain()
            return await read_reply(reader)
    finally:
        writer.transport.abort()


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return Reply(status, headers, body)

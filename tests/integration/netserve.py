"""A tiny TCP service that plays a remote server in integration tests (run in a
network namespace by ``netns.TcpService``; standard library only).

    python netserve.py MODE ADDRESS PORT REPORTS READY [BYTES]
    python netserve.py client ADDRESS PORT TEXT

MODE ``echo``: read until the client half-closes, answer ``PEER_IP DATA`` and close
(so a guest learns which address it was seen from: masquerading shows). ``sink``: read
until EOF, answer one JSON line ``{"peer", "bytes", "seconds", "steady_bytes",
"steady_seconds"}`` and close: seconds from the first to the last byte, and the same
for what came after the first :data:`STEADY_AFTER` seconds (a policer's bucket lets a
start-up burst through). ``http``: answer any request with BYTES bytes (HTTP/1.0).
Every finished connection appends its JSON report to REPORTS; READY is created once
listening.
``client`` connects, sends TEXT, half-closes and prints what comes back (exit 1 if the
connection fails within 10 s).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

CHUNK = 1 << 16
IDLE = 120.0  # a connection idle this long is dropped
STEADY_AFTER = 2.0


async def main(mode: str, address: str, port: int, reports: Path, ready: Path,
               nbytes: int) -> None:
    def report(entry: dict[str, object]) -> None:
        with reports.open("a") as out:
            out.write(json.dumps(entry) + "\n")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            if mode == "http":
                while (await asyncio.wait_for(reader.readline(), IDLE)).strip():
                    pass
                writer.write(f"HTTP/1.0 200 OK\r\nContent-Length: {nbytes}\r\n"
                             "Content-Type: application/octet-stream\r\n\r\n".encode())
                block, sent = b"\0" * CHUNK, 0
                while sent < nbytes:
                    writer.write(block[: min(CHUNK, nbytes - sent)])
                    sent += min(CHUNK, nbytes - sent)
                    await asyncio.wait_for(writer.drain(), IDLE)
                entry = {"peer": peer, "bytes": sent}
            else:
                data, total, first, last = b"", 0, 0.0, 0.0
                steady_from, steady_base = 0.0, 0
                while chunk := await asyncio.wait_for(reader.read(CHUNK), IDLE):
                    last = time.monotonic()
                    first = first or last
                    if not steady_from and last - first >= STEADY_AFTER:
                        steady_from, steady_base = last, total
                    total += len(chunk)
                    if mode == "echo" and len(data) < 4096:
                        data += chunk
                entry = {"peer": peer, "bytes": total, "seconds": last - first,
                         "steady_bytes": total - steady_base if steady_from else 0,
                         "steady_seconds": last - steady_from if steady_from else 0.0}
                if mode == "echo":
                    writer.write(f"{peer} ".encode() + data)
                else:
                    writer.write(json.dumps(entry).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), IDLE)
            report(entry)
        except (OSError, TimeoutError) as exc:
            report({"peer": peer, "error": str(exc)})
        finally:
            writer.close()

    server = await asyncio.start_server(serve, address, port, reuse_address=True)
    ready.touch()
    async with server:
        await server.serve_forever()


async def client(address: str, port: int, text: str) -> int:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 10)
        writer.write(text.encode())
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 30)
    except (OSError, TimeoutError) as exc:
        print(f"netserve client: {address}:{port}: {exc}", file=sys.stderr)
        return 1
    writer.close()
    sys.stdout.write(answer.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "client":
        sys.exit(asyncio.run(client(args[1], int(args[2]), args[3])))
    asyncio.run(main(args[0], args[1], int(args[2]), Path(args[3]), Path(args[4]),
                     int(args[5]) if len(args) > 5 else 0))

"""A slowloris attacker for the tests, run as its own process (its TLS handshakes must not
share a GIL with the server under test).

    python tests/slowloris_support.py HOST PORT TLS_PARTIAL TCP_IDLE HOLD_SECONDS

Opens TLS_PARTIAL TLS connections (no client certificate) that each send a request line
and one header but never the blank line ending the headers, and TCP_IDLE plain TCP
connections that never start the TLS handshake. Prints ``held N`` once all are open
(N: how many are open at that moment),
then waits (at most HOLD_SECONDS) for the server to close each, and prints one JSON line:
how many were opened, how many the server closed, and the longest time a connection
stayed open after it was established.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
import time

#: handshakes in flight at once (the server's accept backlog is not the point here)
CONCURRENT_OPENS = 64


class _Attack:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.open = 0
        self.failed = 0
        self.closed = 0
        self.gate = asyncio.Semaphore(CONCURRENT_OPENS)
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE  # an attacker does not care who the server is

    async def connection(self, *, tls: bool) -> float | None:
        """Open one connection and hold it until the server closes it: seconds held
        (``None``: it could not be opened)."""
        try:
            async with self.gate:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self.ctx if tls else None
                )
                if tls:  # a request line and one header, never the blank line
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: otaguard\r\n")
                    await writer.drain()
        except (OSError, ssl.SSLError):
            self.failed += 1
            return None
        self.open += 1
        opened = time.monotonic()
        with contextlib.suppress(OSError, ssl.SSLError):
            await reader.read(1024)  # b"" or a reset once the server closes
        held = time.monotonic() - opened
        self.closed += 1
        writer.transport.abort()
        return held


async def _main(host: str, port: int, n_tls: int, n_tcp: int, hold: float) -> dict[str, object]:
    attack = _Attack(host, port)
    tasks = [asyncio.ensure_future(attack.connection(tls=False)) for _ in range(n_tcp)]
    tasks += [asyncio.ensure_future(attack.connection(tls=True)) for _ in range(n_tls)]
    started = time.monotonic()
    while attack.open + attack.failed < len(tasks) and time.monotonic() - started < hold:
        await asyncio.sleep(0.01)
    # open at once: established and not yet closed by the server
    print(f"held {attack.open - attack.closed}", flush=True)
    print(f"opening took {time.monotonic() - started:.2f} s", file=sys.stderr, flush=True)
    done, pending = await asyncio.wait(tasks, timeout=hold)
    for task in pending:
        task.cancel()
    held = [h for t in done if (h := t.result()) is not None]
    return {
        "opened": attack.open,
        "failed": attack.failed,
        "closed_by_server": len(held),
        "longest_held": max(held, default=0.0),
    }


if __name__ == "__main__":
    host, port, n_tls, n_tcp, hold = sys.argv[1:6]
    result = asyncio.run(_main(host, int(port), int(n_tls), int(n_tcp), float(hold)))
    print(json.dumps(result), flush=True)

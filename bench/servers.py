"""Loopback SMTP servers for the benchmarks, run as a process of their own.

``python -m bench.servers --plain 1 --starttls 1 --slow 4 --chain server.pem``

* ``plain`` / ``starttls``: real aiosmtpd servers (STARTTLS required before anything
  but EHLO/NOOP/QUIT in ``starttls``), presenting the certificate in ``--chain``;
* ``slow``: a raw asyncio ESMTP responder that waits ``--banner-delay`` seconds before
  its greeting on every connection, then answers EHLO and QUIT (the sweep's fault),
  each reply after ``--reply-delay`` seconds (default 0: at once). With both delays
  equal, every reply line the server sends comes that long after what it answers.

Each binds 127.0.0.1 port 0 and keeps its socket; once all listen, one JSON line
``{"plain": [...], "starttls": [...], "slow": [...]}`` goes to stdout. The process
serves until its standard input closes (the benchmark ended or died).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from bench.common import LOOPBACK, SERVER_NAMES, raise_open_files_limit

#: Listen backlog: a sweep connects hundreds of sessions at once, and asyncio's default
#: (100) would drop SYNs, turning a 200 ms banner delay into a 1 s SYN retransmit.
BACKLOG = 4096
DEFAULT_BANNER_DELAY = 0.2
DEFAULT_REPLY_DELAY = 0.0
SLOW_GREETING = b"220 localhost ESMTP bench (slow banner)\r\n"
SLOW_EHLO_REPLY = b"250-localhost\r\n250-8BITMIME\r\n250 SIZE 35882577\r\n"
SLOW_QUIT_REPLY = b"221 2.0.0 Bye\r\n"
SLOW_OTHER_REPLY = b"250 2.0.0 OK\r\n"
MAX_LINE = 4096


class _QuietHandler:
    """aiosmtpd handler that counts failed STARTTLS handshakes instead of logging each.

    The fallback benchmark makes every native-trust handshake fail on purpose.
    """

    def __init__(self) -> None:
        self.tls_failures = 0

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return responses

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            self.tls_failures += 1
        return f"500 Error: ({error.__class__.__name__}) {error}"


class _SlowBanner(asyncio.Protocol):
    """Greets after a delay, then answers EHLO, QUIT and anything else minimally.

    Each reply goes out `reply_delay` seconds after its command (at once when 0); a
    client waits for every reply before its next command, so replies never overtake.
    """

    def __init__(self, delay: float, reply_delay: float = DEFAULT_REPLY_DELAY) -> None:
        self._delay = delay
        self._reply_delay = reply_delay
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._pending: set[asyncio.TimerHandle] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._send_after(self._delay, SLOW_GREETING)

    def _send_after(self, delay: float, reply: bytes, *, close: bool = False) -> None:
        if delay <= 0:
            self._send(reply, close)
            return
        handle = asyncio.get_running_loop().call_later(delay, self._send, reply, close)
        self._pending.add(handle)

    def _send(self, reply: bytes, close: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(reply)
        if close:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            verb = bytes(self._buffer[:4]).upper()
            del self._buffer[: end + 1]
            if verb in (b"EHLO", b"HELO"):
                self._send_after(self._reply_delay, SLOW_EHLO_REPLY)
            elif verb == b"QUIT":
                self._send_after(self._reply_delay, SLOW_QUIT_REPLY, close=True)
                return
            else:
                self._send_after(self._reply_delay, SLOW_OTHER_REPLY)
        if len(self._buffer) > MAX_LINE:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        self._transport = None


def _tls_context(chain: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # server side, no client certs
    context.load_cert_chain(chain)
    return context


async def _listen(factory: Any, count: int) -> tuple[list[asyncio.Server], list[int]]:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    for _ in range(count):
        server = await loop.create_server(factory, host=LOOPBACK, port=0, backlog=BACKLOG)
        servers.append(server)
    return servers, [int(server.sockets[0].getsockname()[1]) for server in servers]


async def serve(arguments: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    handler = _QuietHandler()
    context = _tls_context(arguments.chain) if arguments.chain else None
    if arguments.starttls and context is None:
        raise SystemExit("--starttls needs --chain")

    def smtp(tls: ssl.SSLContext | None) -> Any:
        return lambda: SMTP(
            handler,
            hostname=SERVER_NAMES[0],
            ident="bench ESMTP",
            tls_context=tls,
            require_starttls=tls is not None,
            loop=loop,
        )

    everything: list[asyncio.Server] = []
    ports: dict[str, list[int]] = {}
    for kind, count, factory in (
        ("plain", arguments.plain, smtp(None)),
        ("starttls", arguments.starttls, smtp(context)),
        (
            "slow",
            arguments.slow,
            lambda: _SlowBanner(arguments.banner_delay, arguments.reply_delay),
        ),
    ):
        servers, ports[kind] = await _listen(factory, count)
        everything += servers
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    # Serve until the parent closes our stdin (or dies, which closes it too).
    await loop.run_in_executor(None, sys.stdin.buffer.read)
    for server in everything:
        server.close()
    if handler.tls_failures:
        print(f"bench server: {handler.tls_failures} failed STARTTLS handshakes", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--plain", type=int, default=0, help="aiosmtpd servers, plaintext")
    parser.add_argument("--starttls", type=int, default=0, help="aiosmtpd servers, STARTTLS")
    parser.add_argument("--slow", type=int, default=0, help="raw slow-banner servers")
    parser.add_argument("--banner-delay", type=float, default=DEFAULT_BANNER_DELAY)
    parser.add_argument("--reply-delay", type=float, default=DEFAULT_REPLY_DELAY)
    parser.add_argument("--chain", help="PEM with the server certificate chain and key")
    raise_open_files_limit()
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()

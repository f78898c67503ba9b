"""What a port speaks, told by the first bytes it sends: TLS, or a plaintext SMTP greeting.

When a session's mode meets silence (no greeting with STARTTLS or plain) or bytes that
are not TLS (an implicit TLS handshake failing with "wrong version number"), a second,
short connection to the address the session reached asks the port itself. Evidence only:
with a ClientHello it sends that one flight and reads the first record that comes back,
never completing a handshake, so nothing is verified and nothing can travel over it;
without, it sends nothing and reads the first line. It closes as soon as the first bytes
tell, and within the seconds it is given in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
from dataclasses import dataclass
from enum import StrEnum

from smtp_session.tasks.resolve import connect_first, literal_address
from smtp_session.tasks.server_text import quote_reply

#: The longest a probe takes: a live port answers within a round trip or two.
PROBE_SECONDS = 1.0
#: The most bytes read: a TLS record header, or one greeting line.
MAX_PROBE_BYTES = 512
#: A TLS record (RFC 8446 §5.1): alert (21) or handshake (22), protocol version 3.x.
_TLS_RECORD = re.compile(rb"[\x15\x16]\x03")
#: The start of an SMTP reply line (RFC 5321 §4.2): a code, then a space or a hyphen.
_SMTP_REPLY = re.compile(rb"[2-5][0-9]{2}[ -]")


class Speaks(StrEnum):
    TLS = "tls"  # it answered a ClientHello with a TLS record: implicit TLS
    SMTP = "smtp"  # it sent a plaintext SMTP reply line: a greeting, or a refusal


@dataclass(frozen=True)
class PortEvidence:
    """What the port answered; `line` is its first SMTP line, quoted (empty for TLS)."""

    speaks: Speaks
    line: str = ""


@functools.cache
def _hello_context() -> ssl.SSLContext:
    # Only ever writes a ClientHello: the handshake stops at the server's first answer,
    # before any certificate, so there is nothing to verify and nothing is trusted.
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def client_hello(server_name: str) -> bytes:
    """The first flight of a TLS handshake for `server_name` (sent in SNI unless an address)."""
    outgoing = ssl.MemoryBIO()
    tls = _hello_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


def judge(first: bytes) -> PortEvidence | None:
    """What the first bytes a port sent show, if anything we know."""
    if _TLS_RECORD.match(first):
        return PortEvidence(Speaks.TLS)
    if _SMTP_REPLY.match(first):
        line = first.split(b"\n", 1)[0].decode("ascii", "replace")
        return PortEvidence(Speaks.SMTP, quote_reply(line))
    return None


def _told(first: bytes) -> bool:
    return bool(_TLS_RECORD.match(first)) or b"\n" in first


async def probe(
    address: str, port: int, *, seconds: float, server_name: str | None = None
) -> PortEvidence | None:
    """What `address` says first on `port`: to a ClientHello for `server_name`, or, without
    one, to nothing at all. None when that shows nothing (silence, a closed or refused
    connection, bytes of another protocol) within `seconds`."""
    addresses = literal_address(address, port)
    if seconds <= 0 or addresses is None:
        return None
    first = b""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(seconds):
            loop = asyncio.get_running_loop()
            # The address the session reached: no second lookup, the egress policy holds.
            sock = await connect_first(addresses, loop.time() + seconds, [])
            reader, writer = await asyncio.open_connection(sock=sock)
            if server_name is not None:
                writer.write(client_hello(server_name))
            while len(first) < MAX_PROBE_BYTES and not _told(first):
                chunk = await reader.read(MAX_PROBE_BYTES - len(first))
                if not chunk:
                    break
                first += chunk
    except (OSError, TimeoutError):
        pass  # what came before the silence or the close is the evidence
    finally:
        if writer is not None:
            writer.close()
    return judge(first)

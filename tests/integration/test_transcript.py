"""`transcript: true`: the SMTP dialogue in the Outcome, against real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.secrets import REDACTED
from smtp_session.tasks.session import RetryPolicy, open_session
from smtp_session.tasks.transcript import MAX_LINE, MAX_LINES
from tests.servers import LOOPBACK, SmtpServerFactory

USER, PASSWORD = "alice", "correct horse battery"
SECRETS = {"SMTP_SESSION_SECRET_GOOD": f"{USER}:{PASSWORD}"}
EHLO_NAME = "client.example"
FAST_RETRY = RetryPolicy(base=0.01, cap=0.02)


async def session(port: int, *, extra_ca_file: str | None = None, **fields: object) -> Outcome:
    return await open_session(
        {"host": LOOPBACK, "port": port, "ehlo_name": EHLO_NAME, "retries": 0, **fields},
        environ=SECRETS,
        retry_policy=FAST_RETRY,
        extra_ca_file=extra_ca_file,
    )


def spoken(outcome: Outcome) -> list[tuple[str, str]]:
    """The transcript as (dir, first word of the line) pairs: what was said, in order."""
    assert outcome.transcript is not None
    return [(line.dir, line.line.split(" ", 1)[0]) for line in outcome.transcript]


async def test_a_fallback_session_shows_both_connections_and_hides_auth(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str
) -> None:
    # Native trust refuses the test CA; the portable store (with the operator's CA file)
    # verifies it on a second connection, which authenticates.
    server = await smtp_server_factory(mode="starttls", auth={USER: PASSWORD})
    outcome = await session(
        server.port, extra_ca_file=ca_pem_path, credentials="good", transcript=True
    )
    assert outcome.ok, outcome.err_message
    assert outcome.transcript is not None
    said = spoken(outcome)
    # The first connection ends at the native handshake; the second one goes on.
    split = said.index(("tls", "handshake")) + 1
    first, second = said[:split], said[split:]
    assert first[0] == second[0] == ("S", "220")
    assert [line for line in first if line[0] != "S"] == [
        ("C", "EHLO"),
        ("C", "STARTTLS"),
        ("tls", "handshake"),
    ]
    assert [line for line in second if line[0] != "S"] == [
        ("C", "EHLO"),
        ("C", "STARTTLS"),
        ("tls", outcome.tls.version if outcome.tls else ""),
        ("C", "EHLO"),
        ("C", "AUTH"),
        ("C", "QUIT"),
    ]
    lines = [line.line for line in outcome.transcript]
    assert f"EHLO {EHLO_NAME}" in lines
    assert f"AUTH PLAIN {REDACTED}" in lines
    assert any(line.startswith("handshake failed (native trust): ") for line in lines)
    assert any(line.endswith("certificate verified (portable trust)") for line in lines)
    assert any(line.startswith("235 ") for line in lines)
    # Multi-line replies as on the wire: "250-…" lines, then one "250 …".
    ehlo_reply = lines[2 : said.index(("C", "STARTTLS"))]
    assert len(ehlo_reply) > 1
    assert all(line.startswith("250-") for line in ehlo_reply[:-1])
    assert ehlo_reply[-1].startswith("250 ")
    times = [line.t for line in outcome.transcript]
    assert times == sorted(times) and times[-1] <= (outcome.timings.total or 0)
    assert PASSWORD not in outcome.model_dump_json()


async def test_no_transcript_unless_asked(smtp_server_factory: SmtpServerFactory) -> None:
    server = await smtp_server_factory(mode="plain")
    outcome = await session(server.port, security="plain")
    assert outcome.ok, outcome.err_message
    assert outcome.transcript is None
    assert "transcript" in outcome.to_dict()  # every field is always present


async def test_a_refused_greeting_is_in_the_transcript() -> None:
    async with raw_server([b"554 5.3.2 go away\r\n"]) as port:
        outcome = await session(port, security="plain", transcript=True)
    assert outcome.error == "smtp_permanent"
    assert outcome.transcript is not None
    assert [(line.dir, line.line) for line in outcome.transcript] == [("S", "554 5.3.2 go away")]


async def test_a_flood_of_reply_lines_is_bounded() -> None:
    # Within aiosmtplib's own bound on one reply (32 KiB), beyond the transcript's.
    long_line = b"250-" + b"x" * (2 * MAX_LINE) + b"\r\n"
    ehlo_reply = long_line + b"250-y\r\n" * (2 * MAX_LINES) + b"250 ok\r\n"
    async with raw_server([b"220 flood\r\n", ehlo_reply, b"221 bye\r\n"]) as port:
        outcome = await session(port, security="plain", transcript=True)
    assert outcome.ok, outcome.err_message
    assert outcome.transcript is not None
    assert len(outcome.transcript) == MAX_LINES
    assert max(len(line.line) for line in outcome.transcript) == MAX_LINE


@contextlib.asynccontextmanager
async def raw_server(replies: list[bytes]) -> AsyncIterator[int]:
    """A server that writes its first reply at once and each next one per line read."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for index, reply in enumerate(replies):
                if index and not await reader.readline():
                    break
                writer.write(reply)
                await writer.drain()
            await reader.read()  # until the client closes
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    async with server:
        yield int(server.sockets[0].getsockname()[1])

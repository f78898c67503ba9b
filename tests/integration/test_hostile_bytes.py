"""Bytes a hostile server chooses never paint a terminal or break a JSON parser.

A server on loopback greets and answers EHLO with escape sequences, bytes that are not
UTF-8 and bell characters, and presents a certificate whose names hold the same. The
Outcome, its JSON, the transcript and both forms of `smtp-session check` output stay
printable, valid UTF-8 with no lone surrogate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtp_session.tasks.session import open_session
from tests.certificates import server_cert
from tests.cli import cli_env, run_cli
from tests.servers import LOOPBACK, server_ssl_context

#: Sets a terminal's title, then rings it: what a server must never get to do.
ESCAPE = b"\x1b]0;OWNED\x07"
GREETING = b"220 mx.example ESMTP " + ESCAPE + b"\r\n"
EHLO_REPLY = b"250-mx.example\r\n250-X\xffY" + ESCAPE + b"\r\n250 SIZE 1000\r\n"
HOSTILE_NAME = "mail\x1b]0;OWNED\x07.example"


def clean(text: str) -> None:
    """Printable where it matters: no control character, no lone surrogate."""
    assert "\x1b" not in text and "\x07" not in text, text
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text), text
    text.encode("utf-8")  # strict: a lone surrogate would raise


@contextlib.asynccontextmanager
async def hostile_server(context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """Greets and answers EHLO with hostile bytes, QUIT with 221."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(GREETING)
            while line := await reader.readline():
                verb = line.split(b" ", 1)[0].strip().upper()
                writer.write(b"221 bye\r\n" if verb == b"QUIT" else EHLO_REPLY)
                await writer.drain()
                if verb == b"QUIT":
                    break
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0, ssl=context)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


async def test_the_outcome_and_its_transcript_are_clean() -> None:
    async with hostile_server() as port:
        outcome = await open_session(
            {"host": LOOPBACK, "port": port, "security": "plain", "transcript": True}
        )
    assert outcome.ok, outcome.err_message
    assert outcome.server is not None and "X?Y?]0;OWNED?" in outcome.server.extensions
    clean(json.dumps(outcome.to_dict(), ensure_ascii=False))
    clean(repr(outcome.transcript))


@pytest.mark.parametrize("as_json", [True, False])
async def test_check_prints_nothing_hostile(as_json: bool, tmp_path: Path) -> None:
    async with hostile_server() as port:
        args = ["check", f"{LOOPBACK}:{port}", "--security", "plain", "--transcript"]
        run = await run_cli(*args, *(["--json"] if as_json else []), env=cli_env(tmp_path))
    assert run.code == 0, run
    clean(run.stdout)
    if as_json:
        assert json.loads(run.stdout)["ok"] is True


async def test_a_certificate_named_with_escape_bytes_is_shown_clean(tmp_path: Path) -> None:
    cert = server_cert(common_name=HOSTILE_NAME)  # self-signed
    async with hostile_server(server_ssl_context(cert)) as port:
        outcome = await open_session(
            {"host": LOOPBACK, "port": port, "security": "tls", "retries": 0}
        )
        run = await run_cli(
            "check",
            f"{LOOPBACK}:{port}",
            "--security",
            "tls",
            "--retries",
            "0",
            env=cli_env(tmp_path),
        )
    assert outcome.error == "tls_untrusted", outcome.err_message
    assert outcome.tls is not None and outcome.tls.cert is not None
    assert outcome.tls.cert.subject == r"CN=mail?]0\;OWNED?.example"  # RFC 4514 escapes ;
    clean(json.dumps(outcome.to_dict(), ensure_ascii=False))
    assert r"certificate: CN=mail?]0\;OWNED?.example" in run.stdout, run.stdout
    clean(run.stdout)

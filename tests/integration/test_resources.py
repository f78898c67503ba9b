"""Every connection a session opens is closed by the session, never left to the GC.

Each session runs in an event loop of its own (``asyncio.run``, as ``smtp-session check``
runs it) against servers in a thread of their own, which outlive that loop as a remote
server would. Whatever the session left open is garbage once its loop has ended: the
collection that follows warns about it (``ResourceWarning: unclosed transport``).
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import trustme

from smtp_session.tasks.session import open_session
from tests.servers import LOOPBACK, RawServer, ServerThread, SmtpServer

USER, PASSWORD = "alice", "correct horse battery"
SECRETS = {"SMTP_SESSION_SECRET_WRONG": f"{USER}:not the password"}
#: Each slow server's greeting comes this late: after its TLS handshake, past SHORT.
SLOW_GREETING = 2.0
#: Each stage's budget: what the sessions that time out wait.
SHORT = 0.5
_T = TypeVar("_T")


@pytest.fixture(scope="module")
def server_thread() -> Iterator[ServerThread]:
    thread = ServerThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def servers(
    server_thread: ServerThread, good_cert: trustme.LeafCert, unknown_ca_cert: trustme.LeafCert
) -> dict[str, SmtpServer | RawServer]:
    """One server of each kind the sessions below meet, by name, in their own thread."""
    return {
        "starttls": server_thread.start(SmtpServer(cert=good_cert, auth={USER: PASSWORD})),
        "tls": server_thread.start(SmtpServer(mode="tls", cert=good_cert)),
        "plain": server_thread.start(SmtpServer(mode="plain")),
        "unknown_ca": server_thread.start(SmtpServer(cert=unknown_ca_cert)),
        "slow_tls": server_thread.start(
            SmtpServer(mode="tls", cert=good_cert, greeting_delay=SLOW_GREETING)
        ),
        "silent": server_thread.start(RawServer("silent")),
        "silent_after_banner": server_thread.start(RawServer("silent_after_banner")),
        "close_after_banner": server_thread.start(RawServer("close_after_banner")),
    }


def left_open(session: Coroutine[Any, Any, _T]) -> tuple[_T, list[str]]:
    """Run `session` in an event loop that then ends: its result, and what collecting the
    garbage warned of."""
    result = asyncio.run(session)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    return result, [str(item.message) for item in caught if item.category is ResourceWarning]


#: Sessions by what happens in them: (server, request fields, error, stage).
SESSIONS: dict[str, tuple[str, dict[str, Any], str | None, str]] = {
    "starttls-after-trust-fallback": ("starttls", {}, None, "done"),
    "implicit-tls": ("tls", {"security": "tls"}, None, "done"),
    "auth-failed-in-tls": ("starttls", {"credentials": "wrong"}, "auth_failed", "auth"),
    "starttls-unavailable": ("plain", {}, "starttls_unavailable", "ehlo"),
    "implicit-tls-fails": ("plain", {"security": "tls"}, "tls_handshake", "tls"),
    "untrusted-both-modes": ("unknown_ca", {}, "tls_untrusted", "starttls"),
    "timeout-after-the-handshake": ("slow_tls", {"security": "tls"}, "timeout", "banner"),
    "timeout-in-the-handshake": ("silent", {"security": "tls"}, "timeout", "tls"),
    "timeout-mid-session": ("silent_after_banner", {"security": "plain"}, "timeout", "ehlo"),
    "server-closes": ("close_after_banner", {"security": "plain"}, "disconnected", "ehlo"),
}


@pytest.mark.parametrize(("server", "fields", "error", "stage"), SESSIONS.values(), ids=SESSIONS)
def test_a_session_closes_every_connection_it_opened(
    servers: dict[str, SmtpServer | RawServer],
    ca_pem_path: str,
    server: str,
    fields: dict[str, Any],
    error: str | None,
    stage: str,
) -> None:
    request = {
        "host": LOOPBACK,
        "port": servers[server].port,
        "connect_timeout": SHORT,
        "command_timeout": SHORT,
        "retries": 0,
        **fields,
    }
    # The operator's CA: native trust refuses the test CA first, portable then verifies it.
    session = open_session(request, environ=SECRETS, extra_ca_file=ca_pem_path)
    outcome, warned = left_open(session)
    assert warned == []
    assert (outcome.error, outcome.stage) == (error, stage), outcome


@pytest.mark.parametrize(
    ("server", "fields"),
    [
        pytest.param("silent", {"security": "tls"}, id="in-the-handshake"),
        pytest.param("slow_tls", {"security": "tls"}, id="waiting-for-the-greeting"),
        pytest.param("silent_after_banner", {"security": "plain"}, id="waiting-for-ehlo"),
    ],
)
def test_a_cancelled_session_closes_its_connection(
    server_thread: ServerThread,
    servers: dict[str, SmtpServer | RawServer],
    server: str,
    fields: dict[str, Any],
) -> None:
    target = servers[server]
    accepted = target.connections_accepted

    async def cancelled() -> None:
        task = asyncio.ensure_future(
            open_session({"host": LOOPBACK, "port": target.port, **fields})
        )
        await server_thread.wait(target.wait_connections(accepted + 1))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert left_open(cancelled()) == (None, [])

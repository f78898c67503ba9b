"""Real servers on loopback for the integration tests.

Two kinds, both bound to ``127.0.0.1`` port 0 with the bound port read back and the
listening socket kept for the server's lifetime:

* :class:`SmtpServer` -- a real aiosmtpd ESMTP server (plain, STARTTLS or implicit TLS,
  optional AUTH PLAIN/LOGIN/XOAUTH2) that records every command line it receives.
* :class:`RawServer` -- a misbehaving TCP server whose fault is chosen by name (silence,
  a 421 banner, garbage, an endless line, a reset ...).

Both count the connections they accept and stop everything they started in ``stop()``:
no listening socket, connection or task outlives the fixture that made it. They run in
the test's event loop; :class:`ServerThread` runs them in a thread of their own.

Faults that need no raw server:

* a plaintext ESMTP server without STARTTLS: ``SmtpServer(mode="plain")`` (or
  ``mode="starttls", starttls_offered=False``);
* "implicit TLS against a plaintext port": point a ``security=tls`` client at
  ``SmtpServer(mode="plain")``; the server answers the ClientHello with its banner;
* "535 on AUTH": any ``SmtpServer(auth=...)`` rejects a wrong password with
  :data:`AUTH_FAILED_REPLY`.
* a slow greeting, as from a far-away server: ``SmtpServer(greeting_delay=...)``.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import contextlib
import datetime
import json
import socket
import ssl
import struct
import threading
import warnings
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, get_args

import trustme
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)
from cryptography import x509

LOOPBACK = "127.0.0.1"
SERVER_HOSTNAME = "localhost"

#: Identities of every certificate that should verify for a loopback server.
LOOPBACK_IDENTITIES = ("localhost", "127.0.0.1")
#: The only identity of ``wrong_host_cert``.
WRONG_HOST = "other.example"

#: Validity window of ``expired_cert``: wholly in the past, so OpenSSL reports
#: verify_code 10 ("certificate has expired").
EXPIRED_NOT_BEFORE = datetime.datetime(2023, 1, 1, tzinfo=datetime.UTC)
EXPIRED_NOT_AFTER = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)

#: Reply to a wrong password (PLAIN/LOGIN) or an unknown token (XOAUTH2); Gmail's text.
AUTH_FAILED_REPLY = "535 5.7.8 Username and Password not accepted"
#: The XOAUTH2 error challenge's JSON before a refused token's 535 (as Gmail's, base64).
OAUTH_ERROR = {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}

#: Bound for every wait these helpers do on an event (never a sleep).
WAIT_TIMEOUT = 5.0

SmtpMode = Literal["plain", "starttls", "tls"]
SMTP_MODES: tuple[SmtpMode, ...] = get_args(SmtpMode)
TlsMode = Literal["starttls", "tls"]  # the modes with TLS

RawBehaviour = Literal[
    "silent",
    "banner_421",
    "banner_554",
    "garbage",
    "http",
    "endless_line",
    "slow_drip",
    "close_after_banner",
    "silent_after_banner",
    "reset_on_connect",
    "held_session",
    "held_then_silent",
    "tls_silent",
    "tls_alert_unrecognized_name",
    "tls_alert_protocol_version",
]
RAW_BEHAVIOURS: tuple[RawBehaviour, ...] = get_args(RawBehaviour)

BANNER_421 = b"421 4.3.2 Service not available, try later\r\n"
BANNER_554 = b"554 5.3.2 No SMTP service here\r\n"
#: What a TLS-only or binary service might emit: a TLS record header, then junk.
GARBAGE = b"\x16\x03\x01\x00\xa5garbage\xff\xfe\r\n"
#: What a web server on the SMTP port answers to anything.
HTTP_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"
BANNER_OK = b"220 ok\r\n"
BANNER_SILENT_AFTER = b"220 localhost ESMTP then silence\r\n"
ENDLESS_LINE_START = b"220"
ENDLESS_LINE_CHUNK = b"x" * 65_536
SLOW_DRIP_START = b"220 "
#: The slow-drip fault: one byte of banner per interval, never a newline.
SLOW_DRIP_INTERVAL = 0.2
SLOW_DRIP_TEXT = b"localhost ESMTP slowly "
#: The held-session server: how long it holds each session before its greeting, like a
#: far-away provider, then answers EHLO and QUIT at once (or, held_then_silent, nothing).
HELD_SESSION_SECONDS = 1.0

_READ_SIZE = 65_536
# A client line longer than this is recorded truncated; aiosmtpd rejects it anyway.
_MAX_RECORDED_LINE = 4_096


# --------------------------------------------------------------------------- certificates


def server_ssl_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    """A server-side context presenting ``cert`` (with its chain); no client certs."""
    # Purpose.CLIENT_AUTH gives a server context: CERT_NONE, no hostname check, which is
    # what aiosmtpd expects of its tls_context.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def client_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client context that trusts ``ca`` and nothing else (no system store)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    return context


def leaf_certificate(cert: trustme.LeafCert) -> x509.Certificate:
    """The parsed leaf of a trustme certificate (for its dates, subject, SANs)."""
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())


# --------------------------------------------------------------------------- shared base


class _LoopbackServer(abc.ABC):
    """Bookkeeping shared by both servers: address, connection counts, waits."""

    host: str
    port: int

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.connections_accepted = 0
        self.peak_open_connections = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` to connect to."""
        return self.host, self.port

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed, as the server sees them."""
        return len(self._open)

    async def wait_connections(self, count: int, *, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until at least ``count`` connections have been accepted."""
        await self._wait_until(lambda: self.connections_accepted >= count, timeout)

    async def wait_idle(self, *, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until every accepted connection has been closed on the server side."""
        await self._wait_until(lambda: not self._open, timeout)

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def _notify(self) -> None:
        # Wake every waiter once, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def _track(self, transport: asyncio.BaseTransport) -> None:
        self._open.add(transport)
        self.peak_open_connections = max(self.peak_open_connections, len(self._open))
        self._notify()

    def _untrack(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None and transport in self._open:
            self._open.discard(transport)
            self._notify()

    def _keep_task(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None and not task.done():
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _listen(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, host=self.host, port=0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, drop every connection and finish every task; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Let accepts already in flight reach connection_made, so that they are tracked
        # and dropped below instead of leaking past the test's event loop.
        for _ in range(3):
            await asyncio.sleep(0)
        for transport in list(self._open):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            else:
                transport.close()
        for task in list(self._tasks):
            task.cancel()
        async with asyncio.timeout(WAIT_TIMEOUT):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.wait_idle()
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @abc.abstractmethod
    async def start(self) -> None:
        """Listen on 127.0.0.1 at a fresh port (``self.port``)."""


# --------------------------------------------------------------------------- aiosmtpd server


@dataclass(frozen=True)
class ReceivedCommand:
    """One command line the SMTP server received (AUTH arguments reduced to the mechanism)."""

    connection: int
    verb: str
    arg: str


@dataclass(frozen=True)
class AuthAttempt:
    """One completed authentication exchange and whether the server accepted it."""

    connection: int
    mechanism: str
    username: str
    success: bool


def _xoauth2_decode(blob: bytes) -> tuple[str, str] | None:
    """``(user, token)`` from ``user=U\\x01auth=Bearer T\\x01\\x01``, or None if malformed."""
    fields = dict(
        part.split("=", 1) for part in blob.decode("utf-8", "replace").split("\x01") if "=" in part
    )
    user, auth = fields.get("user"), fields.get("auth", "")
    scheme, _, token = auth.partition(" ")
    if user is None or scheme != "Bearer" or not token:
        return None
    return user, token


class _Handler:
    """aiosmtpd handler: checks credentials, records attempts, hides AUTH when unconfigured."""

    # No attribute of this class may start with "auth_" except mechanisms: aiosmtpd
    # treats every such member of the handler as an AUTH mechanism.

    def __init__(self, owner: SmtpServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # The five-argument hook must record the EHLO name itself.
        session.host_name = hostname
        if "EHLO" in self._owner.replies:
            return [self._owner.replies["EHLO"]]
        if self._owner.advertises_auth:
            return responses
        return [line for line in responses if not line.startswith("250-AUTH")]

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> Any:
        return self._owner.replies.get("HELO", MISSING)

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> Any:
        return self._owner.replies.get("AUTH", MISSING)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        refusal = self._owner.replies.get("MAIL") or self._owner.refuse.get(address)
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self._owner.replies.get("RCPT") or self._owner.refuse.get(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if "DATA" in self._owner.replies:  # refused at the end of the message
            return self._owner.replies["DATA"]
        content = envelope.original_content or b""
        self._owner.messages.append(content)
        return f"250 2.0.0 Ok: queued as Q{len(self._owner.messages):04d}"

    async def handle_exception(self, error: Exception) -> str:
        # Replaces aiosmtpd's default, which logs a traceback for every failed STARTTLS
        # handshake; those are expected here and counted instead.
        if isinstance(error, TLSSetupException):
            self._owner.tls_handshake_failures += 1
        else:
            self._owner.errors.append(error)
        return f"500 Error: ({error.__class__.__name__}) {error}"

    def authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        """aiosmtpd ``authenticator`` for the built-in PLAIN and LOGIN mechanisms."""
        assert isinstance(auth_data, LoginPassword)
        username = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        users = self._owner.auth or {}
        success = username in users and users[username] == password
        self._owner.auth_attempts.append(
            AuthAttempt(_connection_number(server), mechanism, username, success)
        )
        if success:
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False, message=AUTH_FAILED_REPLY)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """XOAUTH2 as Gmail speaks it: on failure a 334 JSON challenge, then 535."""
        if len(args) == 1:
            answer = await server.challenge_auth("")
            if answer is MISSING:  # aiosmtpd already replied 501
                return AuthResult(success=False, handled=True)
            assert isinstance(answer, bytes)
            blob = answer
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        decoded = _xoauth2_decode(blob)
        tokens = self._owner.oauth_tokens or {}
        success = decoded is not None and tokens.get(decoded[0]) == decoded[1]
        username = decoded[0] if decoded is not None else ""
        self._owner.auth_attempts.append(
            AuthAttempt(_connection_number(server), "XOAUTH2", username, success)
        )
        if success:
            return AuthResult(success=True, auth_data=username)
        if await server.challenge_auth(json.dumps(self._owner.oauth_error)) is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=AUTH_FAILED_REPLY)


def _connection_number(server: SMTP) -> int:
    return server.connection_number if isinstance(server, _RecordingSMTP) else 0


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP protocol, recording each client line and its connection's life."""

    def __init__(self, handler: _Handler, *, owner: SmtpServer, number: int, **kwargs: Any):
        self._owner = owner
        self.connection_number = number
        self._raw_transport: asyncio.BaseTransport | None = None
        self._line = bytearray()
        self._greeted = False
        # What the next client line is, judged from our last reply: an AUTH
        # continuation after 334, message content after 354, else a command.
        self._next_line: Literal["command", "auth", "data"] = "command"
        super().__init__(handler, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgraded = self._original_transport is not None  # STARTTLS handshake completed
        super().connection_made(transport)
        # RFC 3207: anything the client sent before the handshake is discarded.
        self._line.clear()
        self._next_line = "command"
        if upgraded or self._owner.mode == "tls":
            self._owner.tls_handshakes_completed += 1
        if not upgraded:
            if self._owner.mode != "tls":  # implicit TLS: the TLS layer tracks the socket
                self._raw_transport = transport
                self._owner._track(transport)
            self._owner._keep_task(self._handler_coroutine)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._owner._untrack(self._raw_transport)

    def data_received(self, data: bytes) -> None:
        self._record(data)
        super().data_received(data)

    async def push(self, status: str | bytes) -> None:
        if self._owner.greeting_delay and not self._greeted:  # the first reply: the greeting
            self._greeted = True
            await asyncio.sleep(self._owner.greeting_delay)
        code = status[:3] if isinstance(status, str) else status[:3].decode("ascii", "replace")
        if code == "334":
            self._next_line = "auth"
        elif code == "354":
            self._next_line = "data"
        # Two calls because SMTP.push takes AnyStr, which a str | bytes cannot bind.
        if isinstance(status, str):
            await super().push(status)
        else:
            await super().push(status)

    def _record(self, data: bytes) -> None:
        self._line += data
        while (end := self._line.find(b"\n")) >= 0:
            line = bytes(self._line[:end]).rstrip(b"\r")
            del self._line[: end + 1]
            self._record_line(line)
        if len(self._line) > _MAX_RECORDED_LINE:
            del self._line[_MAX_RECORDED_LINE:]

    def _record_line(self, line: bytes) -> None:
        if self._next_line == "auth":
            self._next_line = "command"  # a credential: not recorded
            return
        if self._next_line == "data":
            if line == b".":
                self._next_line = "command"
            return
        text = line.decode("utf-8", "backslashreplace")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb == "AUTH":
            arg = arg.split(" ", 1)[0].upper()  # keep the mechanism, drop the credential
        self._owner.commands.append(ReceivedCommand(self.connection_number, verb, arg.strip()))


class _ImplicitTLSProtocol(sslproto.SSLProtocol):
    """The TLS layer of an implicit-TLS connection, made by us so that the raw socket can
    be dropped at teardown even while its handshake is still pending."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: _RecordingSMTP,
        context: ssl.SSLContext,
        *,
        owner: SmtpServer,
    ) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        # A failed handshake sets an exception nobody awaits; retrieve it to keep the
        # loop from logging "Future exception was never retrieved".
        waiter.add_done_callback(lambda f: None if f.cancelled() else f.exception())
        super().__init__(loop, app, context, waiter, server_side=True)
        self._owner = owner
        self._app = app
        self._raw: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport
        self._owner._track(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._app.session is None:  # the SMTP layer never started: no handshake
            self._owner.tls_handshake_failures += 1
        self._owner._untrack(self._raw)


class SmtpServer(_LoopbackServer):
    """A real aiosmtpd ESMTP server on 127.0.0.1, port 0.

    ``mode``: ``plain``; ``starttls`` (STARTTLS offered and required before anything
    but EHLO/NOOP/QUIT, unless ``starttls_offered=False`` or ``require_starttls=False``);
    ``tls`` (TLS from the first byte). ``auth`` maps user to password for PLAIN and
    LOGIN, ``oauth_tokens`` maps user to bearer token for XOAUTH2; AUTH is advertised
    only for the mechanisms configured, and in ``starttls`` mode only after STARTTLS.
    ``greeting_delay``: seconds each connection waits for its greeting (after the
    handshake, in ``tls`` mode), like a far-away server's.
    A refused token gets the XOAUTH2 challenge ``oauth_error`` (JSON), then the 535.
    ``replies`` maps ``EHLO``, ``HELO``, ``AUTH``, ``MAIL``, ``RCPT`` or ``DATA`` (its
    end) to the reply sent to every such
    command instead of the server's own (lines joined by CRLF): a provider's refusal.
    ``client_cert_required``: the TLS handshake asks for a client certificate and the
    server refuses the connection without one; with TLS 1.3 the client's handshake
    completes first, and the connection then ends at its next read (no alert: asyncio's
    server side drops it).

    Records ``commands`` (every command line, in order, over all connections),
    ``auth_attempts``, ``connections_accepted``, ``tls_handshakes_completed``,
    ``tls_handshake_failures``, the SNI name of each TLS handshake (``server_names``, None
    where the client sent none) and unexpected handler ``errors``.
    """

    def __init__(
        self,
        *,
        mode: SmtpMode = "starttls",
        cert: trustme.LeafCert | None = None,
        auth: Mapping[str, str] | None = None,
        oauth_tokens: Mapping[str, str] | None = None,
        starttls_offered: bool | None = None,
        require_starttls: bool | None = None,
        auth_require_tls: bool | None = None,
        client_cert_required: bool = False,
        hostname: str = SERVER_HOSTNAME,
        greeting_delay: float = 0.0,
        replies: Mapping[str, str] | None = None,
        oauth_error: Mapping[str, str] | None = None,
        refuse: Mapping[str, str] | None = None,
        smtputf8: bool = False,
    ) -> None:
        super().__init__()
        if mode not in SMTP_MODES:
            raise ValueError(f"mode must be one of {SMTP_MODES}, not {mode!r}")
        if starttls_offered and mode != "starttls":
            raise ValueError(f"starttls_offered=True needs mode='starttls', not {mode!r}")
        offered = mode == "starttls" if starttls_offered is None else starttls_offered
        if (mode == "tls" or offered) and cert is None:
            raise ValueError(f"mode={mode!r} needs a cert")
        self.mode: SmtpMode = mode
        self.cert = cert
        self.auth = dict(auth) if auth is not None else None
        self.oauth_tokens = dict(oauth_tokens) if oauth_tokens is not None else None
        self.starttls_offered = offered
        self.require_starttls = offered if require_starttls is None else require_starttls
        # aiosmtpd only counts STARTTLS as TLS, so requiring it would hide AUTH on an
        # implicit-TLS server; plain servers offer AUTH in the clear when configured.
        self.auth_require_tls = mode == "starttls" if auth_require_tls is None else auth_require_tls
        self.hostname = hostname
        self.greeting_delay = greeting_delay
        self.replies = dict(replies or {})
        self.oauth_error = dict(oauth_error or OAUTH_ERROR)
        #: Envelope addresses (MAIL FROM or RCPT TO) and the reply that refuses each.
        self.refuse = dict(refuse or {})
        self.smtputf8 = smtputf8

        self.commands: list[ReceivedCommand] = []
        #: The content of every message received with DATA.
        self.messages: list[bytes] = []
        self.auth_attempts: list[AuthAttempt] = []
        self.errors: list[Exception] = []
        self.tls_handshakes_completed = 0
        self.tls_handshake_failures = 0

        self._excluded_mechanisms = []
        if self.auth is None:
            self._excluded_mechanisms += ["PLAIN", "LOGIN"]
        if self.oauth_tokens is None:
            self._excluded_mechanisms.append("XOAUTH2")
        self.server_names: list[str | None] = []
        self._ssl_context = server_ssl_context(cert) if cert is not None else None
        if self._ssl_context is not None:
            self._ssl_context.sni_callback = self._record_server_name
            if client_cert_required:
                # No CA to check one against: whatever a client presents, or not, is refused.
                self._ssl_context.verify_mode = ssl.CERT_REQUIRED
        self._handler = _Handler(self)

    def _record_server_name(
        self, _tls: ssl.SSLObject, name: str | None, _context: ssl.SSLContext
    ) -> None:
        self.server_names.append(name)

    @property
    def advertises_auth(self) -> bool:
        """Whether EHLO lists AUTH (once the TLS requirement, if any, is met)."""
        return self.auth is not None or self.oauth_tokens is not None

    @property
    def verbs(self) -> list[str]:
        """The command verbs received, in order (``["EHLO", "STARTTLS", "EHLO", ...]``)."""
        return [command.verb for command in self.commands]

    def received(self, verb: str) -> bool:
        """Whether any connection sent the command ``verb`` (case-insensitive)."""
        return verb.upper() in self.verbs

    async def start(self) -> None:
        """Listen on 127.0.0.1 at a fresh port (``self.port``)."""
        await self._listen(self._make_protocol)

    def _make_protocol(self) -> asyncio.BaseProtocol:
        loop = asyncio.get_running_loop()
        self.connections_accepted += 1
        self._notify()
        smtp = _RecordingSMTP(
            self._handler,
            owner=self,
            number=self.connections_accepted,
            hostname=self.hostname,
            tls_context=self._ssl_context if self.starttls_offered else None,
            require_starttls=self.require_starttls,
            auth_require_tls=self.auth_require_tls,
            auth_exclude_mechanism=self._excluded_mechanisms,
            authenticator=self._handler.authenticate,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            loop=loop,
        )
        if self.mode == "tls":
            assert self._ssl_context is not None
            return _ImplicitTLSProtocol(loop, smtp, self._ssl_context, owner=self)
        return smtp


# --------------------------------------------------------------------------- raw faults


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _until_eof(reader: asyncio.StreamReader) -> None:
    """Discard whatever the client sends until it closes its side."""
    while await reader.read(_READ_SIZE):
        pass


async def _send_and_close(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _until_eof(reader)


async def _banner_421(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _send_and_close(writer, BANNER_421)


async def _banner_554(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _send_and_close(writer, BANNER_554)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GARBAGE)
    await writer.drain()
    await _until_eof(reader)


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _send_and_close(writer, HTTP_400)


async def _endless_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(ENDLESS_LINE_START)
    while not reader.at_eof():
        writer.write(ENDLESS_LINE_CHUNK)
        await writer.drain()  # raises once the client is gone
        # drain() does not yield while the socket keeps up; let the loop run.
        await asyncio.sleep(0)


async def _slow_drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SLOW_DRIP_START)
    await writer.drain()
    position = 0
    while True:
        # The pause between bytes is the fault itself; waiting on the client's read for
        # it also ends the drip as soon as the client closes.
        try:
            if not await asyncio.wait_for(reader.read(_READ_SIZE), SLOW_DRIP_INTERVAL):
                return
        except TimeoutError:
            writer.write(SLOW_DRIP_TEXT[position : position + 1])
            await writer.drain()
            position = (position + 1) % len(SLOW_DRIP_TEXT)


async def _close_after_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(BANNER_OK)
    await writer.drain()
    await reader.readline()  # the EHLO, never answered
    writer.close()
    await writer.wait_closed()


async def _silent_after_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(BANNER_SILENT_AFTER)
    await writer.drain()
    await _until_eof(reader)


async def _reset_on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    # Linger on, timeout 0: close() sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _held_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(HELD_SESSION_SECONDS)  # the fault: a slow greeting, then nothing
    writer.write(BANNER_SILENT_AFTER)
    await writer.drain()
    await _until_eof(reader)


async def _held_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(HELD_SESSION_SECONDS)  # the fault: a slow, far-away server
    writer.write(BANNER_OK)
    await writer.drain()
    while line := await reader.readline():
        if line[:4].upper() == b"QUIT":
            await _send_and_close(writer, b"221 bye\r\n")
            return
        writer.write(b"250 ok\r\n")
        await writer.drain()


_BEHAVIOURS: dict[RawBehaviour, Behaviour] = {
    "silent": _silent,
    "banner_421": _banner_421,
    "banner_554": _banner_554,
    "garbage": _garbage,
    "http": _http,
    "endless_line": _endless_line,
    "slow_drip": _slow_drip,
    "close_after_banner": _close_after_banner,
    "silent_after_banner": _silent_after_banner,
    "reset_on_connect": _reset_on_connect,
    "held_session": _held_session,
    "held_then_silent": _held_then_silent,
}


async def _tls_then_silence(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
) -> None:
    """The server side of a TLS handshake, then silence until the client leaves.

    Through memory BIOs, so that a failed handshake sends its alert before the connection
    closes, as an OpenSSL-based MTA does: asyncio's own server-side TLS drops it. After
    the handshake, what the client sends is read and dropped, and its close_notify is
    answered with one.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            tls.do_handshake()  # once complete, a no-op
            while tls.read(_READ_SIZE):
                pass  # dropped
        except ssl.SSLWantReadError:
            writer.write(outgoing.read())
            await writer.drain()
            data = await reader.read(_READ_SIZE)
            if not data:
                return
            incoming.write(data)
            continue
        except ssl.SSLError:
            pass  # the handshake failed: its alert is what is left to send
        else:  # read() gave b"": the client's close_notify, answered with ours
            with contextlib.suppress(ssl.SSLError):
                tls.unwrap()
        writer.write(outgoing.read())
        await writer.drain()
        return


def _unrecognized_name_context(_cert: trustme.LeafCert | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Whatever name the client asks for, or none: not a name of this server's.
    context.sni_callback = lambda *_: ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    return context


def _old_protocol_context(_cert: trustme.LeafCert | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():  # a server stuck at TLS 1.0/1.1 is the fault itself
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 allows them at level 0 only
    return context


def _certificate_context(cert: trustme.LeafCert | None) -> ssl.SSLContext:
    if cert is None:
        raise ValueError("a TLS server that completes its handshake needs a cert")
    return server_ssl_context(cert)


#: The TLS faults: how each builds its server context (the alerts need no certificate).
_TLS_CONTEXTS: dict[RawBehaviour, Callable[[trustme.LeafCert | None], ssl.SSLContext]] = {
    "tls_silent": _certificate_context,
    "tls_alert_unrecognized_name": _unrecognized_name_context,
    "tls_alert_protocol_version": _old_protocol_context,
}


class _StreamServer(_LoopbackServer):
    """A TCP server on 127.0.0.1, port 0, serving each connection as a stream."""

    async def start(self) -> None:
        """Listen on 127.0.0.1 at a fresh port (``self.port``)."""
        await self._listen(lambda: _RawProtocol(self))

    def _serve_soon(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine, so that the task is ours to track and cancel.
        self._keep_task(asyncio.get_running_loop().create_task(self._serve(reader, writer)))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._behave(reader, writer)
        except OSError:  # the client went away mid-fault: the fault is over
            pass
        finally:
            writer.close()

    @abc.abstractmethod
    async def _behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection."""


class RawServer(_StreamServer):
    """A misbehaving TCP server on 127.0.0.1, port 0; ``behaviour`` picks the fault.

    * ``silent``: accepts, never sends a byte, keeps the connection open.
    * ``banner_421`` / ``banner_554``: sends :data:`BANNER_421` / :data:`BANNER_554`, closes.
    * ``garbage``: sends :data:`GARBAGE` (not SMTP), then waits for the client to leave.
    * ``http``: sends :data:`HTTP_400`, closes.
    * ``endless_line``: ``220`` then ``x`` forever, never a newline, until the client leaves.
    * ``slow_drip``: ``220 `` then one byte every :data:`SLOW_DRIP_INTERVAL` s, never a
      newline, until the client leaves.
    * ``close_after_banner``: sends ``220 ok``, closes on the client's first line (EHLO).
    * ``silent_after_banner``: sends a 220 banner, then never answers anything.
    * ``reset_on_connect``: accepts, then resets (RST) at once.
    * ``held_session``: greets after :data:`HELD_SESSION_SECONDS`, then answers every
      command with 250 and QUIT with 221: a whole session that takes that long.
    * ``held_then_silent``: greets after :data:`HELD_SESSION_SECONDS`, then answers nothing.

    Implicit TLS faults (the alerts are sent, as OpenSSL-based servers send them):

    * ``tls_silent``: completes the TLS handshake with ``cert``, then never greets.
    * ``tls_alert_unrecognized_name``: answers the ClientHello with the fatal alert
      unrecognized_name, whatever name was asked for, then closes.
    * ``tls_alert_protocol_version``: speaks TLS 1.0 and 1.1 only, so it answers a TLS
      1.2+ ClientHello with the alert protocol_version, then closes.
    """

    def __init__(self, behaviour: RawBehaviour, *, cert: trustme.LeafCert | None = None) -> None:
        super().__init__()
        if behaviour not in _BEHAVIOURS and behaviour not in _TLS_CONTEXTS:
            raise ValueError(f"behaviour must be one of {RAW_BEHAVIOURS}, not {behaviour!r}")
        self.behaviour: RawBehaviour = behaviour
        make_context = _TLS_CONTEXTS.get(behaviour)
        self._tls_context = make_context(cert) if make_context is not None else None

    async def _behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tls_context is not None:
            await _tls_then_silence(reader, writer, self._tls_context)
        else:
            await _BEHAVIOURS[self.behaviour](reader, writer)


class _RawProtocol(asyncio.StreamReaderProtocol):
    """Stream protocol that reports its connection's life to its server."""

    def __init__(self, owner: _StreamServer) -> None:
        super().__init__(asyncio.StreamReader(), owner._serve_soon)
        self._owner = owner
        self._raw: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport
        self._owner.connections_accepted += 1
        self._owner._track(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._owner._untrack(self._raw)


# --------------------------------------------------------------------------- legacy TLS

LEGACY_BANNER = b"220 legacy.example ESMTP\r\n"
LEGACY_EHLO_REPLY = b"250-legacy.example\r\n250 STARTTLS\r\n"
LEGACY_STARTTLS_REPLY = b"220 2.0.0 Ready to start TLS\r\n"


def legacy_tls_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    """A server context that offers TLS 1.0 and 1.1 only, presenting ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    # OpenSSL 3 negotiates TLS 1.0/1.1 only at security level 0 (Debian 12's default is 2).
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # the versions themselves are deprecated in Python
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


class LegacyTlsServer(_StreamServer):
    """An SMTP server on 127.0.0.1, port 0, whose TLS stops at 1.1, like an old appliance.

    ``mode``: ``tls`` (TLS from the first byte) or ``starttls`` (greeting, an EHLO reply
    offering STARTTLS, then 220 to STARTTLS). It answers a ClientHello that offers nothing
    older than TLS 1.2 as OpenSSL does, with a protocol_version alert. asyncio's TLS layer
    would close without sending that alert, so the handshake runs here over memory BIOs.
    Counts ``handshakes_refused``.
    """

    def __init__(self, cert: trustme.LeafCert, *, mode: TlsMode) -> None:
        super().__init__()
        self.mode: TlsMode = mode
        self.handshakes_refused = 0
        self._context = legacy_tls_context(cert)

    async def _behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "starttls":
            writer.write(LEGACY_BANNER)
            await reader.readline()  # EHLO
            writer.write(LEGACY_EHLO_REPLY)
            await reader.readline()  # STARTTLS
            writer.write(LEGACY_STARTTLS_REPLY)
        await self._handshake(reader, writer)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self._context.wrap_bio(incoming, outgoing, server_side=True)
        while data := await reader.read(_READ_SIZE):
            incoming.write(data)
            try:
                tls.do_handshake()
                return  # a TLS 1.0/1.1 client: nothing more to show it
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                self.handshakes_refused += 1
                return
            finally:
                writer.write(outgoing.read())  # our handshake records, or the alert
                await writer.drain()


# --------------------------------------------------------------------------- factories


class SmtpServerFactory:
    """Starts :class:`SmtpServer` instances on demand and stops them all in ``aclose``."""

    def __init__(self, default_cert: trustme.LeafCert) -> None:
        self._default_cert = default_cert
        self._servers: list[SmtpServer] = []

    async def __call__(
        self,
        *,
        mode: SmtpMode = "starttls",
        cert: trustme.LeafCert | None = None,
        auth: Mapping[str, str] | None = None,
        oauth_tokens: Mapping[str, str] | None = None,
        starttls_offered: bool | None = None,
        require_starttls: bool | None = None,
        auth_require_tls: bool | None = None,
        greeting_delay: float = 0.0,
        replies: Mapping[str, str] | None = None,
        oauth_error: Mapping[str, str] | None = None,
        refuse: Mapping[str, str] | None = None,
        smtputf8: bool = False,
        client_cert_required: bool = False,
    ) -> SmtpServer:
        """A started server; ``cert`` defaults to ``good_cert``."""
        server = SmtpServer(
            mode=mode,
            cert=cert if cert is not None else self._default_cert,
            auth=auth,
            oauth_tokens=oauth_tokens,
            starttls_offered=starttls_offered,
            require_starttls=require_starttls,
            auth_require_tls=auth_require_tls,
            greeting_delay=greeting_delay,
            replies=replies,
            oauth_error=oauth_error,
            refuse=refuse,
            smtputf8=smtputf8,
            client_cert_required=client_cert_required,
        )
        await server.start()
        self._servers.append(server)
        return server

    async def aclose(self) -> None:
        """Stop every server this factory started."""
        for server in self._servers:
            await server.stop()


class RawServerFactory:
    """Starts :class:`RawServer` instances on demand and stops them all in ``aclose``."""

    def __init__(self, default_cert: trustme.LeafCert) -> None:
        self._default_cert = default_cert
        self._servers: list[RawServer] = []

    async def __call__(self, behaviour: RawBehaviour) -> RawServer:
        """A started server with the fault ``behaviour`` (a TLS one presents ``good_cert``)."""
        server = RawServer(behaviour, cert=self._default_cert)
        await server.start()
        self._servers.append(server)
        return server

    async def aclose(self) -> None:
        """Stop every server this factory started."""
        for server in self._servers:
            await server.stop()


# --------------------------------------------------------------------------- in a thread

_Server = TypeVar("_Server", bound=_LoopbackServer)
_T = TypeVar("_T")


class ServerThread:
    """Servers on an event loop of their own, in a thread, started with :meth:`start`.

    They outlive the event loop of a client run with ``asyncio.run()``, as a remote server
    outlives ``smtp-session check``: a connection the client leaves open is then still
    open when its loop ends, not closed by a server stopping in that same loop.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="loopback-servers", daemon=True
        )
        self._thread.start()
        self._servers: list[_LoopbackServer] = []

    def start(self, server: _Server) -> _Server:
        """``server``, started on this thread's loop."""
        self.call(server.start())
        self._servers.append(server)
        return server

    def call(self, step: Coroutine[Any, Any, _T]) -> _T:
        """Run ``step`` on this thread's loop (from another thread) and wait for it."""
        return asyncio.run_coroutine_threadsafe(step, self._loop).result(WAIT_TIMEOUT)

    async def wait(self, step: Coroutine[Any, Any, _T]) -> _T:
        """Run ``step`` on this thread's loop and await it from another event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step, self._loop))

    def close(self) -> None:
        """Stop every server, then the loop and its thread."""
        for server in self._servers:
            self.call(server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT_TIMEOUT)
        self._loop.close()

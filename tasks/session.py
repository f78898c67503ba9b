"""open_session: one SMTP session request with deadlines, retries and the trust fallback.

Pure asyncio: no Celery, no broker, nothing beyond the network it is asked to reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import ssl
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aiosmtplib import SMTP, SMTPException, SMTPResponse

from smtp_session.tasks.chain import ChainProblem, diagnose
from smtp_session.tasks.classify import (
    CERT_HAS_EXPIRED,
    STAGE_ACTIVITY,
    Failure,
    classify,
    quote_reply,
)
from smtp_session.tasks.egress import DestinationLimit, EgressPolicy
from smtp_session.tasks.errors import ErrorCategory, InvalidRequest, SessionFailure, Stage
from smtp_session.tasks.observe import DEFAULT_OBSERVERS, SessionObserver, report
from smtp_session.tasks.outcome import CertInfo, Outcome, ServerInfo, Timings, TlsInfo
from smtp_session.tasks.request import (
    IMPLICIT_TLS_PORT,
    MAX_HOST_LENGTH,
    SessionRequest,
    parse_request,
)
from smtp_session.tasks.resolve import AddressInfo, connect_first, local_hostname, resolve
from smtp_session.tasks.secrets import Credentials, resolve_credentials
from smtp_session.tasks.trust import (
    TrustMode,
    describe_chain,
    fetch_unverified_chain,
    peer_certificate,
    portable_anchors,
    verifying_context,
)
from smtp_session.tasks.trust_memory import TrustMemory

DEFAULT_BACKOFF_BASE = 1.0
MAX_BACKOFF = 30.0
PASSWORD_MECHANISMS = ("plain", "login")  # in order of preference; one try, no lockouts
# The stages that connect_timeout bounds together; the later ones are command_timeout's.
CONNECT_STAGES = frozenset({Stage.CONNECT, Stage.TLS, Stage.BANNER})
# A timer fires at or just after its deadline: this close to the attempt's, it was that one.
DEADLINE_SLACK = 0.005

log = structlog.get_logger("smtp_session")
_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": half the step fixed, half random."""

    base: float = DEFAULT_BACKOFF_BASE
    cap: float = MAX_BACKOFF

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        step = min(self.cap, self.base * 2 ** (attempt - 1))
        return float(step / 2 + random.uniform(0, step / 2))


DEFAULT_RETRY_POLICY = RetryPolicy()


@dataclass(frozen=True)
class Guards:
    """Where a request may connect, and how many sessions at once to one address.

    `egress`: the policy for requests from the queue (None: an operator's request, not
    restricted). `limit`: the process's bound per destination address (None: unbounded).
    """

    egress: EgressPolicy | None = None
    limit: DestinationLimit | None = None


UNGUARDED = Guards()


def utc_iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> str:
    return utc_iso(time.time())


class _Connection:
    """One TCP connection in one trust mode: resolve → connect → … → QUIT."""

    def __init__(
        self,
        request: SessionRequest,
        credentials: Credentials | None,
        trust: TrustMode | None,
        ehlo_name: str,
        extra_ca_file: str | None = None,
        guards: Guards = UNGUARDED,
        addresses: list[AddressInfo] | None = None,
    ) -> None:
        self.request = request
        self.extra_ca_file = extra_ca_file
        self.guards = guards
        # Resolved once per attempt: the fallback connection reuses what was checked.
        self.addresses = addresses
        self.credentials = credentials
        self.trust = trust
        self.ehlo_name = ehlo_name
        self.implicit_tls = request.effective_security == "tls"
        self.stage = Stage.RESOLVE
        self.timings: dict[str, float] = {}
        self.address: str | None = None
        self.banner: str | None = None
        self.server: ServerInfo | None = None
        self.tls_version: str | None = None
        self.cipher: str | None = None
        self.cert: CertInfo | None = None
        self.verified = False
        self.tls_began = False
        self.auth_before_tls = False
        self.authenticated = False
        self.deadline = 0.0
        self._loop = asyncio.get_running_loop()
        self._stage_started = 0.0
        self._smtp: SMTP | None = None

    def remaining(self) -> float:
        return self.deadline - self._loop.time()

    def _enter(self, stage: Stage) -> None:
        self.tls_began = self.tls_began or stage in (Stage.TLS, Stage.STARTTLS)
        now = self._loop.time()
        if self.stage is not Stage.DONE:
            key = self.stage.value
            self.timings[key] = round(self.timings.get(key, 0.0) + now - self._stage_started, 6)
        self.stage, self._stage_started = stage, now

    async def run(self) -> Failure | None:
        """Run the session; None when it reached the requested state and sent QUIT."""
        self._stage_started = self._loop.time()
        self.deadline = self._stage_started + self.request.timeout
        try:
            async with asyncio.timeout_at(self.deadline):
                await self._session()
        except TimeoutError:
            if self.stage is Stage.QUIT:
                return None  # QUIT is sent; the reply is the server's business
            return self._timed_out()
        except Exception as exc:  # noqa: BLE001 - classified; a bug is INTERNAL, logged
            failure = classify(
                exc,
                self.stage,
                host=self.request.connect_host,
                endpoint=f"{self.address or self.request.connect_host} port "
                f"{self.request.effective_port}",
                credentials=self.credentials,
            )
            if failure.category is ErrorCategory.INTERNAL:
                # The traceback as text, never with local variables (they can hold the
                # secret), whatever renderer the application configured.
                log.error(
                    "session.internal_error",
                    host=self.request.host,
                    stage=self.stage,
                    traceback="".join(traceback.format_exception(exc)),
                )
            return failure
        finally:
            self._enter(self.stage)
            if self._smtp is not None:
                self._smtp.close()
        return None

    def _timed_out(self) -> Failure:
        """A timeout, naming the budget that ran out: the attempt's, or the stage's."""
        now, request, activity = self._loop.time(), self.request, STAGE_ACTIVITY[self.stage]
        if now >= self.deadline - DEADLINE_SLACK or self.stage is Stage.RESOLVE:
            message = f"attempt deadline (timeout) of {request.timeout:g} s reached {activity}"
        else:
            name, budget = (
                ("connect_timeout", request.effective_connect_timeout)
                if self.stage in CONNECT_STAGES
                else ("command_timeout", request.effective_command_timeout)
            )
            waited = now - self._stage_started
            message = f"timed out after {waited:.1f} s {activity} ({name} of {budget:g} s)"
        return Failure(ErrorCategory.TIMEOUT, message, self.stage)

    async def _bounded(self, stage: Stage, step: Awaitable[_T], seconds: float) -> _T:
        self._enter(stage)
        async with asyncio.timeout(seconds):
            return await step

    async def _session(self) -> None:
        request = self.request
        context = (
            None
            if self.trust is None
            else verifying_context(
                self.trust, self.extra_ca_file, request.ca_file, ca_pem=request.ca_pem
            )
        )
        self._enter(Stage.RESOLVE)
        if self.addresses is None:
            self.addresses = await resolve(request.connect_host, request.effective_port)
        addresses = self.addresses
        egress, limit = self.guards.egress, self.guards.limit
        if egress is not None:
            egress.check_addresses(request.connect_host, [info[4][0] for info in addresses])
        self._enter(Stage.CONNECT)
        destination = str(addresses[0][4][0]) if addresses else request.connect_host
        async with limit.slot(destination) if limit else contextlib.nullcontext():
            await self._converse(addresses, context)

    async def _converse(self, addresses: list[AddressInfo], context: ssl.SSLContext | None) -> None:
        """From the TCP connection to QUIT."""
        request = self.request
        connect_deadline = self._loop.time() + request.effective_connect_timeout
        tried: list[str] = []
        try:
            sock = await connect_first(addresses, connect_deadline, tried)
        finally:
            self.address = tried[-1] if tried else None
        smtp = self._smtp = SMTP(
            hostname=request.connect_host,
            sock=sock,
            use_tls=self.implicit_tls,
            start_tls=False,
            tls_context=context,
            local_hostname=self.ehlo_name,
            timeout=None,  # every step is bounded here, by stage and by the attempt deadline
        )
        greeting = await self._greet(smtp, connect_deadline)
        self.banner = f"{greeting.code} {quote_reply(greeting.message)}"
        if self.implicit_tls:
            self._record_tls(smtp)
        command_timeout = request.effective_command_timeout
        await self._bounded(Stage.EHLO, smtp.ehlo(), command_timeout)
        self._record_server(smtp)
        if request.effective_security == "starttls":
            if not smtp.supports_extension("starttls"):
                raise SessionFailure(
                    ErrorCategory.STARTTLS_UNAVAILABLE,
                    "server does not offer STARTTLS; not continuing in plaintext",
                )
            await self._bounded(Stage.STARTTLS, smtp.starttls(tls_context=context), command_timeout)
            self._record_tls(smtp)
            await self._bounded(Stage.EHLO, smtp.ehlo(), command_timeout)
            self._record_server(smtp)
        if self.credentials is not None:
            await self._bounded(
                Stage.AUTH, self._authenticate(smtp, self.credentials), command_timeout
            )
            self.authenticated = True
        self._enter(Stage.QUIT)
        with contextlib.suppress(SMTPException, OSError):  # QUIT is sent: its reply is moot
            await self._bounded(Stage.QUIT, smtp.quit(), command_timeout)
        self._enter(Stage.DONE)

    async def _greet(self, smtp: SMTP, connect_deadline: float) -> SMTPResponse:
        # aiosmtplib runs the implicit TLS handshake and reads the greeting in one call;
        # whether it hung in the handshake or in the greeting is told apart by whether
        # the transport was handed over (smtp.protocol is set once the handshake is done).
        self._enter(Stage.TLS if self.implicit_tls else Stage.BANNER)
        greeting = asyncio.ensure_future(smtp.connect())
        try:
            done, _ = await asyncio.wait({greeting}, timeout=connect_deadline - self._loop.time())
        finally:
            if not greeting.done():
                if self.implicit_tls and smtp.protocol is not None:
                    self._enter(Stage.BANNER)
                greeting.cancel()
                await asyncio.gather(greeting, return_exceptions=True)
        if not done:
            raise TimeoutError
        return greeting.result()

    def _record_tls(self, smtp: SMTP) -> None:
        ssl_object = smtp.get_transport_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.cipher = cipher[0] if cipher else None
        self.cert = peer_certificate(smtp)
        self.verified = True  # the handshake completed with a verifying context

    def _record_server(self, smtp: SMTP) -> None:
        size = smtp.esmtp_extensions.get("size", "")
        # An EHLO reply read in the clear that offers AUTH: a client that believes it
        # would send its credentials in plaintext (this one never does).
        self.auth_before_tls = self.auth_before_tls or (
            smtp.supports_extension("auth") and smtp.get_transport_info("sslcontext") is None
        )
        self.server = ServerInfo(
            banner=self.banner,
            extensions=[name.upper() for name in smtp.esmtp_extensions],
            auth_mechanisms=[name.upper() for name in smtp.server_auth_methods],
            size_limit=int(size) if size.isascii() and size.isdigit() and len(size) < 20 else None,
            auth_before_tls=self.auth_before_tls,
        )

    @staticmethod
    async def _authenticate(smtp: SMTP, credentials: Credentials) -> None:
        offered = smtp.server_auth_methods
        if credentials.oauth2_token is not None:
            if "xoauth2" not in offered:
                raise _auth_unavailable(offered, "XOAUTH2")
            await smtp.auth_xoauth2(credentials.username, credentials.oauth2_token)
            return
        password = credentials.password or ""
        for mechanism in PASSWORD_MECHANISMS:
            if mechanism in offered:
                method = smtp.auth_plain if mechanism == "plain" else smtp.auth_login
                await method(credentials.username, password)
                return
        raise _auth_unavailable(offered, "PLAIN or LOGIN")

    def tls_info(self, *, fallback: bool, cert: CertInfo | None) -> TlsInfo:
        return TlsInfo(
            version=self.tls_version,
            cipher=self.cipher,
            # No handshake began (a DNS or connect failure): no trust mode was used.
            trust=self.trust if self.tls_began else None,
            fallback=fallback,
            verified=self.verified,
            cert=cert,
        )


def _auth_unavailable(offered: list[str], wanted: str) -> SessionFailure:
    if not offered:
        detail = "server does not offer AUTH"
    else:
        mechanisms = quote_reply(" ".join(offered).upper())  # the server's words: bounded
        detail = f"server offers no usable AUTH mechanism (offered: {mechanisms})"
    return SessionFailure(ErrorCategory.AUTH_UNAVAILABLE, f"{detail}; {wanted} needed")


def _explain(
    failure: Failure,
    *,
    cert: CertInfo | None,
    chain: ChainProblem | None,
    both_modes: bool,
    request: SessionRequest,
) -> tuple[str, str | None]:
    """The final err_message and hint, once all the evidence is in."""
    message, hint = failure.message, failure.hint
    security, port = request.effective_security, request.effective_port
    if failure.category is ErrorCategory.TLS_EXPIRED and cert is not None:
        message = (
            f"certificate has expired (notAfter {cert.not_after[:10]})"
            if failure.verify_code == CERT_HAS_EXPIRED
            else f"certificate is not yet valid (notBefore {cert.not_before[:10]})"
        )
    elif failure.category is ErrorCategory.TLS_HOSTNAME:
        names = ", ".join(cert.sans) if cert is not None and cert.sans else "none"
        message = f"certificate is not valid for {request.connect_host} (it names: {names})"
    elif failure.category is ErrorCategory.TLS_UNTRUSTED:
        if chain is not None:
            message = f"certificate verify failed: {chain.message}"
        if both_modes:
            message += " (native and portable trust)"
        hint = (
            "add the issuing CA with ca_file"
            if request.trust != "native"
            else "try trust=auto, or trust=portable with the issuing CA in ca_file"
        )
        if chain is not None:  # it names the CA, or the server's part
            native = request.trust == "native"
            hint = chain.hint("with ca_file and trust=auto" if native else "with ca_file")
    elif (
        failure.category is ErrorCategory.TIMEOUT
        and failure.stage is Stage.BANNER
        and port == IMPLICIT_TLS_PORT
        and security != "tls"
    ):
        hint = "port 465 usually expects implicit TLS: try security=tls"
    elif (
        failure.category is ErrorCategory.TLS_HANDSHAKE
        and hint is None
        and security == "tls"
        and port != IMPLICIT_TLS_PORT
    ):
        hint = f"port {port} usually expects STARTTLS: try security=starttls"
    elif failure.category is ErrorCategory.STARTTLS_UNAVAILABLE:
        hint = "if the server has an implicit TLS port (usually 465), try security=tls there"
    return message, hint


def _preferred_mode(request: SessionRequest) -> TrustMode:
    """The first mode of trust=auto: portable when the request names a CA (ca_file, ca_pem), so the
    CA the operator named is trusted at once; the system's store otherwise."""
    return "portable" if request.names_a_ca else "native"


def _trust_modes(request: SessionRequest, *, needs_portable: bool) -> list[TrustMode | None]:
    """The trust modes to try, in order: the second only after tls_untrusted."""
    if request.effective_security == "plain":
        return [None]
    if request.trust == "auto":
        # A server that needed the portable store last time starts there; it still counts
        # as the fallback, and native gets its turn if portable no longer verifies it.
        first = "portable" if needs_portable else _preferred_mode(request)
        return ["portable", "native"] if first == "portable" else ["native", "portable"]
    return [request.trust]


async def run_attempt(
    request: SessionRequest,
    credentials: Credentials | None,
    *,
    attempt: int,
    started: float | None = None,
    trust_memory: TrustMemory | None = None,
    extra_ca_file: str | None = None,
    guards: Guards = UNGUARDED,
) -> Outcome:
    """One attempt: a connection, plus the portable retry when native trust refused the chain.

    The fallback is a second connection with its own deadline; it is not an attempt.
    `started` (Unix time the request began) makes `timings.total` and `started_at` cover
    the earlier attempts and their backoff too. `extra_ca_file`: the operator's CAs added
    to the portable store for every request (SMTP_SESSION_CA_FILE); a request's own
    `ca_file` is this server's CA, trusted from the first handshake. `guards`: where it may
    connect (a blocked port or address is an outcome, `blocked`, before any connection).
    """
    started = time.time() if started is None else started
    if guards.egress is not None:
        try:
            guards.egress.check_port(request.effective_port)
        except SessionFailure as exc:
            return stopped(request, exc, attempt=attempt, started=started)
    ehlo_name = request.ehlo_name or await local_hostname()
    security = request.effective_security
    pem_digest = hashlib.sha256(request.ca_pem.encode()).hexdigest() if request.ca_pem else None
    memory_key = (request.connect_host, request.effective_port, request.ca_file, pem_digest)
    remembered = trust_memory is not None and trust_memory.needs_portable(memory_key)
    modes = _trust_modes(request, needs_portable=remembered)
    addresses: list[AddressInfo] | None = None
    timings: dict[str, float] = {}
    for index, mode in enumerate(modes):
        connection = _Connection(
            request, credentials, mode, ehlo_name, extra_ca_file, guards, addresses
        )
        failure = await connection.run()
        addresses = connection.addresses
        for stage, seconds in connection.timings.items():  # the attempt's, every connection
            timings[stage] = round(timings.get(stage, 0.0) + seconds, 6)
        last = index == len(modes) - 1
        if failure is None or failure.category is not ErrorCategory.TLS_UNTRUSTED or last:
            break
    # Verified in the other store than the preferred one: the fallback ran now, or it ran
    # before and the trust memory starts this server in the portable store.
    fallback = request.trust == "auto" and connection.trust != _preferred_mode(request)
    if trust_memory is not None and request.trust == "auto" and security != "plain":
        if failure is None:
            trust_memory.remember(memory_key, connection.trust)
        elif failure.category is ErrorCategory.TLS_UNTRUSTED:
            trust_memory.remember(memory_key, None)
    cert, chain = connection.cert, None
    if failure is not None and failure.is_certificate_failure and connection.address:
        presented = await fetch_unverified_chain(
            address=connection.address,
            port=request.effective_port,
            server_hostname=request.connect_host,
            implicit_tls=connection.implicit_tls,
            local_hostname=ehlo_name,
            seconds=connection.remaining(),
        )
        cert = describe_chain(presented)  # None: nothing presented that cryptography reads
        if cert is not None and failure.category is ErrorCategory.TLS_UNTRUSTED:
            anchors = portable_anchors(extra_ca_file, request.ca_file, ca_pem=request.ca_pem)
            chain = diagnose(presented, anchors)
    if connection.auth_before_tls:
        log.warning(
            "session.auth_before_tls",
            host=request.host,
            port=request.effective_port,
            address=connection.address,
            target=request.target,
        )
    message, hint = ("", None)
    if failure is not None:
        message, hint = _explain(
            failure, cert=cert, chain=chain, both_modes=index > 0, request=request
        )
    return Outcome(
        ok=failure is None,
        err_message=message,
        error=failure.category if failure else None,
        stage=failure.stage if failure else Stage.DONE,
        retryable=failure.category.retryable if failure else False,
        hint=hint,
        smtp_code=failure.smtp_code if failure else None,
        smtp_enhanced=failure.smtp_enhanced if failure else None,
        host=request.host,
        port=request.effective_port,
        address=connection.address,
        security=security,
        target=request.target,
        tls=None if security == "plain" else connection.tls_info(fallback=fallback, cert=cert),
        server=connection.server,
        authenticated=connection.authenticated,
        timings=Timings(**timings, total=round(time.time() - started, 6)),
        attempts=attempt,
        started_at=utc_iso(started),
    )


def prepare(
    fields: SessionRequest | Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> tuple[SessionRequest, Credentials | None]:
    """Validate a request and resolve its credentials reference; raises InvalidRequest."""
    request = fields if isinstance(fields, SessionRequest) else parse_request(fields)
    if request.ca_file is not None:
        # Read here, where the session runs: a backend that enqueues does not have the file.
        try:
            verifying_context("portable", request.ca_file)
        except (OSError, ssl.SSLError) as exc:
            problem = (
                "holds no PEM certificate"
                if isinstance(exc, ssl.SSLError) or not exc.strerror
                else exc.strerror
            )
            raise InvalidRequest("ca_file", f"{request.ca_file!r}: {problem}") from None
    credentials = resolve_credentials(request.credentials, environ) if request.credentials else None
    return request, credentials


def rejected(error: InvalidRequest, fields: object, *, started_at: str | None = None) -> Outcome:
    """The Outcome of a request refused before any I/O."""
    raw = fields.model_dump() if isinstance(fields, SessionRequest) else fields
    host = raw.get("host") if isinstance(raw, Mapping) else None
    port = raw.get("port") if isinstance(raw, Mapping) else None
    target = raw.get("target") if isinstance(raw, Mapping) else None
    return Outcome(
        ok=False,
        err_message=str(error),
        error=ErrorCategory.INVALID_REQUEST,
        stage=Stage.VALIDATE,
        host=quote_reply(host)[:MAX_HOST_LENGTH] if isinstance(host, str) else "",
        port=port if isinstance(port, int) and not isinstance(port, bool) else None,
        target=target if isinstance(target, str) and error.field != "target" else None,
        started_at=started_at or utc_now(),
    )


def stopped(
    request: SessionRequest,
    reason: SessionFailure | TimeoutError,
    *,
    attempt: int,
    started: float,
) -> Outcome:
    """The Outcome of an attempt stopped before or outside its session.

    A SessionFailure (the egress policy refused it) stops it before anything is sent; a
    TimeoutError is a task's time limit, which only a bug reaches (every stage has its own
    deadline inside the attempt's), logged as one.
    """
    if isinstance(reason, SessionFailure):
        category, message = reason.category, reason.message
    else:
        category, message = ErrorCategory.INTERNAL, f"internal error: {reason}"
        log.error("session.internal_error", host=request.host, stage=None, traceback=str(reason))
    return Outcome(
        ok=False,
        err_message=message,
        error=category,
        stage=Stage.VALIDATE,
        retryable=category.retryable,
        host=request.host,
        port=request.effective_port,
        security=request.effective_security,
        target=request.target,
        timings=Timings(total=round(time.time() - started, 6)),
        attempts=attempt,
        started_at=utc_iso(started),
    )


async def open_session(
    request: SessionRequest | Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    observers: Sequence[SessionObserver] = DEFAULT_OBSERVERS,
    trust_memory: TrustMemory | None = None,
    extra_ca_file: str | None = None,
    guards: Guards = UNGUARDED,
) -> Outcome:
    """Open one SMTP session as the request asks, retrying retryable failures.

    Never raises for a failed session or bad input: the Outcome says what happened.
    Each attempt and the final outcome are reported to `observers` (by default the log).
    """
    started = time.time()
    try:
        session_request, credentials = prepare(request, environ)
    except InvalidRequest as exc:
        outcome = rejected(exc, request, started_at=utc_iso(started))
        report(outcome, final=True, observers=observers)
        return outcome
    attempt = 1
    while True:
        outcome = await run_attempt(
            session_request,
            credentials,
            attempt=attempt,
            started=started,
            trust_memory=trust_memory,
            extra_ca_file=extra_ca_file,
            guards=guards,
        )
        report(outcome, final=False, observers=observers)
        if outcome.ok or not outcome.retryable or attempt > session_request.retries:
            break
        await sleep(retry_policy.delay(attempt))
        attempt += 1
    report(outcome, final=True, observers=observers)
    return outcome

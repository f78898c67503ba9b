"""open_session: one SMTP session request with deadlines, retries and the trust fallback.

Pure asyncio: no Celery, no broker, nothing beyond the network it is asked to reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPException,
    SMTPHeloError,
    SMTPResponse,
    SMTPResponseException,
    SMTPStatus,
)
from aiosmtplib.auth import auth_xoauth2_encode

from smtp_session.tasks.chain import ChainProblem, diagnose
from smtp_session.tasks.classify import (
    CERT_HAS_EXPIRED,
    CLIENT_CERTIFICATE_REQUIRED,
    STAGE_ACTIVITY,
    Failure,
    classify,
)
from smtp_session.tasks.client_auth import asked_for_certificate
from smtp_session.tasks.egress import DestinationLimit, EgressPolicy
from smtp_session.tasks.envelope import (
    Envelope,
    EnvelopeReply,
    SentTestMessage,
    compose_test_message,
    needs_smtputf8,
)
from smtp_session.tasks.errors import ErrorCategory, InvalidRequest, SessionFailure, Stage
from smtp_session.tasks.oauth import TOKENS
from smtp_session.tasks.observe import DEFAULT_OBSERVERS, SessionObserver, report
from smtp_session.tasks.outcome import CertInfo, Outcome, ServerInfo, Timings, TlsInfo
from smtp_session.tasks.probe import PROBE_SECONDS, PortEvidence, Speaks, probe
from smtp_session.tasks.provider_replies import (
    describe_xoauth2_challenge,
    is_rate_limited,
    reply_hint,
)
from smtp_session.tasks.request import (
    MAX_HOST_LENGTH,
    SessionRequest,
    parse_request,
)
from smtp_session.tasks.resolve import (
    AddressInfo,
    address_literal,
    connect_first,
    local_fqdn,
    resolve,
)
from smtp_session.tasks.secrets import Credentials, redact, resolve_credentials
from smtp_session.tasks.server_text import keywords, quote_reply
from smtp_session.tasks.transcript import Transcript
from smtp_session.tasks.trust import (
    SMTPClient,
    TrustMode,
    ca_file_problem,
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
# EHLO replies that mean "no such command" (RFC 5321 §4.1.1.1): the client falls back to HELO.
EHLO_UNKNOWN = frozenset({500, 502})
# The stages that connect_timeout bounds together; the later ones are command_timeout's.
CONNECT_STAGES = frozenset({Stage.CONNECT, Stage.TLS, Stage.BANNER})
# A timer fires at or just after its deadline: this close to the attempt's, it was that one.
DEADLINE_SLACK = 0.005

log = structlog.get_logger("smtp_session")
_T = TypeVar("_T")
_R = TypeVar("_R", EnvelopeReply, SentTestMessage)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": half the step fixed, half random.

    A rate-limited attempt (a reply tasks.provider_replies marks so: too many logins, try
    again later) skips the ramp and waits the long backoff, the capped step, from its first
    retry: 15-30 s by default, never the quick 0.5-1 s. The cap stays the longest wait, as
    the broker's redelivery timeout and a sweep's time limit expect.
    """

    base: float = DEFAULT_BACKOFF_BASE
    cap: float = MAX_BACKOFF

    def delay(self, attempt: int, *, rate_limited: bool = False) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        step = self.cap if rate_limited else min(self.cap, self.base * 2 ** (attempt - 1))
        return float(step / 2 + random.uniform(0, step / 2))

    def after(self, outcome: Outcome) -> float:
        """Seconds to wait between `outcome`'s attempt and the next one."""
        return self.delay(outcome.attempts, rate_limited=is_rate_limited(outcome))


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


class _Client(SMTPClient):
    """aiosmtplib's client, keeping the TLS object of its connection when it closes.

    aiosmtplib drops the transport as soon as the server closes the connection, before
    the failure is classified; what the handshake showed is still needed then.
    """

    tls: ssl.SSLObject | None = None

    def close(self) -> None:
        if self.transport is not None:
            self.tls = self.transport.get_extra_info("ssl_object") or self.tls
        super().close()


class _Connection:
    """One TCP connection in one trust mode: resolve → connect → … → QUIT."""

    def __init__(
        self,
        request: SessionRequest,
        credentials: Credentials | None,
        trust: TrustMode | None,
        ehlo_name: str | None,
        extra_ca_file: str | None = None,
        guards: Guards = UNGUARDED,
        addresses: list[AddressInfo] | None = None,
        transcript: Transcript | None = None,
    ) -> None:
        self.request = request
        self.transcript = transcript
        self.extra_ca_file = extra_ca_file
        self.guards = guards
        # Resolved once per attempt: the fallback connection reuses what was checked.
        self.addresses = addresses
        self.credentials = credentials
        self.trust = trust
        # None: the address literal of this connection's own end, once connected.
        self.ehlo_name = ehlo_name
        self.mechanism: str | None = None  # the AUTH mechanism used, once AUTH began
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
        self.envelope: Envelope | None = None
        self.deadline = 0.0
        self._loop = asyncio.get_running_loop()
        self._stage_started = 0.0
        self.evidence: PortEvidence | None = None  # what the port speaks, if it was probed
        self._connect_started = 0.0  # when connect_timeout's budget began
        self._smtp: _Client | None = None

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
            if self._refused_without_certificate(failure):
                message = (
                    f"{CLIENT_CERTIFICATE_REQUIRED} (it asked for one, then closed the connection)"
                )
                failure = Failure(ErrorCategory.TLS_HANDSHAKE, message, failure.stage)
            if self.transcript is not None and self.stage in (Stage.TLS, Stage.STARTTLS):
                self.transcript.tls(f"handshake failed ({self.trust} trust): {failure.message}")
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

    def _refused_without_certificate(self, failure: Failure) -> bool:
        """The server asked for a client certificate in the handshake (we present none) and
        closed the connection before its first reply over TLS: the greeting with implicit
        TLS, the EHLO reply after STARTTLS. With TLS 1.3 that is where its refusal lands."""
        first_reply = (Stage.TLS, Stage.BANNER) if self.implicit_tls else (Stage.EHLO,)
        lost = (ErrorCategory.REFUSED, ErrorCategory.DISCONNECTED)
        if self._smtp is None or failure.stage not in first_reply or failure.category not in lost:
            return False
        self._smtp.close()  # keeps the TLS object, if aiosmtplib has not closed it already
        return asked_for_certificate(self._smtp.tls)

    def _timed_out(self) -> Failure:
        """A timeout, naming the budget that ran out: the attempt's, or the stage's."""
        now, request, activity = self._loop.time(), self.request, STAGE_ACTIVITY[self.stage]
        if self.implicit_tls and self.stage is Stage.BANNER:
            activity += " after the TLS handshake"
        if now >= self.deadline - DEADLINE_SLACK or self.stage is Stage.RESOLVE:
            message = f"attempt deadline (timeout) of {request.timeout:g} s reached {activity}"
        else:
            # connect_timeout is one budget for connect, TLS and greeting: all of it ran out.
            name, budget, since = (
                ("connect_timeout", request.effective_connect_timeout, self._connect_started)
                if self.stage in CONNECT_STAGES
                else ("command_timeout", request.effective_command_timeout, self._stage_started)
            )
            message = f"timed out after {now - since:.1f} s {activity} ({name} of {budget:g} s)"
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
        self._connect_started = self._loop.time()
        connect_deadline = self._connect_started + request.effective_connect_timeout
        tried: list[str] = []
        try:
            sock = await connect_first(addresses, connect_deadline, tried)
        finally:
            self.address = tried[-1] if tried else None
        self.ehlo_name = self.ehlo_name or address_literal(sock.getsockname()[0])
        smtp = self._smtp = _Client(
            # The name for SNI and verification, in both modes (STARTTLS defaults to it);
            # the connection itself goes to the address resolved from `host`.
            hostname=request.tls_server_name,
            sock=sock,
            use_tls=self.implicit_tls,
            start_tls=False,
            tls_context=context,
            local_hostname=self.ehlo_name,
            timeout=None,  # every step is bounded here, by stage and by the attempt deadline
        )
        smtp.transcript = self.transcript
        greeting = await self._greet(smtp, connect_deadline)
        if self.implicit_tls:
            self._record_tls(smtp)
        if self.transcript is not None:
            self.transcript.received(greeting.code, greeting.message)
        self.banner = f"{greeting.code} {quote_reply(greeting.message)}"
        command_timeout = request.effective_command_timeout
        await self._bounded(Stage.EHLO, self._hello(smtp), command_timeout)
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
        if request.mail_from is not None and request.rcpt_to is not None:
            await self._probe_envelope(smtp, request.mail_from, request.rcpt_to)
        self._enter(Stage.QUIT)
        with contextlib.suppress(SMTPException, OSError):  # QUIT is sent: its reply is moot
            await self._bounded(Stage.QUIT, smtp.quit(), command_timeout)
        self._enter(Stage.DONE)

    async def _hello(self, smtp: SMTP) -> None:
        """EHLO; HELO instead from a server without EHLO, when no extension is needed.

        STARTTLS and AUTH are extensions: without EHLO the server offers neither, so then
        its refusal stands (a hint says so).
        """
        try:
            await smtp.ehlo()
        except SMTPHeloError as exc:
            needs_extensions = (
                self.request.effective_security == "starttls" or self.credentials is not None
            )
            if exc.code not in EHLO_UNKNOWN or needs_extensions or not smtp.is_connected:
                raise
            await smtp.helo()

    async def _probe_envelope(self, smtp: SMTP, mail_from: str, rcpt_to: list[str]) -> None:
        """MAIL FROM, each RCPT TO, then RSET (or DATA with the test message).

        Every recipient is asked even after a refusal, so the outcome says which ones the
        server takes; the first refusal is then the session's failure.
        """
        timeout = self.request.effective_command_timeout
        international = [a for a in (mail_from, *rcpt_to) if needs_smtputf8(a)]
        if international and not smtp.supports_extension("smtputf8"):
            raise SessionFailure(
                ErrorCategory.SENDER_REJECTED
                if international[0] == mail_from
                else ErrorCategory.RECIPIENT_REJECTED,
                f"server does not offer SMTPUTF8, which {international[0]!r} needs",
            )
        options, encoding = (["SMTPUTF8"], "utf-8") if international else ([], "ascii")
        sender = EnvelopeReply(address=mail_from)
        recipients = [EnvelopeReply(address=address) for address in rcpt_to]
        self.envelope = Envelope(mail_from=sender, rcpt_to=recipients)
        try:
            reply = await self._bounded(
                Stage.MAIL, smtp.mail(mail_from, options=options, encoding=encoding), timeout
            )
        except SMTPResponseException as exc:
            self.envelope = Envelope(mail_from=self._heard(sender, exc), rcpt_to=recipients)
            raise
        sender = self._heard(sender, reply)
        refusal: SMTPResponseException | None = None
        for index, recipient in enumerate(recipients):
            try:
                answer: SMTPResponse | SMTPResponseException = await self._bounded(
                    Stage.RCPT, smtp.rcpt(recipient.address, encoding=encoding), timeout
                )
            except SMTPResponseException as exc:
                answer, refusal = exc, refusal or exc
            recipients[index] = self._heard(recipient, answer)
            self.envelope = Envelope(mail_from=sender, rcpt_to=recipients)
        if refusal is not None or not self.request.send_test_message:
            with contextlib.suppress(SMTPException, OSError):  # ends the envelope; moot
                await self._bounded(Stage.RCPT, smtp.rset(), timeout)
            if refusal is not None:
                raise refusal
            return
        # The Message-ID's domain is the sender's, as mail clients write it.
        message, message_id = compose_test_message(
            mail_from, rcpt_to, message_id_domain=mail_from.rpartition("@")[2] or "localhost"
        )
        sent = SentTestMessage(message_id=message_id)
        self.envelope = Envelope(mail_from=sender, rcpt_to=recipients, test_message=sent)
        try:
            reply = await self._bounded(Stage.DATA, smtp.data(message.as_bytes()), timeout)
        except SMTPResponseException as exc:
            self.envelope = self.envelope.model_copy(
                update={"test_message": self._heard(sent, exc)}
            )
            raise
        self.envelope = self.envelope.model_copy(update={"test_message": self._heard(sent, reply)})

    def _heard(self, record: _R, reply: SMTPResponse | SMTPResponseException) -> _R:
        """`record` with the server's reply: its code, and its text made safe."""
        text = quote_reply(redact(reply.message, self.credentials))
        return record.model_copy(update={"code": reply.code, "message": text})

    async def _greet(self, smtp: SMTP, connect_deadline: float) -> SMTPResponse:
        # aiosmtplib runs the implicit TLS handshake and reads the greeting in one call;
        # whether it hung in the handshake or in the greeting is told apart by whether
        # the transport was handed over (smtp.protocol is set once the handshake is done).
        # Without implicit TLS, the last stretch of the wait is shared with a probe: a port
        # that answers a ClientHello will never greet in plaintext.
        self._enter(Stage.TLS if self.implicit_tls else Stage.BANNER)
        deadline = min(connect_deadline, self.deadline)
        greeting = asyncio.ensure_future(smtp.connect())
        probing = None if self.implicit_tls else asyncio.ensure_future(self._probe_late(deadline))
        answered = False
        try:
            done, _ = await asyncio.wait({greeting}, timeout=deadline - self._loop.time())
            answered = bool(done)
        finally:
            if not greeting.done():
                if self.implicit_tls and smtp.protocol is not None:
                    self._enter(Stage.BANNER)
                greeting.cancel()
                await asyncio.gather(greeting, return_exceptions=True)
            if probing is not None:
                # Done by now unless a greeting came or the attempt was cancelled from outside.
                probing.cancel()
                await asyncio.gather(probing, return_exceptions=True)
                if not answered and not probing.cancelled():
                    self.evidence = probing.result()
        if not answered:
            raise TimeoutError
        try:
            return greeting.result()
        except SMTPResponseException as exc:  # a greeting other than 220
            if self.transcript is not None:
                self.transcript.received(exc.code, exc.message)
            raise

    async def _probe_late(self, deadline: float) -> PortEvidence | None:
        """Whether the port answers a ClientHello, asked on a second connection opened only
        if no greeting has come PROBE_SECONDS (or half the wait) before `deadline`."""
        window = min(PROBE_SECONDS, (deadline - self._loop.time()) / 2)
        await asyncio.sleep(deadline - window - self._loop.time())
        if self.address is None:
            return None
        # Ends just before the deadline: when the attempt's own deadline ends the wait, the
        # evidence is in already (timers that fire together run in the order they are due).
        return await probe(
            self.address,
            self.request.effective_port,
            seconds=deadline - DEADLINE_SLACK - self._loop.time(),
            server_name=self.request.tls_server_name,
        )

    def _record_tls(self, smtp: SMTP) -> None:
        ssl_object = smtp.get_transport_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.cipher = cipher[0] if cipher else None
        self.cert = peer_certificate(smtp)
        self.verified = True  # the handshake completed with a verifying context
        if self.transcript is not None:
            self.transcript.tls(
                f"{self.tls_version} {self.cipher}: certificate verified ({self.trust} trust)"
            )

    def _record_server(self, smtp: SMTP) -> None:
        size = smtp.esmtp_extensions.get("size", "")
        # An EHLO reply read in the clear that offers AUTH: a client that believes it
        # would send its credentials in plaintext (this one never does).
        self.auth_before_tls = self.auth_before_tls or (
            smtp.supports_extension("auth") and smtp.get_transport_info("sslcontext") is None
        )
        self.server = ServerInfo(
            banner=self.banner,
            extensions=keywords(list(smtp.esmtp_extensions)),
            auth_mechanisms=keywords(smtp.server_auth_methods),
            size_limit=int(size) if size.isascii() and size.isdigit() and len(size) < 20 else None,
            auth_before_tls=self.auth_before_tls,
        )

    async def _authenticate(self, smtp: SMTP, credentials: Credentials) -> None:
        offered = smtp.server_auth_methods
        if credentials.uses_xoauth2:
            if "xoauth2" not in offered:
                raise _auth_unavailable(offered, "XOAUTH2")
            self.mechanism = "XOAUTH2"
            # Within what is left of the AUTH stage, and said as the endpoint's failure.
            stage_left = self.request.effective_command_timeout - (
                self._loop.time() - self._stage_started
            )
            token = credentials.oauth2_token or await TOKENS.access_token(
                credentials,
                extra_ca_file=self.extra_ca_file,
                seconds=min(stage_left, self.remaining()) - DEADLINE_SLACK,
            )
            # From here on the access token is part of the secret: redacted like it.
            self.credentials = replace(credentials, oauth2_token=token)
            if self.transcript is not None:
                self.transcript.credentials = self.credentials
            try:
                await _auth_xoauth2(smtp, credentials.username, token)
            except SMTPAuthenticationError:
                if credentials.oauth2_client is not None:
                    TOKENS.forget(credentials)  # revoked early? the next attempt asks anew
                raise
            return
        password = credentials.password or ""
        for mechanism in PASSWORD_MECHANISMS:
            if mechanism in offered:
                self.mechanism = mechanism.upper()
                method = smtp.auth_plain if mechanism == "plain" else smtp.auth_login
                await method(credentials.username, password)
                return
        raise _auth_unavailable(offered, "PLAIN or LOGIN")

    def tls_info(self, *, fallback: bool, remembered: bool, cert: CertInfo | None) -> TlsInfo:
        return TlsInfo(
            version=self.tls_version,
            cipher=self.cipher,
            # No handshake began (a DNS or connect failure): no trust mode was used.
            trust=self.trust if self.tls_began else None,
            fallback=fallback,
            remembered=remembered,
            verified=self.verified,
            cert=cert,
        )


async def _auth_xoauth2(smtp: SMTP, username: str, token: str) -> None:
    """XOAUTH2 as aiosmtplib's auth_xoauth2 speaks it, keeping the server's error challenge.

    A server refusing the token answers 334 with why (Gmail: base64 JSON with a status and
    the scope it wants), then refuses with the empty reply: aiosmtplib answers the
    challenge and drops it, which leaves only a "535 Username and Password not accepted".
    """
    reply = await smtp.execute_command(b"AUTH", b"XOAUTH2", auth_xoauth2_encode(username, token))
    challenge = None
    if reply.code == SMTPStatus.auth_continue:
        challenge = reply.message
        reply = await smtp.execute_command(b"")
    if reply.code != SMTPStatus.auth_successful:
        said = reply.message
        if challenge is not None:  # a line of its own: redacted and bounded with the reply
            said += "\n" + describe_xoauth2_challenge(challenge)
        raise SMTPAuthenticationError(reply.code, said)


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
    if failure.category is ErrorCategory.TLS_EXPIRED and cert is not None:
        message = (
            f"certificate has expired (notAfter {cert.not_after[:10]})"
            if failure.verify_code == CERT_HAS_EXPIRED
            else f"certificate is not yet valid (notBefore {cert.not_before[:10]})"
        )
    elif failure.category is ErrorCategory.TLS_HOSTNAME:
        names = ", ".join(cert.sans) if cert is not None and cert.sans else "none"
        message = f"certificate is not valid for {request.tls_server_name} (it names: {names})"
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
    elif failure.category is ErrorCategory.STARTTLS_UNAVAILABLE:
        hint = "if the server has an implicit TLS port (usually 465), try security=tls there"
    return message, hint


def _mode_hint(evidence: PortEvidence | None, request: SessionRequest) -> str | None:
    """The other mode, when the port itself showed that it speaks that one (tasks/probe.py).

    Only the port's own bytes justify it: a port number does not, nor does a TLS alert
    (which says the port speaks TLS, only not with us).
    """
    port, security = request.effective_port, request.effective_security
    if evidence is None:
        return None
    if evidence.speaks is Speaks.TLS and security != "tls":
        return (
            f"port {port} speaks TLS from the first byte (it answered a TLS ClientHello "
            "and sent no greeting): try security=tls"
        )
    if evidence.speaks is Speaks.SMTP and security == "tls":
        return f'port {port} greets in plaintext ("{evidence.line}"): try security=starttls'
    return None


def _preferred_mode(request: SessionRequest) -> TrustMode:
    """The first mode of trust=auto: portable when the request names a CA (ca_file, ca_pem), so the
    CA the operator named is trusted at once; the system's store otherwise."""
    return "portable" if request.names_a_ca else "native"


def _trust_modes(request: SessionRequest, *, remembered: bool) -> list[TrustMode | None]:
    """The trust modes to try, in order: the second only after tls_untrusted."""
    if request.effective_security == "plain":
        return [None]
    if request.trust == "auto":
        # A server the trust memory holds starts in the portable store (no fallback: native
        # never ran), and native gets its turn if portable no longer verifies it.
        first = "portable" if remembered else _preferred_mode(request)
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
    ehlo_name = request.ehlo_name or await local_fqdn()
    security = request.effective_security
    # The memory serves trust=auto where native trust comes first: a request that names its
    # CA starts in the portable store anyway.
    memory = (
        trust_memory
        if request.trust == "auto" and security != "plain" and not request.names_a_ca
        else None
    )
    memory_key = (request.connect_host, request.effective_port)
    remembered = memory is not None and memory.needs_portable(memory_key)
    modes = _trust_modes(request, remembered=remembered)
    addresses: list[AddressInfo] | None = None
    timings: dict[str, float] = {}
    transcript = Transcript(credentials) if request.transcript else None
    for index, mode in enumerate(modes):
        connection = _Connection(
            request, credentials, mode, ehlo_name, extra_ca_file, guards, addresses, transcript
        )
        failure = await connection.run()
        addresses = connection.addresses
        for stage, seconds in connection.timings.items():  # the attempt's, every connection
            timings[stage] = round(timings.get(stage, 0.0) + seconds, 6)
        last = index == len(modes) - 1
        if failure is None or failure.category is not ErrorCategory.TLS_UNTRUSTED or last:
            break
    # The fallback: native trust ran in this attempt, refused the chain, and portable followed.
    fallback = index > 0 and modes[0] == "native"
    if memory is not None:
        if failure is None:
            memory.remember(memory_key, connection.trust)
        elif failure.category is ErrorCategory.TLS_UNTRUSTED:
            memory.remember(memory_key, None)
    cert, chain = connection.cert, None
    certificate_refused = failure is not None and failure.is_certificate_failure
    if certificate_refused and connection.address and connection.ehlo_name:
        presented = await fetch_unverified_chain(
            address=connection.address,
            port=request.effective_port,
            server_hostname=request.tls_server_name,
            implicit_tls=connection.implicit_tls,
            local_hostname=connection.ehlo_name,
            seconds=connection.remaining(),
        )
        cert = describe_chain(presented)  # None: nothing presented that cryptography reads
        if (
            cert is not None
            and failure is not None
            and failure.category is ErrorCategory.TLS_UNTRUSTED
        ):
            anchors = portable_anchors(extra_ca_file, request.ca_file, ca_pem=request.ca_pem)
            chain = diagnose(presented, anchors)
    evidence = connection.evidence
    read_no_tls = failure is not None and failure.peer_not_tls and failure.stage is Stage.TLS
    if read_no_tls and connection.address:
        # The implicit TLS handshake read no TLS: does the port greet in plaintext, unasked?
        evidence = await probe(
            connection.address,
            request.effective_port,
            seconds=min(PROBE_SECONDS, connection.remaining()),
        )
    # The port speaks the other mode: no attempt in this one can succeed.
    wrong_mode = _mode_hint(evidence, request) if failure is not None else None
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
        hint = reply_hint(failure, mechanism=connection.mechanism) or hint
    tls = connection.tls_info(fallback=fallback, remembered=remembered, cert=cert)
    return Outcome(
        ok=failure is None,
        err_message=message,
        error=failure.category if failure else None,
        stage=failure.stage if failure else Stage.DONE,
        retryable=(failure.is_retryable and wrong_mode is None) if failure else False,
        hint=wrong_mode or hint,
        smtp_code=failure.smtp_code if failure else None,
        smtp_enhanced=failure.smtp_enhanced if failure else None,
        host=request.host,
        port=request.effective_port,
        address=connection.address,
        security=security,
        target=request.target,
        tls=None if security == "plain" else tls,
        server=connection.server,
        authenticated=connection.authenticated,
        timings=Timings(**timings, total=round(time.time() - started, 6)),
        attempts=attempt,
        started_at=utc_iso(started),
        transcript=transcript.lines() if transcript is not None else None,
        envelope=connection.envelope,
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
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise InvalidRequest(
                "ca_file", f"{request.ca_file!r}: {ca_file_problem(exc)}"
            ) from None
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
        await sleep(retry_policy.after(outcome))
        attempt += 1
    report(outcome, final=True, observers=observers)
    return outcome

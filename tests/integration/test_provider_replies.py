"""Every row of tasks.provider_replies, against a loopback server sending that reply.

The replies are the providers' own words (Microsoft 365, Gmail, Postfix, Exim, Exchange),
sent by a real aiosmtpd server in place of its own reply to EHLO or AUTH. Each case
checks the whole reply in `err_message` (every line), the row's hint, and the retries:
auth failures never, rate limits only after the long backoff.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.provider_replies import REPLY_HINTS
from smtp_session.tasks.secrets import REDACTED
from smtp_session.tasks.session import MAX_BACKOFF, open_session
from tests.integration.test_session import RecordingSleep
from tests.servers import AUTH_FAILED_REPLY, LOOPBACK, SmtpMode, SmtpServer, SmtpServerFactory

USER, PASSWORD, TOKEN = "alice@example.com", "correct horse battery", "ya29.a0-bearer-token"
SECRETS = {
    "SMTP_SESSION_SECRET_PASSWORD": f"{USER}:{PASSWORD}",
    "SMTP_SESSION_SECRET_OAUTH": f'{{"username": "{USER}", "oauth2_token": "{TOKEN}"}}',
}
#: Gmail's challenge to a refused XOAUTH2 token (base64 on the wire).
GMAIL_OAUTH_ERROR = {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
RETRIES = 1
M365_STAMP = "[SN4PR0501CA0054.namprd05.prod.outlook.com 2024-05-01T10:00:00.000Z 08DC69B3C2A9F1E2]"
GMAIL_STAMP = "5b1f17b1804b1-43b0d9c0f1asm12345678f8a.2 - gsmtp"
TOO_MANY_LOGINS = f"454 4.7.0 Too many login attempts, please try again later. {GMAIL_STAMP}"


@dataclass(frozen=True)
class Case:
    """A server sending `reply` to `command`, the request meeting it, and what must follow."""

    row: str | None  # the row whose hint the Outcome carries; None: no hint
    reply: str  # lines joined by CRLF, as sent
    command: str | None = "AUTH"  # None: the server's own reply (see `server`)
    mode: SmtpMode = "starttls"
    credentials: str | None = "password"
    error: str = "auth_failed"
    stage: str = "auth"
    server: dict[str, Any] = field(default_factory=dict)  # more SmtpServer options
    more: str = ""  # what err_message adds to the reply

    @property
    def err_message(self) -> str:
        """The reply as err_message shows it: its code once, then every line's text."""
        lines = self.reply.split("\r\n")
        return f"{lines[0][:3]} " + " / ".join(line[4:].strip() for line in lines) + self.more


def to_ehlo(row: str, reply: str, *, mode: SmtpMode = "plain", login: bool = False) -> Case:
    """A reply to EHLO, so the session ends there: a 4xx is transient, a 5xx permanent."""
    return Case(
        row,
        reply,
        command="EHLO",
        mode=mode,
        credentials="password" if login else None,
        error="smtp_transient" if reply.startswith("4") else "smtp_permanent",
        stage="ehlo",
    )


CASES = [
    Case(
        "m365-smtp-auth-disabled",
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
        f"the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. {M365_STAMP}",
    ),
    Case(
        "m365-basic-auth-disabled",
        f"535 5.7.139 Authentication unsuccessful, basic authentication is disabled. {M365_STAMP}",
    ),
    Case(
        "m365-basic-auth-not-supported",
        "550 5.7.30 Basic authentication is not supported for Client Submission.",
    ),
    Case(
        "m365-xoauth2-refused",
        f"535 5.7.3 Authentication unsuccessful {M365_STAMP}",
        credentials="oauth",
    ),
    # The same words after a password: nothing says which of the token's causes it is.
    Case(None, f"535 5.7.3 Authentication unsuccessful {M365_STAMP}"),
    Case(
        "google-app-password-required",
        "534-5.7.9 Application-specific password required. For more information, go to\r\n"
        f"534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor {GMAIL_STAMP}",
    ),
    Case(
        "google-bad-credentials",
        "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
        f"535 5.7.8  https://support.google.com/mail/?p=BadCredentials {GMAIL_STAMP}",
    ),
    # Implicit TLS ended by a proxy in front of a server that wants STARTTLS.
    Case("starttls-first", "530 5.7.0 Must issue a STARTTLS command first", mode="tls"),
    Case(
        "not-authenticated",
        f"530 5.7.57 Client not authenticated to send mail. {M365_STAMP}",
    ),
    Case("too-many-logins", TOO_MANY_LOGINS, error="smtp_transient"),
    to_ehlo(
        "try-again-later",
        "421-4.7.0 Try again later, closing connection. (EHLO)\r\n"
        f"421 4.7.0  For more information, go to https://support.google.com/a/answer/3221692 "
        f"{GMAIL_STAMP}",
        mode="starttls",
    ),
    to_ehlo(
        "tls-too-old",
        "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to "
        f"support TLS 1.2. Visit https://aka.ms/smtp_auth_tls. {M365_STAMP}",
        mode="tls",
    ),
    # A HELO-only server where STARTTLS, or AUTH, needs EHLO's extensions.
    to_ehlo("ehlo-not-supported", "502 5.5.2 Error: command not recognized", mode="starttls"),
    to_ehlo("ehlo-not-supported", "500 5.5.1 Command unrecognized", mode="tls", login=True),
    # Exchange; Postfix's reject_non_fqdn_helo_hostname and reject_unknown_helo_hostname.
    to_ehlo("ehlo-name-invalid", "501 5.5.4 Invalid domain name"),
    to_ehlo(
        "ehlo-name-refused",
        "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname",
    ),
    to_ehlo("ehlo-name-refused", "450 4.7.1 <localhost>: Helo command rejected: Host not found"),
    to_ehlo("ehlo-name-refused", "550 5.7.1 EHLO name localhost is not a fully qualified name"),
    to_ehlo("ehlo-name-refused", "554 5.7.1 Your hostname localhost does not resolve"),
    # The envelope: Microsoft 365 refuses Send As only once the message is submitted.
    Case(
        "m365-send-as-denied",
        "554 5.2.252 SendAsDenied; app@example.test not allowed to send as "
        "ceo@example.test; STOREDRV.Submission.Exception:SendAsDeniedException",
        command="DATA",
        error="sender_rejected",
        stage="data",
    ),
    Case(
        "m365-send-as-denied",
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        command="DATA",
        error="sender_rejected",
        stage="data",
    ),
    # Postfix's reject_sender_login_mismatch.
    Case(
        "sender-not-owned",
        "553 5.7.1 <ceo@example.test>: Sender address rejected: not owned by user app@example.test",
        command="MAIL",
        error="sender_rejected",
        stage="mail",
    ),
    Case(
        "not-authenticated",
        f"530 5.7.57 Client not authenticated to send mail. {M365_STAMP}",
        command="MAIL",
        credentials=None,
        error="sender_rejected",
        stage="mail",
    ),
    # Gmail refusing a token: the 334 JSON challenge, then its 5.7.8.
    Case(
        "xoauth2-challenge",
        AUTH_FAILED_REPLY,
        command=None,
        credentials="oauth",
        server={"oauth_tokens": {USER: "another account's token"}},
        more=" / XOAUTH2 challenge: status 400, scope https://mail.google.com/",
    ),
]
HINTS = {row.name: row.hint for row in REPLY_HINTS}
ENVELOPE_COMMANDS = ("MAIL", "RCPT", "DATA")


def test_every_row_has_a_case() -> None:
    assert {case.row for case in CASES} >= set(HINTS)


async def open_against(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str, case: Case, sleep: RecordingSleep
) -> tuple[SmtpServer, Outcome]:
    server = await smtp_server_factory(
        mode=case.mode,
        auth={USER: PASSWORD},
        oauth_tokens=case.server.get("oauth_tokens", {USER: TOKEN}),
        oauth_error=GMAIL_OAUTH_ERROR,
        replies={case.command: case.reply} if case.command else None,
    )
    fields: dict[str, Any] = {"host": LOOPBACK, "port": server.port, "security": case.mode}
    if case.mode != "plain":
        fields["ca_file"] = ca_pem_path
    if case.credentials is not None:
        fields["credentials"] = case.credentials
    if case.command in ENVELOPE_COMMANDS:
        fields |= {"mail_from": "ceo@example.test", "rcpt_to": ["alice@example.org"]}
        fields["send_test_message"] = case.command == "DATA"
    outcome = await open_session(
        {**fields, "retries": RETRIES, "timeout": 5.0, "ehlo_name": "probe.example"},
        environ=SECRETS,
        sleep=sleep,
    )
    return server, outcome


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.row}:{case.reply[:9]}")
async def test_a_providers_reply_gets_its_hint(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str, case: Case
) -> None:
    sleep = RecordingSleep()
    server, outcome = await open_against(smtp_server_factory, ca_pem_path, case, sleep)
    assert (outcome.error, outcome.stage) == (case.error, case.stage), outcome
    assert outcome.err_message == case.err_message  # every line, whole and in order
    assert outcome.hint == (HINTS[case.row] if case.row else None)
    assert outcome.smtp_code == int(case.reply[:3])
    # Auth failures and other permanent refusals: one attempt. A rate limit: retried
    # after the long backoff only; any other transient reply after the usual one.
    rate_limited = case.row in {row.name for row in REPLY_HINTS if row.rate_limited}
    assert outcome.attempts == (1 + RETRIES if outcome.retryable else 1)
    assert len(sleep.delays) == outcome.attempts - 1
    assert all((delay >= MAX_BACKOFF / 2) == rate_limited for delay in sleep.delays)
    # One AUTH per attempt that reached it: no second mechanism, no lockout by cycling.
    auths = 0 if case.command == "EHLO" or case.credentials is None else outcome.attempts
    assert server.verbs.count("AUTH") == auths


async def test_a_token_echoed_in_the_challenge_is_redacted(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str
) -> None:
    server = await smtp_server_factory(
        oauth_tokens={USER: "another account's token"},
        oauth_error={"status": "400", "scope": f"https://mail.google.com/ {TOKEN}"},
    )
    outcome = await open_session(
        {"host": LOOPBACK, "port": server.port, "ca_file": ca_pem_path, "credentials": "oauth"},
        environ=SECRETS,
    )
    assert outcome.err_message == (
        "535 5.7.8 Username and Password not accepted / XOAUTH2 challenge: status 400, "
        f"scope https://mail.google.com/ {REDACTED}"
    )
    assert TOKEN not in outcome.model_dump_json()

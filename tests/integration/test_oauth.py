"""XOAUTH2 with an OAuth2 client secret: a real HTTPS token endpoint and SMTP server.

The SMTP server accepts only the access tokens the endpoint issued. The endpoint's
certificate comes from the test CA, which the system's store does not hold: it is
trusted through the portable store with the operator's CA file (SMTP_SESSION_CA_FILE),
as a private identity provider would be.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
import trustme

from smtp_session.tasks.errors import ErrorCategory
from smtp_session.tasks.oauth import EXPIRY_MARGIN, TOKENS
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.session import RetryPolicy, open_session
from tests.servers import LOOPBACK, SmtpServer, SmtpServerFactory
from tests.token_endpoint import TokenEndpoint

USER = "alice@example.test"
CLIENT_ID, CLIENT_SECRET = "client-42.apps.example", "GOCSPX-client-secret-value"
REFRESH_TOKEN = "1//refresh-token-of-alice-0123456789"
REFERENCE = "mailbox"
SECRET_VARIABLE = "SMTP_SESSION_SECRET_MAILBOX"
FAST_RETRY = RetryPolicy(base=0.01, cap=0.02)


class Mailbox:
    """The SMTP server and the token endpoint of one provider, and the secret for both."""

    def __init__(self, smtp: SmtpServer, endpoint: TokenEndpoint, ca_pem_path: str) -> None:
        self.smtp, self.endpoint, self.ca_pem_path = smtp, endpoint, ca_pem_path

    def secret(self, **changes: Any) -> str:
        fields = {
            "username": USER,
            "token_url": self.endpoint.url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "refresh_token": REFRESH_TOKEN,
            "scope": "https://mail.google.com/",
            **changes,
        }
        return json.dumps({key: value for key, value in fields.items() if value is not None})

    async def session(self, *, secret: str | None = None, **fields: Any) -> Outcome:
        return await open_session(
            {
                "host": LOOPBACK,
                "port": self.smtp.port,
                "security": "tls",
                "trust": "portable",
                "credentials": REFERENCE,
                "retries": 0,
                "timeout": 5,
                "ehlo_name": "client.example",
                **fields,
            },
            environ={SECRET_VARIABLE: secret or self.secret()},
            retry_policy=FAST_RETRY,
            extra_ca_file=self.ca_pem_path,
        )


@pytest.fixture
async def mailbox(
    smtp_server_factory: SmtpServerFactory, good_cert: trustme.LeafCert, ca_pem_path: str
) -> AsyncIterator[Mailbox]:
    smtp = await smtp_server_factory(mode="tls", oauth_tokens={})

    def accept(token: str) -> None:
        assert smtp.oauth_tokens is not None
        smtp.oauth_tokens[USER] = token

    endpoint = TokenEndpoint(
        good_cert,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=REFRESH_TOKEN,
        on_issue=accept,
    ).start()
    try:
        yield Mailbox(smtp, endpoint, ca_pem_path)
    finally:
        endpoint.close()


async def test_a_token_is_fetched_once_and_reused(mailbox: Mailbox) -> None:
    outcomes = await asyncio.gather(*(mailbox.session() for _ in range(5)))
    outcomes.append(await mailbox.session())
    assert [o.error for o in outcomes] == [None] * 6, [o.err_message for o in outcomes]
    assert all(o.authenticated for o in outcomes)
    assert len(mailbox.endpoint.requests) == 1  # six sessions, one token
    (form,) = mailbox.endpoint.requests
    assert (form["grant_type"], form["refresh_token"]) == ("refresh_token", REFRESH_TOKEN)
    assert form["scope"] == "https://mail.google.com/"


async def test_an_expiring_token_is_refreshed_with_the_rotated_refresh_token(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An hour's token is used until EXPIRY_MARGIN before it ends (the process's clock,
    # moved on here); the endpoint rotates refresh tokens and refuses the old one then.
    now = [1000.0]
    monkeypatch.setattr(TOKENS, "clock", lambda: now[0])
    mailbox.endpoint.expires_in, mailbox.endpoint.rotate = 3600, True
    first = await mailbox.session()
    now[0] += 3600 - EXPIRY_MARGIN - 1
    again = await mailbox.session()  # still valid: no request
    assert len(mailbox.endpoint.requests) == 1
    now[0] += 2
    later = await mailbox.session()
    assert [first.ok, again.ok, later.ok] == [True, True, True], later.err_message
    refreshes = [form["refresh_token"] for form in mailbox.endpoint.requests]
    assert len(refreshes) == 2
    assert refreshes[0] == REFRESH_TOKEN
    assert refreshes[1] != REFRESH_TOKEN and refreshes[1] in mailbox.endpoint.issued


async def test_client_credentials_without_a_refresh_token(mailbox: Mailbox) -> None:
    outcome = await mailbox.session(secret=mailbox.secret(refresh_token=None, scope=None))
    assert outcome.ok, outcome.err_message
    (form,) = mailbox.endpoint.requests
    assert (form["grant_type"], form["client_id"]) == ("client_credentials", CLIENT_ID)


async def test_a_revoked_refresh_token_is_auth_failed_in_the_endpoints_words(
    mailbox: Mailbox,
) -> None:
    mailbox.endpoint.revoke()
    outcome = await mailbox.session(retries=2)
    assert (outcome.error, outcome.retryable, outcome.attempts) == (
        ErrorCategory.AUTH_FAILED,
        False,
        1,
    )
    assert outcome.err_message == (
        f"token endpoint {mailbox.endpoint.url} refused: "
        "invalid_grant (Token has been expired or revoked.)"
    )
    assert outcome.hint is not None and "consent again" in outcome.hint
    assert outcome.stage == "auth"
    assert mailbox.smtp.auth_attempts == []  # no token, no AUTH


async def test_an_endpoint_error_is_retryable(mailbox: Mailbox) -> None:
    mailbox.endpoint.behaviour = "error_500"
    outcome = await mailbox.session(retries=1)
    assert (outcome.error, outcome.retryable, outcome.attempts) == (
        ErrorCategory.OAUTH_UNAVAILABLE,
        True,
        2,
    )
    assert outcome.err_message == f"token endpoint {mailbox.endpoint.url} unavailable: HTTP 500"
    assert len(mailbox.endpoint.requests) == 2


async def test_a_hanging_endpoint_costs_at_most_the_deadline(mailbox: Mailbox) -> None:
    mailbox.endpoint.behaviour = "hang"
    started = time.monotonic()
    outcome = await mailbox.session(timeout=1.0)
    elapsed = time.monotonic() - started
    assert outcome.error == ErrorCategory.OAUTH_UNAVAILABLE, outcome.err_message
    assert "did not answer within" in outcome.err_message
    assert elapsed < 2.0


async def test_an_untrusted_endpoint_is_refused(mailbox: Mailbox) -> None:
    outcome = await open_session(
        {
            "host": LOOPBACK,
            "port": mailbox.smtp.port,
            "security": "tls",
            "trust": "portable",
            "ca_file": mailbox.ca_pem_path,  # the SMTP server's CA, not the endpoint's
            "credentials": REFERENCE,
            "retries": 0,
        },
        environ={SECRET_VARIABLE: mailbox.secret()},
    )
    assert outcome.error == ErrorCategory.OAUTH_UNAVAILABLE
    assert "certificate verify failed" in outcome.err_message
    assert mailbox.endpoint.requests == []


async def test_no_secret_of_the_client_appears_anywhere(
    mailbox: Mailbox, caplog: pytest.LogCaptureFixture
) -> None:
    with structlog.testing.capture_logs() as events:
        good = await mailbox.session(transcript=True)
        mailbox.endpoint.revoke()
        mailbox.smtp.oauth_tokens = {USER: "not-what-was-issued"}  # the SMTP side refuses
        refused = await mailbox.session(transcript=True)
        after = await mailbox.session()  # the refused token was dropped: a new fetch
    assert good.ok and not refused.ok and not after.ok
    assert good.transcript and refused.transcript  # searched below, with everything else
    assert refused.error == ErrorCategory.AUTH_FAILED
    assert after.err_message.startswith(f"token endpoint {mailbox.endpoint.url} refused")
    produced = "\n".join(
        [
            *(json.dumps(o.to_dict()) for o in (good, refused, after)),
            *(repr(o) for o in (good, refused, after)),
            repr(events),
            caplog.text,
        ]
    )
    for secret in (CLIENT_SECRET, REFRESH_TOKEN, *mailbox.endpoint.issued):
        assert secret not in produced

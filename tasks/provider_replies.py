"""What the replies of real servers mean, as data: one row per reply pattern, with its hint.

A row matches the reply that ended a connection on its code, enhanced status code and a
few words of its text (case-insensitive), and where the words alone would mislead, on the
AUTH mechanism that was refused or the stage it was refused at. The text matched is the
`err_message` itself: redacted, cleaned and bounded, so every hint follows from what the
user reads. The first matching row wins; add a row, and a test against a loopback server
sending that reply (tests/integration/test_provider_replies.py).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from smtp_session.tasks.classify import Failure
from smtp_session.tasks.errors import Stage
from smtp_session.tasks.outcome import Outcome

#: What the session adds to the refusal after an XOAUTH2 error challenge (see below).
XOAUTH2_CHALLENGE = "XOAUTH2 challenge:"


@dataclass(frozen=True)
class ReplyHint:
    """A known reply and what to do about it. An empty or None condition matches anything."""

    name: str  # stable, for tests and docs
    hint: str
    codes: frozenset[int] = frozenset()
    enhanced: str | None = None
    # Any one of these, case-insensitive, in the reply.
    words: tuple[str, ...] = ()
    mechanism: str | None = None  # the AUTH mechanism the reply refused
    stage: Stage | None = None
    # Retried only after the long backoff (tasks.session.RetryPolicy).
    rate_limited: bool = False

    def matches(
        self, code: int, enhanced: str | None, text: str, stage: Stage, mechanism: str | None
    ) -> bool:
        folded = text.casefold()
        return (
            (not self.codes or code in self.codes)
            and (self.enhanced is None or self.enhanced == enhanced)
            and (not self.words or any(word.casefold() in folded for word in self.words))
            and (self.mechanism is None or self.mechanism == mechanism)
            and (self.stage is None or self.stage is stage)
        )


_BASIC_AUTH_REFUSED = (
    "Microsoft 365 refuses basic authentication (a password) here, and an app password "
    "will not help: use XOAUTH2 with a token for https://outlook.office.com/SMTP.Send"
)
_RATE_LIMITED = "retried only after the long backoff"
_EHLO_NAME = (
    "the server refused the name this worker sent in EHLO: set ehlo_name to this host's "
    "fully qualified DNS name, one that resolves to the address it connects from"
)

REPLY_HINTS: tuple[ReplyHint, ...] = (
    # Gmail answers a refused token with a 334 challenge of base64 JSON, then 535 5.7.8:
    # the challenge says why, and the 5.7.8 row below would blame a password.
    ReplyHint(
        "xoauth2-challenge",
        "the server rejected the OAuth2 access token (its XOAUTH2 challenge, in err_message, "
        "gives the status and the scope it wants): get a new token for this username with "
        "that scope; an expired or revoked token, or another account's, is refused alike",
        words=(XOAUTH2_CHALLENGE,),
        mechanism="XOAUTH2",
    ),
    ReplyHint(
        "m365-smtp-auth-disabled",
        # Microsoft's OAuth for SMTP goes through SMTP AUTH too: XOAUTH2 needs it on.
        "SMTP AUTH is disabled for this Microsoft 365 tenant or mailbox: an admin must turn "
        "on Authenticated SMTP (Set-CASMailbox -SmtpClientAuthenticationDisabled $false, or "
        "the tenant's setting); XOAUTH2 needs it on as well",
        codes=frozenset({535}),
        enhanced="5.7.139",
        words=("SmtpClientAuthentication is disabled",),
    ),
    ReplyHint(
        "m365-basic-auth-disabled",
        _BASIC_AUTH_REFUSED,
        codes=frozenset({535}),
        enhanced="5.7.139",
        words=("basic authentication is disabled",),
    ),
    ReplyHint(
        "m365-basic-auth-not-supported",
        _BASIC_AUTH_REFUSED,
        codes=frozenset({550}),
        enhanced="5.7.30",
        words=("basic authentication is not supported",),
    ),
    ReplyHint(
        "m365-xoauth2-refused",
        "Microsoft 365 refused the OAuth2 token: it lacks the scope "
        "https://outlook.office.com/SMTP.Send, was issued for another account than the "
        "username, or SMTP AUTH is off for the mailbox",
        codes=frozenset({535}),
        enhanced="5.7.3",
        words=("authentication unsuccessful",),
        mechanism="XOAUTH2",
    ),
    ReplyHint(
        "google-app-password-required",
        "this Google account uses 2-Step Verification: sign in with an app password, or use "
        "XOAUTH2",
        codes=frozenset({534}),
        enhanced="5.7.9",
        words=("application-specific password required",),
    ),
    ReplyHint(
        "google-bad-credentials",
        "wrong username or password, or a Google Workspace account that does not allow "
        "password sign-in (less secure apps): use an app password or XOAUTH2",
        codes=frozenset({535}),
        enhanced="5.7.8",
        words=("username and password not accepted",),
    ),
    ReplyHint(
        "starttls-first",
        "the server wants STARTTLS before AUTH and did not see this session's TLS: use "
        "security=starttls (with security=tls, a proxy in front of the server ends the TLS "
        "before the server sees it)",
        codes=frozenset({530}),
        words=("STARTTLS",),
    ),
    ReplyHint(
        "not-authenticated",
        "the server has no successful authentication on this connection: it did not happen "
        "or was lost; give credentials, and on Microsoft 365 check that SMTP AUTH is on "
        "for the mailbox",
        codes=frozenset({530}),
        enhanced="5.7.57",
        words=("not authenticated",),
    ),
    ReplyHint(
        "m365-send-as-denied",
        "the mailbox has no Send As right for this From address: send from the mailbox's "
        "own address, or have an admin grant Send As on it. Microsoft 365 checks this only "
        "when a message is submitted: the envelope probe alone cannot see it, "
        "send_test_message does",
        codes=frozenset({550, 554}),
        words=("SendAsDenied", "send as this sender"),
    ),
    ReplyHint(
        "sender-not-owned",
        "the server lets this account send only from its own addresses: use one of them as "
        "the From address (mail_from), or allow this sender for the account",
        codes=frozenset({553, 550}),
        words=("not owned by user", "sender login mismatch"),
    ),
    ReplyHint(
        "too-many-logins",
        "the server limits logins from this client: wait before trying again "
        f"({_RATE_LIMITED}); every further try may extend the lockout",
        codes=frozenset({454}),
        enhanced="4.7.0",
        words=("too many login attempts",),
        rate_limited=True,
    ),
    ReplyHint(
        "try-again-later",
        f"the server is rate-limiting this client: back off ({_RATE_LIMITED})",
        codes=frozenset({421}),
        enhanced="4.7.0",
        words=("try again later",),
        rate_limited=True,
    ),
    ReplyHint(
        "tls-too-old",
        "the server says the client's TLS is older than 1.2, but this worker never offers "
        "less than TLS 1.2: something between them (a TLS-intercepting proxy or load "
        "balancer) made the connection the server sees",
        codes=frozenset({421}),
        enhanced="4.7.66",
        words=("TLS 1.0 and 1.1 are not supported",),
    ),
    ReplyHint(
        "ehlo-not-supported",
        "the server does not accept EHLO, so it offers no extensions (no STARTTLS, no "
        "AUTH): only security=plain or tls without credentials works with it, over HELO",
        codes=frozenset({500, 502}),
        stage=Stage.EHLO,
    ),
    # 501: a syntax error in EHLO's one argument, the name (Exim, Exchange, sendmail).
    ReplyHint("ehlo-name-invalid", _EHLO_NAME, codes=frozenset({501}), stage=Stage.EHLO),
    # Policy refusals of the name (Postfix's helo restrictions, Exim's ACLs).
    ReplyHint(
        "ehlo-name-refused",
        _EHLO_NAME,
        codes=frozenset({450, 504, 550, 554}),
        words=("HELO", "EHLO", "hostname", "host name"),
        stage=Stage.EHLO,
    ),
)


def find(
    *, code: int | None, enhanced: str | None, text: str, stage: Stage, mechanism: str | None
) -> ReplyHint | None:
    """The first row matching a reply; None for no reply (`code` None) or no row."""
    if code is None:
        return None
    return next(
        (row for row in REPLY_HINTS if row.matches(code, enhanced, text, stage, mechanism)), None
    )


def reply_hint(failure: Failure, *, mechanism: str | None) -> str | None:
    """The hint for the reply that ended a connection; `mechanism`: the AUTH one it used."""
    row = find(
        code=failure.smtp_code,
        enhanced=failure.smtp_enhanced,
        text=failure.message,
        stage=failure.stage,
        mechanism=mechanism,
    )
    return row.hint if row is not None else None


def is_rate_limited(outcome: Outcome) -> bool:
    """Whether the attempt ended on a reply that asks for the long backoff."""
    row = find(
        code=outcome.smtp_code,
        enhanced=outcome.smtp_enhanced,
        text=outcome.err_message,
        stage=outcome.stage,
        mechanism=None,  # no rate-limit row depends on it
    )
    return row is not None and row.rate_limited


def describe_xoauth2_challenge(challenge: str) -> str:
    """What an XOAUTH2 error challenge says, to follow the server's final refusal.

    Gmail sends base64 JSON, `{"status":"400","schemes":"Bearer","scope":"https://…"}`:
    its status and scope are kept. Anything else is shown as decoded, or as sent. The
    result is the server's words: redacted, cleaned and bounded with the reply it joins.
    """
    try:
        text = base64.b64decode(challenge.strip(), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return f"{XOAUTH2_CHALLENGE} {challenge}"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return f"{XOAUTH2_CHALLENGE} {text}"
    said = [f"{key} {data[key]}" for key in ("status", "scope") if key in data]
    return f"{XOAUTH2_CHALLENGE} {', '.join(said) or text}"

"""Redaction finds every form of the secret in what the server sent, before the cut.

A server may echo the AUTH exchange in its 535 reply: the command lines (base64 of the
PLAIN, LOGIN or XOAUTH2 payload) or the decoded payload. The reply is then cut to
MAX_QUOTED_REPLY characters and cleaned; nothing of the secret may survive either, and
nothing but the secret may be touched.
"""

from __future__ import annotations

import base64

import pytest
from aiosmtplib import SMTPAuthenticationError, SMTPResponseException
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtp_session.tasks.classify import classify
from smtp_session.tasks.errors import ErrorCategory, Stage
from smtp_session.tasks.secrets import (
    MIN_BARE_SECRET,
    MIN_FRAGMENT,
    REDACTED,
    Credentials,
    redact,
    secret_forms,
)
from smtp_session.tasks.server_text import MAX_QUOTED_REPLY

USER = "alice"
LONG_PASSWORD = "Tr0ub4dor&3-correct-horse-battery-staple-" * 2 + "x" * 6  # 88 characters


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def auth_lines(credentials: Credentials, mechanism: str) -> list[str]:
    """What the client sends for `mechanism`, as aiosmtplib sends it."""
    user = credentials.username
    if mechanism == "PLAIN":
        payload = "\0".join(["", user, credentials.password or ""])
        return [f"AUTH PLAIN {b64(payload)}"]
    if mechanism == "LOGIN":
        return [f"AUTH LOGIN {b64(user)}", b64(credentials.password or "")]
    blob = f"user={user}\x01auth=Bearer {credentials.oauth2_token}\x01\x01"
    return [f"AUTH XOAUTH2 {b64(blob)}"]


def decoded(line: str) -> str:
    """The payload of a client line, decoded as a server that echoes it would."""
    return base64.b64decode(line.rsplit(" ", 1)[-1]).decode()


def leaked(message: str, credentials: Credentials) -> list[str]:
    """Every piece of the secret in `message`: an 8-character run of an encoded form, or a
    whole raw secret of MIN_BARE_SECRET characters or more. The marker itself is no leak."""
    forms = secret_forms(credentials)
    found = []
    for segment in message.split(REDACTED):
        for form in forms.encoded:
            found += [
                form[i : i + MIN_FRAGMENT]
                for i in range(len(form) - MIN_FRAGMENT + 1)
                if form[i : i + MIN_FRAGMENT] in segment
            ]
        found += [raw for raw in forms.raw if len(raw) >= MIN_BARE_SECRET and raw in segment]
    return found


def auth_failure_message(credentials: Credentials, reply: str) -> str:
    """The message of a 535 reply, through the classifier given the secret it was sent."""
    failure = classify(
        SMTPAuthenticationError(535, reply),
        Stage.AUTH,
        host="smtp.example.com",
        endpoint="192.0.2.1 port 587",
        credentials=credentials,
    )
    assert failure.category is ErrorCategory.AUTH_FAILED
    assert failure.smtp_code == 535
    return failure.message


# ------------------------------------------------------------------------- examples


def test_a_one_character_password_leaves_words_alone() -> None:
    credentials = Credentials(USER, password="p")
    assert redact("5.7.8 relay to other.example denied", credentials) == (
        "5.7.8 relay to other.example denied"
    )
    message = auth_failure_message(credentials, "5.7.8 other.example says no")
    assert message == "535 5.7.8 other.example says no"


@pytest.mark.parametrize(
    ("password", "text", "expected"),
    [
        ("p", "bad password p", f"bad password {REDACTED}"),
        ("p", "you sent 'p'.", f"you sent '{REDACTED}'."),
        ("p", "\0alice\0p", f"\0alice\0{REDACTED}"),
        ("p", "other.example / p2 / pp", "other.example / p2 / pp"),
        ("pw1", "pw1x pw1", f"pw1x {REDACTED}"),
        # From MIN_BARE_SECRET characters on, anywhere.
        ("ampl", "example", f"ex{REDACTED}e"),
        # The base64 of a short password, whole.
        ("p", f"AUTH LOGIN {b64('alice')} / {b64('p')}", f"AUTH LOGIN {b64('alice')} / {REDACTED}"),
    ],
)
def test_short_secrets(password: str, text: str, expected: str) -> None:
    assert redact(text, Credentials(USER, password=password)) == expected


def test_overlapping_forms_become_one_marker() -> None:
    credentials = Credentials(USER, password=LONG_PASSWORD)
    text = f"x {LONG_PASSWORD}{b64(LONG_PASSWORD)} y"
    assert redact(text, credentials) == f"x {REDACTED} y"


def test_a_piece_of_an_encoding_the_server_cut_is_hidden() -> None:
    credentials = Credentials(USER, password=LONG_PASSWORD)
    plain = b64(f"\0{USER}\0{LONG_PASSWORD}")
    assert redact(f"you sent {plain[:40]}...", credentials) == f"you sent {REDACTED}..."
    assert redact(f"tail {plain[-12:]}", credentials) == f"tail {REDACTED}"
    # Fewer than MIN_FRAGMENT characters of it: at most `\0alice` decodes from them.
    assert redact(f"you sent {plain[:7]}", credentials) == f"you sent {plain[:7]}"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_the_issue_case_an_echo_across_the_cut(mechanism: str) -> None:
    """47 of 88 characters came out: the base64 was cut before it was looked for."""
    credentials = Credentials(USER, password=LONG_PASSWORD)
    echo = " / ".join(auth_lines(credentials, mechanism))
    message = auth_failure_message(credentials, f"5.7.8 Authentication failed for {echo}")
    assert leaked(message, credentials) == []
    assert message.startswith("535 5.7.8 Authentication failed for AUTH ")


def test_raw_secret_split_by_cleaning_is_hidden_first() -> None:
    """A password with a control character: cleaning would turn it into '?' first."""
    password = "Hunter2\tpw-7f3c9a1e5b2d"
    credentials = Credentials(USER, password=password)
    message = auth_failure_message(credentials, f"5.7.8 bad: \0{USER}\0{password}")
    assert message == f"535 5.7.8 bad: ?{USER}?{REDACTED}"


def test_other_replies_are_redacted_too() -> None:
    credentials = Credentials(USER, oauth2_token="ya29.a0-secret-token")
    failure = classify(
        SMTPResponseException(501, f"5.5.2 cannot decode {auth_lines(credentials, 'XOAUTH2')[0]}"),
        Stage.AUTH,
        host="h",
        endpoint="e",
        credentials=credentials,
    )
    assert failure.category is ErrorCategory.SMTP_PERMANENT
    assert failure.message == f"501 5.5.2 cannot decode AUTH XOAUTH2 {REDACTED}"


def test_without_credentials_nothing_changes() -> None:
    assert redact("AUTH PLAIN AGFsaWNlAHA=", None) == "AUTH PLAIN AGFsaWNlAHA="


# ------------------------------------------------------------------------- fuzzing

# The server's own words: letters, digits and punctuation (no control characters, which
# cleaning rewrites, and no '?' or '/', which it writes), over one or more lines.
_WORDS = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="?/"),
    max_size=140,
)


@st.composite
def echoing_replies(draw: st.DrawFn) -> tuple[Credentials, str]:
    """A secret, and a 535 reply that echoes what the client sent for it, somewhere."""
    mechanism = draw(st.sampled_from(["PLAIN", "LOGIN", "XOAUTH2"]))
    secret = draw(st.text(min_size=1, max_size=80))
    user = draw(st.sampled_from([USER, "a", "alice.liddell@wonderland.example"]))
    credentials = (
        Credentials(user, oauth2_token=secret)
        if mechanism == "XOAUTH2"
        else Credentials(user, password=secret)
    )
    lines = auth_lines(credentials, mechanism)
    echoes = [*lines, *map(decoded, lines)]
    echo = draw(st.sampled_from([*echoes, " ".join(lines), "\n".join(echoes)]))
    # A server that cuts the echo itself, anywhere.
    echo = echo[: draw(st.integers(min_value=0, max_value=len(echo)))]
    before, after = draw(_WORDS), draw(_WORDS)
    separator = draw(st.sampled_from([" ", "\n", ": "]))
    return credentials, f"5.7.8 {before}{separator}{echo}{separator}{after}"


@settings(max_examples=1000, deadline=None)
@given(echoing_replies())
@example((Credentials(USER, password=LONG_PASSWORD), f"5.7.8 {'x' * 60} \0{USER}\0{LONG_PASSWORD}"))
def test_fuzz_no_piece_of_the_secret_survives(case: tuple[Credentials, str]) -> None:
    credentials, reply = case
    message = auth_failure_message(credentials, reply)
    assert leaked(message, credentials) == []
    assert len(message) <= len("535 ") + MAX_QUOTED_REPLY + 1


@settings(max_examples=300, deadline=None)
@given(password=st.text(min_size=1, max_size=MIN_BARE_SECRET - 1), words=_WORDS)
def test_fuzz_a_short_password_only_hides_itself(password: str, words: str) -> None:
    """Nothing the server wrote is touched unless the short password stands alone there."""
    credentials = Credentials(USER, password=password)
    text = f"other.example {words}"
    redacted = redact(text, credentials)
    assert redacted.startswith("other.example ") or password in "other.example"
    assert redacted.replace(REDACTED, password) == text

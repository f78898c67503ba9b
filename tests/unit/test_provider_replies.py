"""The reply table's shape, the XOAUTH2 challenge reader and the long backoff.

Each row's behaviour against a server sending its reply is in
tests/integration/test_provider_replies.py.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtp_session.tasks.errors import Stage
from smtp_session.tasks.provider_replies import (
    REPLY_HINTS,
    XOAUTH2_CHALLENGE,
    describe_xoauth2_challenge,
    find,
)
from smtp_session.tasks.session import MAX_BACKOFF, RetryPolicy


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_rows_have_unique_names_and_never_match_everything() -> None:
    assert len({row.name for row in REPLY_HINTS}) == len(REPLY_HINTS)
    assert all(row.codes or row.words for row in REPLY_HINTS)


def test_no_reply_no_row() -> None:
    # A failure without a reply (a timeout, a refused connection) never gets a reply hint,
    # whatever its words.
    text = "timed out: Too many login attempts, TLS 1.0 and 1.1 are not supported"
    assert find(code=None, enhanced=None, text=text, stage=Stage.AUTH, mechanism=None) is None


GMAIL = '{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}'


@pytest.mark.parametrize(
    ("challenge", "said"),
    [
        (b64(GMAIL), "status 400, scope https://mail.google.com/"),
        (b64('{"status": 401}'), "status 401"),
        (b64('{"error": "invalid_token"}'), '{"error": "invalid_token"}'),
        (b64("[1, 2]"), "[1, 2]"),
        (b64("token expired"), "token expired"),
        (b64("[" * 100_000), "[" * 100_000),  # too deep for json: shown as sent, no crash
        ("not base64!", "not base64!"),
        ("", ""),
    ],
)
def test_an_xoauth2_challenge_is_decoded(challenge: str, said: str) -> None:
    assert describe_xoauth2_challenge(challenge) == f"{XOAUTH2_CHALLENGE} {said}"


@given(st.text())
def test_any_challenge_is_described_without_an_error(challenge: str) -> None:
    assert describe_xoauth2_challenge(challenge).startswith(XOAUTH2_CHALLENGE)


@given(st.dictionaries(st.text(max_size=8), st.recursive(st.none() | st.text(), st.lists)))
def test_any_json_object_is_described_without_an_error(data: dict[str, object]) -> None:
    assert describe_xoauth2_challenge(b64(json.dumps(data))).startswith(XOAUTH2_CHALLENGE)


@pytest.mark.parametrize("attempt", [1, 2, 5])
def test_a_rate_limited_attempt_waits_the_capped_step(attempt: int) -> None:
    policy = RetryPolicy()
    assert MAX_BACKOFF / 2 <= policy.delay(attempt, rate_limited=True) <= MAX_BACKOFF
    assert policy.delay(1) <= 1.0  # the quick first retry of anything else

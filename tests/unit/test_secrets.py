"""Credentials resolve from the environment or the secrets directory, and never print."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtp_session.tasks.errors import InvalidRequest
from smtp_session.tasks.secrets import (
    Credentials,
    OAuth2Client,
    env_variable,
    redact,
    resolve_credentials,
)

SECRET = "s3cr3t-Pa55"


def test_env_variable_name() -> None:
    assert env_variable("tenant-42") == "SMTP_SESSION_SECRET_TENANT_42"
    assert env_variable("a.b_c") == "SMTP_SESSION_SECRET_A_B_C"


def test_user_password_from_environment() -> None:
    found = resolve_credentials("tenant-42", {"SMTP_SESSION_SECRET_TENANT_42": f"me:{SECRET}"})
    assert found == Credentials("me", password=SECRET)


def test_password_may_contain_colons() -> None:
    found = resolve_credentials("a", {"SMTP_SESSION_SECRET_A": "me:pa:ss"})
    assert found.password == "pa:ss"


def test_json_oauth2_token() -> None:
    raw = '{"username": "me@example.com", "oauth2_token": "ya29.token"}'
    found = resolve_credentials("g", {"SMTP_SESSION_SECRET_G": raw})
    assert found == Credentials("me@example.com", oauth2_token="ya29.token")


def test_json_oauth2_client() -> None:
    raw = (
        '{"username": "me@example.com", "token_url": "https://idp.example/token", '
        f'"client_id": "app", "client_secret": "{SECRET}", "refresh_token": "1//rt-{SECRET}"}}'
    )
    found = resolve_credentials("g", {"SMTP_SESSION_SECRET_G": raw})
    assert found == Credentials(
        "me@example.com",
        oauth2_client=OAuth2Client(
            "https://idp.example/token",
            "app",
            client_secret=SECRET,
            refresh_token=f"1//rt-{SECRET}",
        ),
    )
    assert found.uses_xoauth2
    assert SECRET not in repr(found) + str(found)
    assert redact(f"said {SECRET} and 1//rt-{SECRET}", found).count(SECRET) == 0


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"token_url": "http://idp.example/token"}, "token_url must be an https:// URL"),
        ({"token_url": "https:///token"}, "token_url must be an https:// URL with a host"),
        ({"client_id": ""}, "client_id must be a non-empty string"),
        ({"client_secret": 42}, "client_secret must be a non-empty string"),
        ({"password": SECRET}, "'password' is not a key of the OAuth2 client form"),
    ],
)
def test_a_malformed_oauth2_client_names_the_key(fields: dict[str, object], problem: str) -> None:
    import json

    data = {"username": "u", "token_url": "https://idp.example/t", "client_id": "app", **fields}
    with pytest.raises(InvalidRequest, match=problem) as caught:
        resolve_credentials("bad", {"SMTP_SESSION_SECRET_BAD": json.dumps(data)})
    assert SECRET not in str(caught.value)


def test_secrets_directory(tmp_path: Path) -> None:
    (tmp_path / "tenant42").write_text(f'{{"username": "u", "password": "{SECRET}"}}\n')
    found = resolve_credentials("tenant42", {"SMTP_SESSION_SECRETS_DIR": str(tmp_path)})
    assert found == Credentials("u", password=SECRET)


def test_environment_wins_over_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("file:pw")
    env = {"SMTP_SESSION_SECRETS_DIR": str(tmp_path), "SMTP_SESSION_SECRET_X": "env:pw"}
    assert resolve_credentials("x", env).username == "env"


def test_missing_secret_names_both_places() -> None:
    with pytest.raises(InvalidRequest, match="SMTP_SESSION_SECRET_NOPE") as caught:
        resolve_credentials("nope", {})
    assert caught.value.field == "credentials"


@pytest.mark.parametrize(
    "raw",
    [
        f"no-colon-{SECRET}",
        f"{{not json {SECRET}",
        f'{{"username": "u", "password": "{SECRET}", "oauth2_token": "t"}}',
        f'{{"password": "{SECRET}"}}',
        f'["{SECRET}"]',
        # Past Python's 4,300-digit limit for int(): a ValueError that is not JSON's own.
        f'{{"username": "u", "password": "{SECRET}", "n": {"9" * 5000}}}',
    ],
)
def test_malformed_secret_is_invalid_without_echoing_it(raw: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_credentials("bad", {"SMTP_SESSION_SECRET_BAD": raw})
    assert SECRET not in str(caught.value)


def test_repr_hides_the_secret() -> None:
    shown = repr(Credentials("me", password=SECRET)) + str(Credentials("me", oauth2_token=SECRET))
    assert SECRET not in shown


def test_redact_removes_the_secret_in_every_wire_form() -> None:
    import base64

    credentials = Credentials("me", password=SECRET)
    plain = base64.b64encode(f"\0me\0{SECRET}".encode()).decode()
    login = base64.b64encode(SECRET.encode()).decode()
    echoed = f"500 unrecognized: AUTH PLAIN {plain} / {login} / {SECRET}"
    assert redact(echoed, credentials) == (
        "500 unrecognized: AUTH PLAIN [redacted] / [redacted] / [redacted]"
    )
    token = Credentials("me", oauth2_token=SECRET)
    assert SECRET not in redact(f"bad token {SECRET}", token)
    assert redact("nothing to hide", None) == "nothing to hide"


def test_deeply_nested_json_secret_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        resolve_credentials("deep", {"SMTP_SESSION_SECRET_DEEP": "{" + "[" * 100_000})

"""Credentials by reference: a name resolved in the worker, never the secret on the wire."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from smtp_session.tasks.errors import InvalidRequest

ENV_PREFIX = "SMTP_SESSION_SECRET_"
SECRETS_DIR_VARIABLE = "SMTP_SESSION_SECRETS_DIR"
MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True)
class Credentials:
    """A resolved secret. repr() and str() never show the password or token."""

    username: str
    password: str | None = field(default=None, repr=False)
    oauth2_token: str | None = field(default=None, repr=False)


def env_variable(name: str) -> str:
    """`tenant-42` -> `SMTP_SESSION_SECRET_TENANT_42`."""
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", name.upper())


def _parse(name: str, raw: str) -> Credentials:
    # Errors name the reference and the expected shape, never the value read.
    text = raw.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidRequest(
                "credentials", f"secret {name!r} starts with '{{' but is not valid JSON"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("username"), str):
            raise InvalidRequest("credentials", f"secret {name!r} has no string 'username'")
        password, token = data.get("password"), data.get("oauth2_token")
        if (password is None) == (token is None) or not isinstance(password or token, str):
            raise InvalidRequest(
                "credentials",
                f"secret {name!r} needs exactly one string of 'password' or 'oauth2_token'",
            )
        return Credentials(data["username"], password=password, oauth2_token=token)
    username, sep, password = text.partition(":")
    if not sep or not username:
        raise InvalidRequest(
            "credentials", f"secret {name!r} is not 'username:password' or a JSON object"
        )
    return Credentials(username, password=password)


def resolve_credentials(name: str, environ: Mapping[str, str] | None = None) -> Credentials:
    """Find the secret a reference names: the environment first, then the secrets directory."""
    env = os.environ if environ is None else environ
    value = env.get(env_variable(name))
    if value is None:
        directory = env.get(SECRETS_DIR_VARIABLE)
        path = Path(directory, name) if directory else None
        if path is None or not path.is_file():
            raise InvalidRequest(
                "credentials",
                f"no secret {name!r}: set {env_variable(name)} or put a file {name!r} "
                f"in ${SECRETS_DIR_VARIABLE}",
            )
        try:
            with path.open("rb") as handle:
                value = handle.read(MAX_SECRET_BYTES).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequest(
                "credentials", f"secret file {name!r} is unreadable ({type(exc).__name__})"
            ) from None
    return _parse(name, value)


def _secret_forms(credentials: Credentials) -> list[str]:
    """The secret as written and as AUTH PLAIN, LOGIN and XOAUTH2 put it on the wire."""
    forms: list[str] = []
    user = credentials.username
    if credentials.password:
        forms += [
            credentials.password,
            base64.b64encode(f"\0{user}\0{credentials.password}".encode()).decode(),
            base64.b64encode(credentials.password.encode()).decode(),
        ]
    if credentials.oauth2_token:
        blob = f"user={user}\x01auth=Bearer {credentials.oauth2_token}\x01\x01"
        forms += [credentials.oauth2_token, base64.b64encode(blob.encode()).decode()]
    return sorted(forms, key=len, reverse=True)


def redact(text: str, credentials: Credentials | None) -> str:
    """`text` with any form of the secret replaced: a server may echo what it was sent."""
    if credentials is None:
        return text
    for form in _secret_forms(credentials):
        text = text.replace(form, "[redacted]")
    return text

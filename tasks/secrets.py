"""Credentials by reference: a name resolved in the worker, never the secret on the wire."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from smtp_session.tasks.errors import InvalidRequest

ENV_PREFIX = "SMTP_SESSION_SECRET_"
SECRETS_DIR_VARIABLE = "SMTP_SESSION_SECRETS_DIR"
MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True)
class OAuth2Client:
    """An OAuth2 client whose access tokens the worker obtains (tasks.oauth).

    The refresh-token grant when `refresh_token` is set, else client credentials.
    repr() and str() never show the client secret or the refresh token.
    """

    token_url: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None


@dataclass(frozen=True)
class Credentials:
    """A resolved secret. repr() and str() never show the password or token.

    Exactly one of `password`, `oauth2_token` (an access token) and `oauth2_client` (to
    obtain access tokens with) is set.
    """

    username: str
    password: str | None = field(default=None, repr=False)
    oauth2_token: str | None = field(default=None, repr=False)
    oauth2_client: OAuth2Client | None = None

    @property
    def uses_xoauth2(self) -> bool:
        return self.oauth2_token is not None or self.oauth2_client is not None


def env_variable(name: str) -> str:
    """`tenant-42` -> `SMTP_SESSION_SECRET_TENANT_42`."""
    return ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", name.upper())


def _parse(name: str, raw: str) -> Credentials:
    # Errors name the reference and the expected shape, never the value read.
    text = raw.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, or a 5,000-digit number
            raise InvalidRequest(
                "credentials", f"secret {name!r} starts with '{{' but is not valid JSON"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("username"), str):
            raise InvalidRequest("credentials", f"secret {name!r} has no string 'username'")
        if "token_url" in data:
            return Credentials(data["username"], oauth2_client=_oauth2_client(name, data))
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


_OAUTH2_KEYS = ("username", "token_url", "client_id", "client_secret", "refresh_token", "scope")


def _oauth2_client(name: str, data: dict[str, object]) -> OAuth2Client:
    """The OAuth2 client form of a secret; errors name the key, never a value."""
    unknown = sorted(set(data) - set(_OAUTH2_KEYS))
    if unknown:
        raise InvalidRequest(
            "credentials",
            f"secret {name!r}: {unknown[0][:64]!r} is not a key of the OAuth2 client form "
            f"({', '.join(_OAUTH2_KEYS)})",
        )
    for key in _OAUTH2_KEYS[1:]:
        value = data.get(key)
        if (value is not None or key in ("token_url", "client_id")) and (
            not isinstance(value, str) or not value
        ):
            raise InvalidRequest(
                "credentials", f"secret {name!r}: {key} must be a non-empty string"
            )
    url = urlsplit(str(data["token_url"]))
    if url.scheme != "https" or not url.hostname:
        raise InvalidRequest(
            "credentials", f"secret {name!r}: token_url must be an https:// URL with a host"
        )
    return OAuth2Client(
        token_url=str(data["token_url"]),
        client_id=str(data["client_id"]),
        client_secret=_string(data.get("client_secret")),
        refresh_token=_string(data.get("refresh_token")),
        scope=_string(data.get("scope")),
    )


def _string(value: object) -> str | None:
    return value if isinstance(value, str) else None


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


# What `redact` hides. A raw secret is hidden wherever it appears once it is at least
# MIN_BARE_SECRET characters long; a shorter one (a 1-character test password) only where
# it stands alone, touching no letter or digit, so that "p" leaves "other.example" alone.
# The encodings AUTH puts on the wire are long and unmistakable: any run of at least
# MIN_FRAGMENT characters of one (or of a raw secret) is hidden too, which covers an echo
# the server itself cut short. A shorter piece of an encoding decodes to at most a few
# bytes: of `\0user\0`, for AUTH PLAIN.
MIN_BARE_SECRET = 4
MIN_FRAGMENT = 8
REDACTED = "[redacted]"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass(frozen=True)
class SecretForms:
    """The secret as written (`raw`) and as AUTH puts it on the wire (`encoded`)."""

    raw: tuple[str, ...]
    encoded: tuple[str, ...]


def secret_forms(credentials: Credentials) -> SecretForms:
    """The password or token, and its base64 in AUTH PLAIN (RFC 4616), LOGIN and XOAUTH2."""
    user, raw, encoded = credentials.username, [], []
    if credentials.password:
        raw.append(credentials.password)
        encoded += [_b64(f"\0{user}\0{credentials.password}"), _b64(credentials.password)]
    if credentials.oauth2_token:
        raw.append(credentials.oauth2_token)
        encoded.append(_b64(f"user={user}\x01auth=Bearer {credentials.oauth2_token}\x01\x01"))
    client = credentials.oauth2_client
    if client is not None:
        raw += [secret for secret in (client.client_secret, client.refresh_token) if secret]
    return SecretForms(tuple(raw), tuple(encoded))


def _occurrences(text: str, form: str, *, alone: bool) -> Iterator[tuple[int, int]]:
    """Where `form` occurs in `text`; with `alone`, only where no letter or digit touches it."""
    start = text.find(form)
    while start >= 0:
        end = start + len(form)
        if not alone or not (
            (start > 0 and text[start - 1].isalnum()) or (end < len(text) and text[end].isalnum())
        ):
            yield start, end
        start = text.find(form, start + 1)


def _secret_spans(text: str, forms: SecretForms) -> Iterator[tuple[int, int]]:
    fragments: set[str] = set()
    for form in (*forms.raw, *forms.encoded):
        if len(form) >= MIN_FRAGMENT:
            fragments.update(
                form[i : i + MIN_FRAGMENT] for i in range(len(form) - MIN_FRAGMENT + 1)
            )
        else:
            alone = form in forms.raw and len(form) < MIN_BARE_SECRET
            yield from _occurrences(text, form, alone=alone)
    for start in range(len(text) - MIN_FRAGMENT + 1):
        if text[start : start + MIN_FRAGMENT] in fragments:
            yield start, start + MIN_FRAGMENT


def redact(text: str, credentials: Credentials | None) -> str:
    """`text` with every form of the secret replaced: a server may echo what it was sent.

    Apply it to what the server sent, before that is cut or cleaned for a log line: a cut
    can leave a piece too short to recognise, cleaning can change it. Overlapping and
    adjacent matches become one `[redacted]`.
    """
    if credentials is None or not text:
        return text
    spans = sorted(_secret_spans(text, secret_forms(credentials)))
    if not spans:
        return text
    pieces, position = [], 0
    for start, end in spans:
        if start > position:
            pieces += [text[position:start], REDACTED]
        elif not pieces:
            pieces.append(REDACTED)
        position = max(position, end)
    pieces.append(text[position:])
    return "".join(pieces)

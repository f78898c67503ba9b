"""Access tokens for XOAUTH2 from an OAuth2 client secret, cached and refreshed per process.

A secret may hold an OAuth2 client instead of a token (tasks.secrets.OAuth2Client). The
worker asks its `token_url` for an access token with Authlib's client over httpx2: the
refresh-token grant when the secret has a refresh token, else client credentials. The
token is kept until shortly before it expires, and a refresh token the endpoint rotates
is used from then on (in memory only: a restarted process starts again from the secret's).

The endpoint is HTTPS only and verified like an SMTP server: the system's store, then
the portable one (certifi plus SMTP_SESSION_CA_FILE) when the system's finds no trusted
root, so that an operator can trust a private identity provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx2
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

from smtp_session.tasks.classify import exception_chain
from smtp_session.tasks.errors import ErrorCategory, SessionFailure
from smtp_session.tasks.secrets import Credentials, OAuth2Client, redact
from smtp_session.tasks.server_text import quote_reply
from smtp_session.tasks.trust import TrustMode, verifying_context

#: Seconds before `expires_in` runs out at which a cached token is no longer handed out:
#: it must outlive the session that uses it.
EXPIRY_MARGIN = 60.0
#: `expires_in` assumed when the endpoint sends none (the common lifetime of both providers).
DEFAULT_EXPIRES_IN = 3600.0
#: The endpoint's `error` codes (RFC 6749 §5.2) that mean the secret no longer works, and
#: what to do; any other code but a passing one is the secret's configuration.
REFUSAL_HINTS = {
    "invalid_grant": "the refresh token was revoked or has expired: consent again and "
    "store the new refresh token in the secret",
    "invalid_client": "the token endpoint does not accept this client_id and client_secret: "
    "check them (a client secret expires too)",
    "unauthorized_client": "this client may not use this grant: allow it in the identity "
    "provider's app registration",
}
CONFIGURATION_HINT = "check the secret's token_url, client_id and scope"
#: Codes that say the endpoint itself is in trouble: another attempt may succeed.
PASSING = frozenset({"temporarily_unavailable", "server_error"})
_TRUST_ORDER: tuple[TrustMode, ...] = ("native", "portable")


@dataclass
class _Token:
    access_token: str
    expires_at: float  # on TokenSource.clock


class TokenSource:
    """The process's access tokens, one per OAuth2 client, fetched once at a time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock  # seconds, monotonic: when a token expires
        self._tokens: dict[str, _Token] = {}
        self._refresh_tokens: dict[str, str] = {}  # rotated ones, by the secret's
        self._locks: dict[str, asyncio.Lock] = {}

    async def access_token(
        self, credentials: Credentials, *, seconds: float, extra_ca_file: str | None = None
    ) -> str:
        """A valid access token for `credentials.oauth2_client`, within `seconds` (waiting
        for another session's fetch included); raises SessionFailure."""
        client = credentials.oauth2_client
        assert client is not None, "only OAuth2 client credentials have a token endpoint"
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                return await self._access_token(credentials, client, extra_ca_file)
        except TimeoutError:
            raise SessionFailure(
                ErrorCategory.OAUTH_UNAVAILABLE,
                f"token endpoint {client.token_url} did not answer within {seconds:.1f} s",
            ) from None

    async def _access_token(
        self, credentials: Credentials, client: OAuth2Client, extra_ca_file: str | None
    ) -> str:
        key = _key(credentials.username, client)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one fetch per client at a time; the others reuse its token
            token = self._tokens.get(key)
            if token is not None and self.clock() < token.expires_at:
                return token.access_token
            refresh_token = self._refresh_tokens.get(key, client.refresh_token)
            answer = await _fetch(client, refresh_token, credentials, extra_ca_file)
            access_token = answer.get("access_token")
            if not isinstance(access_token, str) or not access_token:
                raise SessionFailure(
                    ErrorCategory.OAUTH_UNAVAILABLE,
                    f"token endpoint {client.token_url} answered without an access_token",
                )
            rotated = answer.get("refresh_token")
            if client.refresh_token is not None and isinstance(rotated, str) and rotated:
                self._refresh_tokens[key] = rotated
            self._tokens[key] = _Token(access_token, self.clock() + _lifetime(answer))
            return access_token

    def forget(self, credentials: Credentials) -> None:
        """Drop the cached access token (the SMTP server refused it)."""
        if credentials.oauth2_client is not None:
            self._tokens.pop(_key(credentials.username, credentials.oauth2_client), None)


def _key(username: str, client: OAuth2Client) -> str:
    # Digested: the key holds the refresh token and client secret's identity, not them.
    parts = (username, client.token_url, client.client_id, client.scope or "")
    secrets = (client.client_secret or "", client.refresh_token or "")
    return hashlib.sha256("\0".join((*parts, *secrets)).encode()).hexdigest()


def _lifetime(answer: dict[str, object]) -> float:
    expires_in = answer.get("expires_in")
    seconds = (
        float(expires_in)
        if isinstance(expires_in, int | float | str) and str(expires_in).isdigit()
        else DEFAULT_EXPIRES_IN
    )
    # A token shorter-lived than twice the margin is used for half its life.
    return seconds - EXPIRY_MARGIN if seconds > 2 * EXPIRY_MARGIN else seconds / 2


async def _fetch(
    client: OAuth2Client,
    refresh_token: str | None,
    credentials: Credentials,
    extra_ca_file: str | None,
) -> dict[str, object]:
    """The endpoint's token answer, verified in native trust, then in portable trust."""
    for mode in _TRUST_ORDER:
        context = verifying_context(mode, extra_ca_file)
        try:
            return await _ask(client, refresh_token, context)
        except OAuthError as exc:
            raise _refused(client, exc, credentials) from None
        except (httpx2.HTTPError, ValueError) as exc:
            untrusted = any(
                isinstance(link, ssl.SSLCertVerificationError) for link in exception_chain(exc)
            )
            if untrusted and mode != _TRUST_ORDER[-1]:
                continue
            raise _unavailable(client, exc, credentials) from None
    raise AssertionError("unreachable: the last trust mode raises")


async def _ask(
    client: OAuth2Client, refresh_token: str | None, context: ssl.SSLContext
) -> dict[str, object]:
    async with AsyncOAuth2Client(
        client_id=client.client_id,
        client_secret=client.client_secret,
        scope=client.scope,
        # Both grants put the client's credentials in the form, as Google's and
        # Microsoft's endpoints document; a client without a secret sends its id only.
        token_endpoint_auth_method="client_secret_post" if client.client_secret else "none",
        verify=context,
        follow_redirects=False,
        timeout=None,  # bounded by the session's deadline around the call
    ) as session:
        if refresh_token is not None:
            answer = await session.refresh_token(client.token_url, refresh_token=refresh_token)
        else:
            answer = await session.fetch_token(client.token_url, grant_type="client_credentials")
    return dict(answer)


def _refused(client: OAuth2Client, exc: OAuthError, credentials: Credentials) -> SessionFailure:
    error = quote_reply(redact(str(exc.error or "error"), credentials))
    description = redact(str(exc.description or ""), credentials)
    said = f"{error} ({quote_reply(description)})" if description else error
    message = f"token endpoint {client.token_url} refused: {said}"
    if exc.error in PASSING:
        return SessionFailure(ErrorCategory.OAUTH_UNAVAILABLE, message)
    hint = REFUSAL_HINTS.get(str(exc.error), CONFIGURATION_HINT)
    return SessionFailure(ErrorCategory.AUTH_FAILED, message, hint=hint)


def _unavailable(
    client: OAuth2Client, exc: BaseException, credentials: Credentials
) -> SessionFailure:
    if isinstance(exc, httpx2.HTTPStatusError):
        why = f"HTTP {exc.response.status_code}"
    else:
        why = quote_reply(redact(str(exc) or type(exc).__name__, credentials))
    return SessionFailure(
        ErrorCategory.OAUTH_UNAVAILABLE, f"token endpoint {client.token_url} unavailable: {why}"
    )


#: The worker process's tokens (each process fetches its own).
TOKENS = TokenSource()

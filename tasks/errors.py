"""Error categories, session stages and the exception tree of the session core."""

from __future__ import annotations

from enum import StrEnum


class ErrorCategory(StrEnum):
    """Why a session failed: the `error` field of an Outcome and the `error` metric label."""

    INVALID_REQUEST = "invalid_request"
    BLOCKED = "blocked"  # a queue request the egress policy refuses; nothing was sent
    DNS = "dns"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    DISCONNECTED = "disconnected"
    TLS_HANDSHAKE = "tls_handshake"
    TLS_UNTRUSTED = "tls_untrusted"
    TLS_EXPIRED = "tls_expired"
    TLS_HOSTNAME = "tls_hostname"
    STARTTLS_UNAVAILABLE = "starttls_unavailable"
    AUTH_UNAVAILABLE = "auth_unavailable"
    AUTH_FAILED = "auth_failed"
    SENDER_REJECTED = "sender_rejected"  # MAIL FROM refused (the envelope probe)
    RECIPIENT_REJECTED = "recipient_rejected"  # a RCPT TO refused (the envelope probe)
    # The OAuth2 token endpoint could not give an access token: unreachable, a timeout,
    # 5xx, or an answer that is no token. Not its refusal of the secret (auth_failed).
    OAUTH_UNAVAILABLE = "oauth_unavailable"
    SMTP_TRANSIENT = "smtp_transient"
    SMTP_PERMANENT = "smtp_permanent"
    PROTOCOL = "protocol"
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        """True when another attempt may succeed without anybody changing anything."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCategory.DNS,
        ErrorCategory.REFUSED,
        ErrorCategory.TIMEOUT,
        ErrorCategory.DISCONNECTED,
        ErrorCategory.SMTP_TRANSIENT,
        ErrorCategory.OAUTH_UNAVAILABLE,
    }
)


class Stage(StrEnum):
    """Where in the session an attempt was when it ended."""

    VALIDATE = "validate"
    RESOLVE = "resolve"
    CONNECT = "connect"
    TLS = "tls"  # the implicit TLS handshake (security=tls)
    BANNER = "banner"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"  # MAIL FROM of the envelope probe
    RCPT = "rcpt"  # each RCPT TO of the envelope probe
    DATA = "data"  # the test message
    QUIT = "quit"
    DONE = "done"


class SessionWorkerError(Exception):
    """Root of every exception this project raises on purpose."""


class InvalidRequest(SessionWorkerError, ValueError):
    """A request field (or the secret it references) is unusable; no I/O was done."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class SessionFailure(SessionWorkerError):
    """A failure the core detects itself, not one aiosmtplib raises (STARTTLS not offered…)."""

    def __init__(
        self,
        category: ErrorCategory,
        message: str,
        *,
        smtp_code: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.category = category
        self.message = message
        self.smtp_code = smtp_code
        self.hint = hint

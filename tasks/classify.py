"""Turn an exception into an error category and a short, specific message.

Classification walks the exception's `__cause__`/`__context__` chain: with implicit
TLS a certificate failure arrives wrapped in `SMTPConnectError`, with STARTTLS it
arrives raw as `ssl.SSLCertVerificationError`. Never by broad class alone.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from smtp_session.tasks.errors import ErrorCategory, SessionFailure, Stage
from smtp_session.tasks.secrets import Credentials, redact
from smtp_session.tasks.server_text import quote_reply

# OpenSSL X509_V_ERR_* codes: what `ssl` reports in `verify_code`, here and with
# truststore on Linux (which verifies with OpenSSL).
CERT_NOT_YET_VALID = 9
CERT_HAS_EXPIRED = 10
HOSTNAME_MISMATCH = 62
IP_ADDRESS_MISMATCH = 64
_OPENSSL_CATEGORIES = {
    CERT_NOT_YET_VALID: ErrorCategory.TLS_EXPIRED,
    CERT_HAS_EXPIRED: ErrorCategory.TLS_EXPIRED,
    HOSTNAME_MISMATCH: ErrorCategory.TLS_HOSTNAME,
    IP_ADDRESS_MISMATCH: ErrorCategory.TLS_HOSTNAME,
}


@dataclass(frozen=True)
class PlatformCode:
    """A native verifier's error code, what it means here, and OpenSSL's equivalent."""

    platform: str
    name: str
    code: int
    category: ErrorCategory
    openssl: int | None = None  # the X509_V_ERR_* code with the same meaning, if any


# truststore verifies with the system's verifier on macOS and Windows, and does not
# translate its errors: it raises ssl.SSLCertVerificationError with `verify_code` set
# to the platform's code and `verify_message` to the platform's text (the code is not in
# the text). macOS 10.14+: the CFError code of SecTrustEvaluateWithError, an OSStatus
# from SecBase.h (negative). Windows: CERT_CHAIN_POLICY_STATUS.dwError, an HRESULT from
# winerror.h, as an unsigned 32-bit DWORD. Neither range meets OpenSSL's small positive
# codes. macOS 10.13 and earlier report a SecTrustResultType (0-7) that names no cause:
# those stay tls_untrusted. A code not listed is tls_untrusted.
_E_EXPIRED, _E_HOST, _E_UNTRUSTED = (
    ErrorCategory.TLS_EXPIRED,
    ErrorCategory.TLS_HOSTNAME,
    ErrorCategory.TLS_UNTRUSTED,
)
PLATFORM_CODES = (
    PlatformCode("macOS", "errSecCertificateExpired", -67818, _E_EXPIRED, CERT_HAS_EXPIRED),
    PlatformCode("macOS", "errSecCertificateNotValidYet", -67819, _E_EXPIRED, CERT_NOT_YET_VALID),
    PlatformCode("macOS", "errSecHostNameMismatch", -67602, _E_HOST, HOSTNAME_MISMATCH),
    PlatformCode("macOS", "errSecNotTrusted", -67843, _E_UNTRUSTED),
    PlatformCode("macOS", "errSecCreateChainFailed", -25318, _E_UNTRUSTED),
    PlatformCode("macOS", "errSecTrustSettingDeny", -67654, _E_UNTRUSTED),
    PlatformCode("macOS", "errSecCertificateRevoked", -67820, _E_UNTRUSTED),
    # "Not within its validity period": expired and not yet valid alike; expired is the
    # common case, and the certificate's dates tell which.
    PlatformCode("Windows", "CERT_E_EXPIRED", 0x800B0101, _E_EXPIRED, CERT_HAS_EXPIRED),
    PlatformCode("Windows", "CERT_E_CN_NO_MATCH", 0x800B010F, _E_HOST, HOSTNAME_MISMATCH),
    PlatformCode("Windows", "CERT_E_UNTRUSTEDROOT", 0x800B0109, _E_UNTRUSTED),
    PlatformCode("Windows", "CERT_E_CHAINING", 0x800B010A, _E_UNTRUSTED),
    PlatformCode("Windows", "CERT_E_UNTRUSTEDCA", 0x800B0112, _E_UNTRUSTED),
    PlatformCode("Windows", "TRUST_E_CERT_SIGNATURE", 0x80096004, _E_UNTRUSTED),
    PlatformCode("Windows", "CERT_E_REVOKED", 0x800B010C, _E_UNTRUSTED),
    PlatformCode("Windows", "CRYPT_E_REVOKED", 0x80092010, _E_UNTRUSTED),
)
_BY_CODE = {row.code: row for row in PLATFORM_CODES}

#: A server that accepts only clients with a certificate (mutual TLS); the evidence follows
#: in parentheses: its alert, or its request for one and the connection it then closed.
CLIENT_CERTIFICATE_REQUIRED = (
    "TLS handshake failed: server requires a client certificate, and this client presents none"
)
_CERTIFICATE_REQUIRED_ALERT = "TLSV13_ALERT_CERTIFICATE_REQUIRED"  # OpenSSL's reason
#: OpenSSL's reasons for a handshake that read bytes that are not TLS at all (a plaintext
#: service answered the ClientHello), as opposed to a TLS alert from a TLS server.
NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",  # OpenSSL 1.1 and 3.x, for "220 …" read as a record header
        "UNKNOWN_PROTOCOL",  # OpenSSL 1.0
        "PACKET_LENGTH_TOO_LONG",  # a "record" whose length bytes are text
        "RECORD_LAYER_FAILURE",  # OpenSSL 3.2+, for the same
        "UNEXPECTED_RECORD",  # a record type that cannot open a handshake
    }
)

# OpenSSL's reasons for a handshake with no TLS version in common, where this client
# offers 1.2 and 1.3: the server's protocol_version alert, or a ServerHello of an older
# version. Either way the server speaks nothing newer than TLS 1.1.
_LEGACY_TLS_REASONS = frozenset({"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL"})
LEGACY_TLS_MESSAGE = "server offers only TLS 1.0/1.1; this client requires TLS 1.2 or newer"
LEGACY_TLS_HINT = (
    "the server must enable TLS 1.2 or 1.3: TLS 1.0 and 1.1 are deprecated (RFC 8996), "
    "and this client never negotiates them"
)

_E = TypeVar("_E", bound=BaseException)
_ENHANCED_CODE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")
#: Enhanced codes that refuse the sender for lack of Send As rights, after DATA
#: (Microsoft 365: 5.7.60 SendAsDenied, 5.2.252 SendAsDeniedException).
SEND_AS_REFUSALS = frozenset({"5.7.60", "5.2.252"})
#: A refusal in the envelope probe is the sender's or a recipient's.
_ENVELOPE_CATEGORIES = {
    Stage.MAIL: ErrorCategory.SENDER_REJECTED,
    Stage.RCPT: ErrorCategory.RECIPIENT_REJECTED,
}
_BEFORE_GREETING = frozenset({Stage.RESOLVE, Stage.CONNECT, Stage.TLS, Stage.BANNER})
_TLS_VERIFY_CATEGORIES = frozenset(
    {ErrorCategory.TLS_UNTRUSTED, ErrorCategory.TLS_EXPIRED, ErrorCategory.TLS_HOSTNAME}
)
STAGE_ACTIVITY = {
    Stage.RESOLVE: "while resolving the host name",
    Stage.CONNECT: "while connecting",
    Stage.TLS: "in the TLS handshake",
    Stage.BANNER: "while waiting for the server greeting",
    Stage.EHLO: "while waiting for the EHLO reply",
    Stage.STARTTLS: "in STARTTLS and its TLS handshake",
    Stage.AUTH: "while waiting for the AUTH reply",
    Stage.MAIL: "while waiting for the MAIL FROM reply",
    Stage.RCPT: "while waiting for a RCPT TO reply",
    Stage.DATA: "while sending the test message",
    Stage.QUIT: "while waiting for the QUIT reply",
}


@dataclass(frozen=True)
class Failure:
    """A classified failure of one connection."""

    category: ErrorCategory
    message: str
    stage: Stage
    smtp_code: int | None = None
    smtp_enhanced: str | None = None
    # OpenSSL's X509_V_ERR_* code; a native verifier's code when OpenSSL has no equivalent.
    verify_code: int | None = None
    hint: str | None = None  # known when the failure is detected (a token endpoint's refusal)
    # Whether another attempt may succeed, when the category alone does not say (a 4xx
    # refusal of a sender or recipient: greylisting, a full mailbox, a rate limit).
    retryable: bool | None = None

    @property
    def is_retryable(self) -> bool:
        return self.category.retryable if self.retryable is None else self.retryable

    # The TLS handshake read bytes that are not TLS (see NOT_TLS_REASONS).
    peer_not_tls: bool = False

    @property
    def is_certificate_failure(self) -> bool:
        return self.category in _TLS_VERIFY_CATEGORIES


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes and contexts, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    for link in exception_chain(exc):
        if isinstance(link, kind):
            return link
    return None


def _reply_failure(
    category: ErrorCategory, stage: Stage, code: int, text: str, prefix: str = ""
) -> Failure:
    reply = quote_reply(text)
    match = _ENHANCED_CODE.match(reply)
    return Failure(
        category,
        f"{prefix}{code} {reply}".strip(),
        stage,
        smtp_code=code,
        smtp_enhanced=match.group(1) if match else None,
    )


def _classify_reply(
    exc: SMTPResponseException, stage: Stage, credentials: Credentials | None
) -> Failure:
    code, text = exc.code, redact(exc.message, credentials)
    if code < 0:
        # aiosmtplib's code for a reply that is not SMTP at all.
        return Failure(
            ErrorCategory.PROTOCOL,
            f"not an SMTP reply ({quote_reply(text)})",
            stage,
        )
    enhanced = _ENHANCED_CODE.match(text.strip())
    is_auth = isinstance(exc, SMTPAuthenticationError) or stage is Stage.AUTH
    if is_auth and (code in (534, 535) or (enhanced and enhanced.group(1).startswith("5.7."))):
        return _reply_failure(ErrorCategory.AUTH_FAILED, stage, code, text)
    if stage is Stage.DATA and enhanced and enhanced.group(1) in SEND_AS_REFUSALS:
        # Microsoft 365 checks Send As when the message is submitted, not at MAIL FROM.
        return _reply_failure(ErrorCategory.SENDER_REJECTED, stage, code, text)
    if stage in _ENVELOPE_CATEGORIES and 400 <= code < 600:
        failure = _reply_failure(_ENVELOPE_CATEGORIES[stage], stage, code, text)
        return replace(failure, retryable=code < 500)
    if 400 <= code < 500:
        return _reply_failure(ErrorCategory.SMTP_TRANSIENT, stage, code, text)
    if 500 <= code < 600:
        if stage is Stage.STARTTLS:
            return _reply_failure(
                ErrorCategory.STARTTLS_UNAVAILABLE, stage, code, text, "STARTTLS refused: "
            )
        return _reply_failure(ErrorCategory.SMTP_PERMANENT, stage, code, text)
    return _reply_failure(ErrorCategory.PROTOCOL, stage, code, text, "unexpected reply: ")


def platform_code(code: int | None) -> PlatformCode | None:
    """The row for a native verifier's code; an HRESULT read as signed is found too."""
    if code is None:
        return None
    return _BY_CODE.get(code) or _BY_CODE.get(code & 0xFFFF_FFFF)


def _classify_certificate(exc: ssl.SSLCertVerificationError, stage: Stage) -> Failure:
    # truststore raises some without a code ("Peer sent no certificates to verify").
    code: int | None = getattr(exc, "verify_code", None)
    text = exc.args[-1] if exc.args and isinstance(exc.args[-1], str) else str(exc)
    detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or text
    native = platform_code(code)
    if native is not None:
        detail = f"{detail} ({native.platform} {native.name})"
        category, code = native.category, native.openssl or code
    else:
        category = _OPENSSL_CATEGORIES.get(code or 0, ErrorCategory.TLS_UNTRUSTED)
    return Failure(category, f"certificate verify failed: {detail}", stage, verify_code=code)


def classify(
    exc: BaseException,
    stage: Stage,
    *,
    host: str,
    endpoint: str,
    credentials: Credentials | None = None,
) -> Failure:
    """Classify what ended a connection at `stage`.

    Timeouts are not handled here: the caller knows how long the stage ran.
    Anything not recognised is INTERNAL, a bug the caller logs with its traceback.
    `credentials`: the secret this connection sent, redacted from the server's words
    before they are cut and cleaned into the message (a server may echo AUTH).
    """
    if isinstance(exc, SessionFailure):
        return Failure(exc.category, exc.message, stage, smtp_code=exc.smtp_code, hint=exc.hint)
    if (cert_error := _find(exc, ssl.SSLCertVerificationError)) is not None:
        return _classify_certificate(cert_error, stage)
    if (tls_error := _find(exc, ssl.SSLError)) is not None:
        if tls_error.reason == _CERTIFICATE_REQUIRED_ALERT:
            message = f"{CLIENT_CERTIFICATE_REQUIRED} (TLS alert certificate_required)"
            return Failure(ErrorCategory.TLS_HANDSHAKE, message, stage)
        reason = (tls_error.reason or str(tls_error)).lower().replace("_", " ")
        if tls_error.reason in _LEGACY_TLS_REASONS:
            return Failure(
                ErrorCategory.TLS_HANDSHAKE,
                f"{LEGACY_TLS_MESSAGE} ({reason})",
                stage,
                hint=LEGACY_TLS_HINT,
            )
        return Failure(
            ErrorCategory.TLS_HANDSHAKE,
            f"TLS handshake failed: {reason}",
            stage,
            peer_not_tls=tls_error.reason in NOT_TLS_REASONS,
        )
    if (dns_error := _find(exc, socket.gaierror)) is not None:
        return Failure(ErrorCategory.DNS, f"could not resolve {host}: {dns_error.strerror}", stage)
    if (reply := _find(exc, SMTPResponseException)) is not None:
        return _classify_reply(reply, stage, credentials)
    lost = _find(exc, SMTPServerDisconnected) or _find(exc, ConnectionError)
    if lost is not None or isinstance(exc, OSError):
        if stage in _BEFORE_GREETING:
            if _find(exc, ConnectionRefusedError) is not None:
                return Failure(ErrorCategory.REFUSED, f"connection refused by {endpoint}", stage)
            os_error = _find(exc, OSError)
            detail = os_error.strerror if os_error is not None and os_error.strerror else None
            if stage is Stage.CONNECT:  # no connection yet: unreachable, reset during connect
                reason = f": {detail}" if detail else ""
                return Failure(
                    ErrorCategory.REFUSED, f"could not connect to {endpoint}{reason}", stage
                )
            return Failure(
                ErrorCategory.REFUSED,
                f"connection closed before the greeting ({detail})"
                if detail
                else "connection closed before the greeting",
                stage,
            )
        during = STAGE_ACTIVITY[stage].replace("while waiting for", "during")
        return Failure(ErrorCategory.DISCONNECTED, f"server closed the connection {during}", stage)
    if (smtp_error := _find(exc, SMTPException)) is not None:
        return Failure(
            ErrorCategory.PROTOCOL, quote_reply(redact(smtp_error.message, credentials)), stage
        )
    return Failure(
        ErrorCategory.INTERNAL,
        f"internal error ({type(exc).__name__}); the worker log has the traceback",
        stage,
    )

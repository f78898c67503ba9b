"""The native verifiers' codes (truststore on macOS and Windows) map to categories.

macOS and Windows cannot run here, so each error is built the way truststore builds it
(``_macos.py`` / ``_windows.py``): ``ssl.SSLCertVerificationError(message)`` with
``verify_message`` set to the platform's text and ``verify_code`` to the platform's
code, raised raw in STARTTLS and wrapped in ``SMTPConnectError`` with implicit TLS.
"""

from __future__ import annotations

import importlib.util
import re
import ssl
from pathlib import Path

import pytest
from aiosmtplib import SMTPConnectError

from smtp_session.tasks.classify import (
    CERT_HAS_EXPIRED,
    PLATFORM_CODES,
    Failure,
    PlatformCode,
    classify,
    platform_code,
)
from smtp_session.tasks.errors import ErrorCategory, Stage


def truststore_error(message: str, code: int | None) -> ssl.SSLCertVerificationError:
    """Shaped as truststore raises it: the platform's text and code, no OpenSSL reason."""
    error = ssl.SSLCertVerificationError(message)
    if code is not None:
        error.verify_message = message
        error.verify_code = code
    return error


def platform_message(row: PlatformCode) -> str:
    """What the platform's own text looks like when it has none better to give."""
    if row.platform == "macOS":  # CFErrorCopyDescription of the CFError
        return f"The operation couldn\u2019t be completed. (OSStatus error {row.code}.)"
    # truststore's own text when FormatMessageW finds none
    return f"Certificate chain policy error {row.code:#x} [0]"


def classify_both_ways(error: ssl.SSLCertVerificationError) -> list[Failure]:
    wrapped = SMTPConnectError("Error connecting to 192.0.2.1 on port 465")
    wrapped.__cause__ = error
    return [
        classify(error, Stage.STARTTLS, host="h", endpoint="e"),
        classify(wrapped, Stage.TLS, host="h", endpoint="e"),
    ]


@pytest.mark.parametrize("row", PLATFORM_CODES, ids=lambda row: f"{row.platform}-{row.name}")
def test_each_platform_code(row: PlatformCode) -> None:
    for failure in classify_both_ways(truststore_error(platform_message(row), row.code)):
        assert failure.category is row.category
        assert failure.verify_code == (row.openssl or row.code)
        assert failure.message.endswith(f"({row.platform} {row.name})")
        # Only tls_untrusted sends trust=auto to the other store.
        assert failure.is_certificate_failure


def test_windows_text_is_quoted() -> None:
    text = (
        "A required certificate is not within its validity period when verifying "
        "against the current system clock or the embedded timestamp."
    )
    failure = classify_both_ways(truststore_error(text, 0x800B0101))[0]
    assert (failure.category, failure.verify_code) == (ErrorCategory.TLS_EXPIRED, CERT_HAS_EXPIRED)
    assert failure.message == f"certificate verify failed: {text} (Windows CERT_E_EXPIRED)"


def test_an_hresult_read_as_signed_is_found() -> None:
    assert platform_code(0x800B010F - 2**32) == platform_code(0x800B010F)
    assert platform_code(0x800B010F) is not None


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("Unknown trust result: 99", -1),
        # macOS 10.13 and earlier: a SecTrustResultType, which names no cause.
        ("Fatal trust failure occurred", 6),
        ("Recoverable trust failure occurred", 5),
        ("Certificate chain policy error 0x800b0199 [0]", 0x800B0199),
        ("The operation couldn\u2019t be completed. (OSStatus error -67999.)", -67999),
        # truststore on every platform when the peer sent nothing: no verify_code at all
        ("Peer sent no certificates to verify", None),
    ],
)
def test_unknown_codes_are_untrusted(message: str, code: int | None) -> None:
    for failure in classify_both_ways(truststore_error(message, code)):
        assert failure.category is ErrorCategory.TLS_UNTRUSTED
        assert failure.message == f"certificate verify failed: {message}"


def test_the_table_is_unambiguous() -> None:
    codes = [row.code for row in PLATFORM_CODES]
    assert len(codes) == len(set(codes))
    for row in PLATFORM_CODES:
        if row.platform == "macOS":
            assert -100_000 < row.code < 0  # an OSStatus from SecBase.h
        else:
            assert row.platform == "Windows"
            assert 0x8000_0000 <= row.code <= 0xFFFF_FFFF  # an HRESULT, as a DWORD
        assert (row.openssl is None) is (row.category is ErrorCategory.TLS_UNTRUSTED)


def test_codes_truststore_names_agree() -> None:
    """truststore's own constants for macOS (it names the ones it acts on) are ours."""
    spec = importlib.util.find_spec("truststore")
    assert spec is not None and spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0], "_macos.py").read_text()
    named = {name: int(code) for name, code in re.findall(r"(errSec\w+) = (-\d+)", source)}
    ours = {row.name: row.code for row in PLATFORM_CODES}
    checked = {name: code for name, code in named.items() if name in ours}
    assert checked, named
    assert checked == {name: ours[name] for name in checked}
    # truststore raises exactly the shape truststore_error builds.
    assert "err.verify_code = cf_error_code" in source

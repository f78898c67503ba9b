"""Trust modes: the TLS contexts that verify a server, and reading its certificate."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import ssl
import stat
import sys
from collections.abc import Coroutine
from typing import Any, Literal

import certifi
import truststore
from aiosmtplib import SMTP, SMTPException, SMTPResponse, SMTPResponseException
from aiosmtplib.typing import Default
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from smtp_session.tasks.client_auth import watch
from smtp_session.tasks.outcome import CertInfo
from smtp_session.tasks.resolve import connect_first, literal_address
from smtp_session.tasks.transcript import Transcript

TrustMode = Literal["native", "portable"]
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
_TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_TLS_VERSION
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


def _native_context() -> ssl.SSLContext:
    if sys.platform == "linux":
        # On Linux the operating system's verifier is OpenSSL with the system store, which
        # is what truststore uses there too, but truststore reloads the whole store at
        # every handshake (~20 ms of CPU each). Loaded once here, and rebuilt when the
        # store changes (see _store_version). Where OpenSSL's default paths hold no
        # certificate, truststore knows where else distributions keep them.
        context = ssl.create_default_context()
        if context.cert_store_stats()["x509_ca"] > 0:
            return context
    return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _mtime(path: str | None) -> float:
    try:
        return os.stat(path).st_mtime if path else 0.0
    except OSError:
        return 0.0


def _store_version() -> tuple[str | None, str | None, float, float]:
    """Where the system store is (SSL_CERT_FILE/SSL_CERT_DIR honoured) and when it changed."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile, paths.capath, _mtime(paths.cafile), _mtime(paths.capath)


#: A CA file larger than this is refused: a few CAs, or a bundle, not a disk image.
MAX_CA_FILE = 4 * 1024 * 1024
_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----"
)


def read_ca_file(path: str) -> str:
    """The PEM certificates of a CA file; raises OSError, or ValueError saying what is wrong.

    Opened without blocking and read only when it is a regular file, so that a FIFO or a
    device named as a CA file fails at once rather than hanging the session; bounded by
    MAX_CA_FILE. Only the certificates are kept (a private key beside them is not).
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("is not a regular file")
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(MAX_CA_FILE + 1)
    finally:
        os.close(descriptor)
    if len(data) > MAX_CA_FILE:
        raise ValueError(f"is larger than {MAX_CA_FILE // (1024 * 1024)} MiB")
    certificates = _PEM_CERTIFICATE.findall(data.decode("ascii", "replace"))
    if not certificates:
        raise ValueError("holds no PEM certificate")
    return "\n".join(certificates)


def ca_file_problem(exc: OSError | ValueError | ssl.SSLError) -> str:
    """What is wrong with a CA file, for an error message: read_ca_file's or the system's
    words (an SSLError: certificates OpenSSL cannot load)."""
    if isinstance(exc, ssl.SSLError):
        return "holds no usable PEM certificate"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


@functools.lru_cache(maxsize=64)
def _cached_context(mode: TrustMode, ca_pems: tuple[str, ...], _version: object) -> ssl.SSLContext:
    if mode == "native":
        return watch(_harden(_native_context()))
    context = ssl.create_default_context(cafile=certifi.where())
    for pem in ca_pems:
        context.load_verify_locations(cadata=pem)  # in memory: never written to disk
    return watch(_harden(context))


def forget_contexts() -> None:
    """Drop the cached contexts (truststore's native one keeps every store it loaded)."""
    _cached_context.cache_clear()


def verifying_context(
    mode: TrustMode, *ca_files: str | None, ca_pem: str | None = None
) -> ssl.SSLContext:
    """A context that verifies the chain and the host name, TLS 1.2 or newer.

    `native` asks the operating system's verifier; `portable` uses certifi's bundle plus
    the `ca_files` given (None ones skipped, each read with read_ca_file) and the
    certificates of `ca_pem`. Contexts are cached, since building one reads a whole CA
    bundle: by the CA files' content, so a replaced CA is used at once whatever its mtime;
    the system store's by its paths and mtimes. Raises OSError or ValueError for a CA file.
    """
    if mode == "native":
        return _cached_context(mode, (), _store_version())
    pems = tuple(read_ca_file(ca_file) for ca_file in ca_files if ca_file)
    return _cached_context(mode, (*pems, *([ca_pem] if ca_pem is not None else [])), None)


def _names(certificate: x509.Certificate) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        )
    except x509.ExtensionNotFound:
        return []
    sans = extension.value
    assert isinstance(sans, x509.SubjectAlternativeName)
    return [*sans.get_values_for_type(x509.DNSName)] + [
        str(address) for address in sans.get_values_for_type(x509.IPAddress)
    ]


@functools.lru_cache(maxsize=1024)
def describe_certificate(der: bytes) -> CertInfo | None:
    """The fields an operator needs to tell which certificate a server presented."""
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return CertInfo(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        not_before=certificate.not_valid_before_utc.strftime(_TIMESTAMP),
        not_after=certificate.not_valid_after_utc.strftime(_TIMESTAMP),
        sans=_names(certificate),
        sha256=hashlib.sha256(der).hexdigest(),
    )


def peer_certificate(smtp: SMTP) -> CertInfo | None:
    """The certificate of a live TLS connection (binary form: complete even if unverified)."""
    ssl_object = smtp.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return describe_certificate(der) if der else None


class SMTPClient(SMTP):
    """aiosmtplib's client, whose every close (its own ones too: after QUIT, on a failed
    connect or STARTTLS) drops the connection at once.

    aiosmtplib closes a TLS transport gracefully: it sends close_notify and keeps the socket
    until the server answers, up to asyncio's 30 s ssl_shutdown_timeout. A silent server
    holds it that long; and once the event loop ends first (`smtp-session check`), the socket
    is left to the garbage collector (ResourceWarning: unclosed transport). smtplib sends
    no close_notify either.

    It also writes the dialogue to `transcript` when the request asked for one.
    """

    #: Where the dialogue goes when the request asked for it (set by the session).
    transcript: Transcript | None = None

    def close(self) -> None:
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        super().close()

    async def execute_command(self, *args: bytes, timeout: Any = Default.token) -> SMTPResponse:
        if self.transcript is not None:
            self.transcript.sent(*args)
        response = await super().execute_command(*args, timeout=timeout)
        if self.transcript is not None:
            self.transcript.received(response.code, response.message)
        return response

    async def starttls(self, *args: Any, **kwargs: Any) -> SMTPResponse:
        # STARTTLS and DATA are written by aiosmtplib's protocol, not by execute_command.
        return await self._recorded([b"STARTTLS"], super().starttls(*args, **kwargs))

    async def data(self, message: str | bytes, /, **kwargs: Any) -> SMTPResponse:
        size = len(message.encode() if isinstance(message, str) else message)
        lines = [b"DATA", f"[the message, {size} bytes, then .]".encode()]
        return await self._recorded(lines, super().data(message, **kwargs))

    async def _recorded(
        self, sent: list[bytes], reply: Coroutine[Any, Any, SMTPResponse]
    ) -> SMTPResponse:
        if self.transcript is None:
            return await reply
        for line in sent:
            self.transcript.sent(line)
        try:
            response = await reply
        except SMTPResponseException as exc:
            self.transcript.received(exc.code, exc.message)
            raise
        self.transcript.received(response.code, response.message)
        return response


def _report_only_context() -> ssl.SSLContext:
    # REPORT-ONLY: this context never carries a session. It completes one handshake
    # after a verification failure so that the outcome can say *which* certificate was
    # refused; the connection sends no credentials and no mail command, and is closed
    # as soon as the certificate is read.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def fetch_unverified_certificate(
    *,
    address: str,
    port: int,
    server_hostname: str,
    implicit_tls: bool,
    local_hostname: str,
    seconds: float,
) -> CertInfo | None:
    """Read a refused server certificate for the report only (see _report_only_context).

    Bounded by `seconds`, the rest of the attempt's deadline; any failure gives None.
    """
    if seconds <= 0:
        return None
    addresses = literal_address(address, port)
    if addresses is None:
        return None
    smtp: SMTPClient | None = None
    try:
        async with asyncio.timeout(seconds):
            loop = asyncio.get_running_loop()
            # The address the session reached, not the name again: no second lookup.
            sock = await connect_first(addresses, loop.time() + seconds, [])
            smtp = SMTPClient(
                hostname=server_hostname,  # for SNI: the server may pick its certificate by it
                sock=sock,
                local_hostname=local_hostname,
                use_tls=implicit_tls,
                start_tls=False,
                tls_context=_report_only_context(),
                timeout=None,
            )
            await smtp.connect()
            if not implicit_tls:
                await smtp.ehlo()
                await smtp.starttls(tls_context=_report_only_context())
            return peer_certificate(smtp)
    except (SMTPException, OSError, TimeoutError, ValueError):
        # The report is best effort: whatever stops it, the outcome already has its error.
        return None
    finally:
        if smtp is not None:
            smtp.close()

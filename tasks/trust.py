"""Trust modes: the TLS contexts that verify a server, and reading its certificate."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import ssl
import stat
import sys
import warnings
from collections.abc import Coroutine, Sequence
from typing import Any, Literal

import certifi
import truststore
from aiosmtplib import SMTP, SMTPException, SMTPResponse, SMTPResponseException, SMTPStatus
from aiosmtplib.typing import Default
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtensionOID
from OpenSSL import SSL

from smtp_session.tasks.client_auth import watch
from smtp_session.tasks.outcome import CertInfo, ChainCert
from smtp_session.tasks.resolve import connect_first, is_ip_literal, literal_address
from smtp_session.tasks.server_text import bounded, printable
from smtp_session.tasks.transcript import Transcript

TrustMode = Literal["native", "portable"]
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
#: The most certificates of a presented chain kept: real chains have two to four.
MAX_CHAIN = 10
_TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
#: What cryptography raises for a certificate, or a part of one, that it will not read
#: (OpenSSL, less strict, may have taken it in a handshake or a store).
UNREADABLE = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
_READ_SIZE = 65_536
# The public key types a certificate names, as `tls.cert.key_type` says them.
_KEY_TYPES: tuple[tuple[type, str], ...] = (
    (rsa.RSAPublicKey, "RSA"),
    (ec.EllipticCurvePublicKey, "EC"),
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
    (dsa.DSAPublicKey, "DSA"),
)


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

    Read only when it is a regular file, so that a FIFO or a device named as a CA file
    fails at once rather than hanging the session; bounded by MAX_CA_FILE. Only the
    certificates are kept (a private key beside them is not). Read again whenever the
    file changed: its identity and change time (ctime, which no utime can set back) key
    the cache, not its mtime; the contexts built from it are keyed by its content.
    """
    info = os.stat(path)  # stat never blocks on a FIFO
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("is not a regular file")
    return _read_certificates(
        path, (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    )


@functools.lru_cache(maxsize=64)
def _read_certificates(path: str, _identity: tuple[int, ...]) -> str:
    # Opened without blocking, and checked again: the path may have been replaced since.
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
    """Drop the cached contexts (truststore's native one keeps every store it loaded), and
    the store certificates and CA files read for them."""
    _cached_context.cache_clear()
    _anchor.cache_clear()
    _read_certificates.cache_clear()


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


def _key(certificate: x509.Certificate) -> tuple[str | None, int | None, str | None]:
    """The public key's type, size in bits and (EC) curve name."""
    try:
        key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):  # a key type cryptography cannot load
        return None, None, None
    kind = next((name for cls, name in _KEY_TYPES if isinstance(key, cls)), None)
    curve = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else None
    bits = getattr(key, "key_size", None)
    # Ed25519 and Ed448 keys have one size each, which their type names.
    return kind, bits if isinstance(bits, int) else None, curve


def _signature_algorithm(certificate: x509.Certificate) -> str:
    oid = certificate.signature_algorithm_oid
    # cryptography's name for the OID is OpenSSL's (sha256WithRSAEncryption); its
    # dotted form when cryptography has none.
    return oid.dotted_string if oid._name == "Unknown OID" else oid._name


def _describe(certificate: x509.Certificate) -> CertInfo:
    key_type, key_bits, key_curve = _key(certificate)
    return CertInfo(
        subject=name_text(certificate.subject),
        issuer=name_text(certificate.issuer),
        not_before=certificate.not_valid_before_utc.strftime(_TIMESTAMP),
        not_after=certificate.not_valid_after_utc.strftime(_TIMESTAMP),
        sans=[bounded(printable(name), MAX_NAME) for name in _names(certificate)[:MAX_SANS]],
        sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        key_type=key_type,
        key_bits=key_bits,
        key_curve=key_curve,
        signature_algorithm=_signature_algorithm(certificate),
    )


#: A name in a certificate as an Outcome shows it, and how many SANs it lists at most.
MAX_NAME = 256
MAX_SANS = 100


def name_text(name: x509.Name) -> str:
    """An RFC 4514 name, made printable and bounded (a certificate may hold any bytes)."""
    return bounded(printable(name.rfc4514_string()), MAX_NAME)


@functools.lru_cache(maxsize=1024)
def describe_certificate(der: bytes) -> CertInfo | None:
    """The fields an operator needs to tell which certificate a server presented."""
    try:
        return _describe(x509.load_der_x509_certificate(der))
    except UNREADABLE:
        return None


def describe_chain(presented: Sequence[x509.Certificate]) -> CertInfo | None:
    """The first certificate presented, with the whole chain (in the server's order)."""
    if not presented:
        return None
    try:
        chain = [
            ChainCert(
                subject=name_text(certificate.subject),
                issuer=name_text(certificate.issuer),
                not_after=certificate.not_valid_after_utc.strftime(_TIMESTAMP),
                sha256=certificate.fingerprint(hashes.SHA256()).hex(),
            )
            for certificate in presented
        ]
        return _describe(presented[0]).model_copy(update={"chain": chain})
    except UNREADABLE:
        return None


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


def portable_anchors(*ca_files: str | None, ca_pem: str | None = None) -> list[x509.Certificate]:
    """The CA certificates of the portable store: certifi's, the `ca_files`', `ca_pem`'s."""
    context = verifying_context("portable", *ca_files, ca_pem=ca_pem)
    anchors = (_anchor(der) for der in context.get_ca_certs(binary_form=True))
    return [anchor for anchor in anchors if anchor is not None]


@functools.lru_cache(maxsize=1024)
def _anchor(der: bytes) -> x509.Certificate | None:
    with warnings.catch_warnings():
        # Some roots of certifi's (Go Daddy G2 among them) have serial number 0, which
        # cryptography warns of and says it will refuse: OpenSSL takes them as anchors.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(der)
        except UNREADABLE:  # not an anchor we can compare with
            return None


class _PresentedChain(asyncio.Protocol):
    """REPORT-ONLY: a TLS client handshake that verifies nothing, for the certificates
    the server presents (Python 3.11's ssl gives only the first of them).

    pyOpenSSL over memory BIOs, on the connection's own transport. It completes one
    handshake after a verification failure so that the outcome can say *which* chain was
    refused; nothing but the handshake is sent, and it is closed as soon as the chain is
    read.
    """

    def __init__(self, server_hostname: str) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)  # pyOpenSSL's default: VERIFY_NONE
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._tls = SSL.Connection(context, None)
        if not is_ip_literal(server_hostname):  # SNI names a host, never an address
            self._tls.set_tlsext_host_name(server_hostname.encode("ascii"))
        self._tls.set_connect_state()
        self._transport: asyncio.Transport | None = None
        # The chain, bounded to MAX_CHAIN; empty when the handshake failed or was cut.
        self.chain: asyncio.Future[list[x509.Certificate]] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._advance()

    def data_received(self, data: bytes) -> None:
        self._tls.bio_write(data)
        self._advance()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.chain.done():
            self.chain.set_result([])

    def _advance(self) -> None:
        if self.chain.done():
            return
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            pass  # the server's next flight first
        except SSL.Error:
            self.chain.set_result([])
        else:
            self.chain.set_result(self._presented())
        finally:
            self._send()  # our next flight, our Finished or our alert

    def _presented(self) -> list[x509.Certificate]:
        try:
            presented = self._tls.get_peer_cert_chain(as_cryptography=True) or []
        except UNREADABLE:  # one cryptography will not read
            return []
        return presented[:MAX_CHAIN]

    def _send(self) -> None:
        assert self._transport is not None
        while True:
            try:
                self._transport.write(self._tls.bio_read(_READ_SIZE))
            except SSL.WantReadError:  # nothing more to send
                return


async def fetch_unverified_chain(
    *,
    address: str,
    port: int,
    server_hostname: str,
    implicit_tls: bool,
    local_hostname: str,
    seconds: float,
) -> list[x509.Certificate]:
    """Read a refused server's chain for the report only (see _PresentedChain).

    In the server's order, at most MAX_CHAIN certificates. Bounded by `seconds`, the rest
    of the attempt's deadline; after STARTTLS nothing but the handshake is sent. Any
    failure gives an empty list.
    """
    if seconds <= 0:
        return []
    addresses = literal_address(address, port)
    if addresses is None:
        return []
    smtp: SMTPClient | None = None
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(seconds):
            loop = asyncio.get_running_loop()
            # The address the session reached, not the name again: no second lookup.
            sock = await connect_first(addresses, loop.time() + seconds, [])
            handshake = _PresentedChain(server_hostname)
            if implicit_tls:
                transport, _ = await loop.create_connection(lambda: handshake, sock=sock)
            else:
                smtp = SMTPClient(
                    hostname=server_hostname,
                    sock=sock,
                    local_hostname=local_hostname,
                    start_tls=False,
                    timeout=None,
                )
                await smtp.connect()
                await smtp.ehlo()
                if (await smtp.execute_command(b"STARTTLS")).code != SMTPStatus.ready:
                    return []
                # Hand the connection over to the handshake, as loop.start_tls() hands
                # it to the ssl module: the server sends nothing until our ClientHello.
                transport = smtp.transport
                assert transport is not None
                transport.set_protocol(handshake)
                handshake.connection_made(transport)
            return await handshake.chain
    except (SMTPException, OSError, TimeoutError, ValueError):
        # The report is best effort: whatever stops it, the outcome already has its error.
        return []
    finally:
        if transport is not None:
            transport.close()
        if smtp is not None:
            smtp.close()

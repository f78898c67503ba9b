"""The session request: every field validated once, before any network I/O."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Literal

import idna
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smtp_session.tasks.errors import InvalidRequest
from smtp_session.tasks.resolve import is_ip_literal

Security = Literal["auto", "starttls", "tls", "plain"]
Trust = Literal["auto", "native", "portable"]

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = 600.0
DEFAULT_RETRIES = 2
MAX_RETRIES = 10
IMPLICIT_TLS_PORT = 465
SUBMISSION_PORT = 587
MAX_HOST_LENGTH = 253
MAX_LABEL_LENGTH = 63
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_CA_PEM = 65_536  # characters: a few CA certificates, not a bundle of hundreds
NATIVE_IGNORES_CA_FILE = (
    "is not used with trust native (the system's store only): use trust auto or portable"
)
_HOST_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?$")
#: RFC 5321 §4.5.3.1: a local part of 64 octets, a path of 256 with its angle brackets.
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254
#: Recipients one envelope probe may name: enough for a test, too few for a mailing.
MAX_RECIPIENTS = 10
#: RFC 5321 atext (RFC 5322 §3.2.3), plus any non-ASCII character (RFC 6531 SMTPUTF8).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')


def _check_host_name(host: str) -> bool:
    """Raise ValueError saying what is wrong with a host name; True for an IP literal."""
    if not host:
        raise ValueError("must not be empty")
    if any(ch.isspace() for ch in host):
        raise ValueError("must not contain spaces")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in host):
        raise ValueError("must not contain control characters")
    if len(host) > MAX_HOST_LENGTH:
        raise ValueError(f"is longer than {MAX_HOST_LENGTH} characters")
    ascii_host = _ascii_host(host)
    if is_ip_literal(ascii_host):
        return True
    if not all(
        _HOST_LABEL.match(label) and len(label) <= MAX_LABEL_LENGTH
        for label in ascii_host.split(".")
    ):
        raise ValueError(f"{host!r} is not a valid host name")
    return False


@functools.lru_cache(maxsize=4096)
def _ascii_host(host: str) -> str:
    """The name to connect to: an IP literal as is, a DNS name as its IDNA (A-label) form."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = bare.rstrip(".")
    if name.isascii():
        return name.lower()
    try:
        # IDNA 2008 with UTS 46 mapping, as browsers and mail clients resolve names:
        # Python's own "idna" codec is IDNA 2003, which maps faß.de to fass.de.
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"{host!r} is not a valid host name ({exc})") from None


def check_host(host: str) -> str:
    """`host` if it is a host name (IDNA) or an IP literal, else ValueError saying why."""
    _check_host_name(host)
    return host


def check_address(address: str) -> str:
    """`address` if it is an RFC 5321 mailbox (`local@domain`, the domain a host name or an
    address literal), or "" (the null reverse-path); else ValueError saying why."""
    if address == "":
        return address
    if len(address.encode()) > MAX_ADDRESS:
        raise ValueError(f"is longer than {MAX_ADDRESS} octets")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not an address (local-part@domain)")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise ValueError(f"{address!r}: the local part is longer than {MAX_LOCAL_PART} octets")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise ValueError(f"{address!r}: the local part is not a dot-string or a quoted string")
    try:
        check_host(domain)
    except ValueError as exc:
        raise ValueError(f"{address!r}: the domain {exc}") from None
    return address


class SessionRequest(BaseModel):
    """What to connect to and how; see docs/request.md."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    host: str
    port: int | None = Field(default=None, ge=1, le=65535)
    security: Security = "auto"
    trust: Trust = "auto"
    ca_file: str | None = None
    ca_pem: str | None = Field(default=None, max_length=MAX_CA_PEM)
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, le=MAX_TIMEOUT, allow_inf_nan=False)
    connect_timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT, allow_inf_nan=False)
    command_timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT, allow_inf_nan=False)
    retries: int = Field(default=DEFAULT_RETRIES, ge=0, le=MAX_RETRIES)
    credentials: str | None = None
    ehlo_name: str | None = None
    tls_name: str | None = None
    target: str | None = None
    transcript: bool = False
    mail_from: str | None = None
    rcpt_to: list[str] | None = Field(default=None, min_length=1, max_length=MAX_RECIPIENTS)
    send_test_message: bool = False

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        return check_host(host)

    @field_validator("mail_from")
    @classmethod
    def _check_mail_from(cls, address: str | None) -> str | None:
        return None if address is None else check_address(address)

    @field_validator("rcpt_to")
    @classmethod
    def _check_rcpt_to(cls, addresses: list[str] | None) -> list[str] | None:
        for index, address in enumerate(addresses or []):
            if not address:
                raise ValueError(f"#{index + 1}: the null path <> is no recipient")
            try:
                check_address(address)
            except ValueError as exc:
                raise ValueError(f"#{index + 1}: {exc}") from None
        return addresses

    @field_validator("tls_name")
    @classmethod
    def _check_tls_name(cls, name: str | None) -> str | None:
        if name is None:
            return None
        # An IP literal verifies as `host` already; and SNI carries no address (RFC 6066 §3).
        if _check_host_name(name):
            raise ValueError("must be a DNS name, not an IP address (give the address as host)")
        return name

    @field_validator("ca_pem")
    @classmethod
    def _check_ca_pem(cls, pem: str | None) -> str | None:
        if pem is not None:
            check_ca_pem(pem)
        return pem

    @field_validator("credentials", "target")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        if name is not None and not NAME_PATTERN.match(name):
            raise ValueError("must be 1-128 letters, digits, '_', '-' or '.'")
        return name

    @field_validator("ehlo_name")
    @classmethod
    def _check_ehlo_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[!-~]{1,255}", name):
            raise ValueError("must be 1-255 printable ASCII characters without spaces")
        return name

    @model_validator(mode="after")
    def _envelope_needs_both(self) -> SessionRequest:
        if self.mail_from is not None and self.rcpt_to is None:
            raise ValueError("rcpt_to is required with mail_from (the envelope probe)")
        if self.rcpt_to is not None and self.mail_from is None:
            raise ValueError("mail_from is required with rcpt_to (the envelope probe)")
        if self.send_test_message and self.mail_from is None:
            raise ValueError("send_test_message needs mail_from and rcpt_to")
        return self

    @model_validator(mode="after")
    def _credentials_need_tls(self) -> SessionRequest:
        if self.credentials is not None and self.security == "plain":
            raise ValueError("credentials need TLS: use security starttls or tls")
        return self

    @model_validator(mode="after")
    def _tls_name_needs_tls(self) -> SessionRequest:
        if self.tls_name is not None and self.security == "plain":
            raise ValueError("tls_name is not used with security plain (no TLS)")
        return self

    @model_validator(mode="after")
    def _ca_file_needs_portable_trust(self) -> SessionRequest:
        for name in ("ca_file", "ca_pem"):
            if getattr(self, name) is not None and self.trust == "native":
                raise ValueError(f"{name} {NATIVE_IGNORES_CA_FILE}")
        return self

    @property
    def names_a_ca(self) -> bool:
        """The request brings its server's CA (ca_file or ca_pem)."""
        return self.ca_file is not None or self.ca_pem is not None

    @property
    def connect_host(self) -> str:
        """The host as it is resolved and connected to (and named in TLS, without tls_name)."""
        return _ascii_host(self.host)

    @property
    def tls_server_name(self) -> str:
        """The name sent in SNI and that the certificate must name: tls_name, else the host."""
        return _ascii_host(self.tls_name) if self.tls_name is not None else self.connect_host

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return IMPLICIT_TLS_PORT if self.security == "tls" else SUBMISSION_PORT

    @property
    def effective_security(self) -> Literal["starttls", "tls", "plain"]:
        """`auto` resolved: implicit TLS on 465, required STARTTLS anywhere else."""
        if self.security != "auto":
            return self.security
        return "tls" if self.effective_port == IMPLICIT_TLS_PORT else "starttls"

    # `timeout` is the one knob most people turn: the stage budgets default to it (each
    # stage then has the whole attempt's time), and never exceed it.
    @property
    def effective_connect_timeout(self) -> float:
        return min(self.connect_timeout or self.timeout, self.timeout)

    @property
    def effective_command_timeout(self) -> float:
        return min(self.command_timeout or self.timeout, self.timeout)


def check_ca_pem(pem: str) -> None:
    """PEM text of CA certificates, and nothing else; raises ValueError saying what is wrong."""
    if "PRIVATE KEY" in pem:
        raise ValueError("must hold CA certificates only, not a private key")
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("utf-8", "replace"))
    except ValueError:
        raise ValueError("holds no PEM certificate (-----BEGIN CERTIFICATE----- …)") from None
    if not certificates:
        raise ValueError("holds no PEM certificate (-----BEGIN CERTIFICATE----- …)")


def check_queue_request(request: SessionRequest) -> None:
    """What a request from the queue may not ask: raises InvalidRequest naming the field."""
    if request.ca_file is not None:
        raise InvalidRequest(
            "ca_file",
            "is not accepted from the queue (it names a file on the worker): "
            "send the CA certificate itself as ca_pem",
        )


def _describe(error: Mapping[str, Any]) -> InvalidRequest:
    field = ".".join(str(part) for part in error["loc"]) or "request"
    kind = error["type"]
    if kind == "extra_forbidden":
        return InvalidRequest(field, "unknown field")
    if kind == "missing":
        return InvalidRequest(field, "is required")
    message = str(error["msg"]).removeprefix("Value error, ")
    field_named, _, problem = message.partition(" ")
    if not error["loc"] and field_named in SessionRequest.model_fields:
        return InvalidRequest(field_named, problem)
    return InvalidRequest(field, message[:1].lower() + message[1:])


def parse_request(fields: Mapping[str, Any]) -> SessionRequest:
    """Validate raw fields (task kwargs, CLI options) into a request.

    Raises InvalidRequest naming the first offending field and what is wrong with it.
    """
    if not isinstance(fields, Mapping):
        raise InvalidRequest("request", "must be a mapping of field names to values")
    try:
        return SessionRequest.model_validate(dict(fields))
    except ValidationError as exc:
        raise _describe(exc.errors()[0]) from None

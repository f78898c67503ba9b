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
    target: str | None = None

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
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
            return host
        if not all(
            _HOST_LABEL.match(label) and len(label) <= MAX_LABEL_LENGTH
            for label in ascii_host.split(".")
        ):
            raise ValueError(f"{host!r} is not a valid host name")
        return host

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
    def _credentials_need_tls(self) -> SessionRequest:
        if self.credentials is not None and self.security == "plain":
            raise ValueError("credentials need TLS: use security starttls or tls")
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
        """The host as it goes on the wire and into TLS server-name checks."""
        return _ascii_host(self.host)

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
    if not error["loc"] and message.startswith(("credentials", "ca_file", "ca_pem")):
        field, _, problem = message.partition(" ")
        return InvalidRequest(field, problem)
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

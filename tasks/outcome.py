"""The Outcome of one session request (JSON `schema: 1`, see docs/outcome.md)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from smtp_session.tasks.envelope import Envelope
from smtp_session.tasks.errors import ErrorCategory, Stage
from smtp_session.tasks.transcript import TranscriptLine

SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds (`X`, `X | None`, `list[X] | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(
        (model for kind in getattr(annotation, "__args__", ()) if (model := _model_in(kind))),
        None,
    )


def _known(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys `model` (and the models inside it) does not know."""
    known: dict[str, Any] = {}
    for name, value in data.items():
        field = model.model_fields.get(name)
        if field is None:
            continue
        inner = _model_in(field.annotation)
        if inner is not None and isinstance(value, dict):
            value = _known(inner, value)
        elif inner is not None and isinstance(value, list):
            value = [_known(inner, item) if isinstance(item, dict) else item for item in value]
        known[name] = value
    return known


class ChainCert(_Frozen):
    """One certificate of the chain a server presented."""

    subject: str
    issuer: str
    not_after: str
    sha256: str


class CertInfo(_Frozen):
    """The certificate the server presented, verified or not."""

    subject: str
    issuer: str
    not_before: str
    not_after: str
    sans: list[str]
    sha256: str
    key_type: str | None = None  # RSA, EC, Ed25519, Ed448, DSA
    key_bits: int | None = None
    key_curve: str | None = None  # EC keys: the named curve (secp256r1)
    signature_algorithm: str | None = None  # sha256WithRSAEncryption, ecdsa-with-SHA256
    # Every certificate presented, in the server's order, when it was read: on the
    # report-only connection after a verification failure (Python's ssl gives only the leaf).
    chain: list[ChainCert] | None = None


class TlsInfo(_Frozen):
    version: str | None = None
    cipher: str | None = None
    trust: str | None = None  # the trust mode of the last handshake: native or portable
    fallback: bool = False  # the portable retry after a native tls_untrusted ran
    remembered: bool = False  # started in portable: the trust memory holds this server
    verified: bool = False
    cert: CertInfo | None = None


class ServerInfo(_Frozen):
    banner: str | None = None
    extensions: list[str] = []
    auth_mechanisms: list[str] = []
    size_limit: int | None = None
    auth_before_tls: bool = False  # AUTH advertised on a plaintext connection


class Timings(_Frozen):
    """Seconds spent per stage by the attempt (every connection of it added up); null for
    stages that did not run."""

    resolve: float | None = None
    connect: float | None = None
    tls: float | None = None  # implicit TLS handshake (security=tls) only
    banner: float | None = None
    ehlo: float | None = None
    starttls: float | None = None
    auth: float | None = None
    mail: float | None = None
    rcpt: float | None = None
    data: float | None = None
    quit: float | None = None
    total: float | None = None


class Outcome(_Frozen):
    """What one session request came to: see docs/outcome.md."""

    schema_: int = Field(default=SCHEMA_VERSION, alias="schema")
    ok: bool
    err_message: str
    error: ErrorCategory | None = None
    stage: Stage
    retryable: bool = False
    hint: str | None = None
    smtp_code: int | None = None
    smtp_enhanced: str | None = None
    host: str
    port: int | None = None
    address: str | None = None
    security: str | None = None
    target: str | None = None
    domain: str | None = None  # the mail domain this server was discovered for
    tls: TlsInfo | None = None
    server: ServerInfo | None = None
    authenticated: bool = False
    timings: Timings = Timings()
    attempts: int = 0
    started_at: str
    transcript: list[TranscriptLine] | None = None
    envelope: Envelope | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict, keyed as in docs/outcome.md (`schema`, not `schema_`)."""
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        """Read back what to_dict() wrote (a Celery result, a `--json` line).

        Fields this version does not know are dropped: a newer worker may add some.
        """
        fields = dict(data)
        fields["schema_"] = fields.pop("schema", SCHEMA_VERSION)
        return cls.model_validate(_known(cls, fields))


def join_host_port(host: str, port: int | None) -> str:
    """`host:port` as people write it: an IPv6 literal with a port goes in brackets."""
    if not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def json_schema() -> dict[str, Any]:
    """The Outcome's JSON Schema, made from the model (`smtp-session schema` prints it)."""
    schema = Outcome.model_json_schema(by_alias=True, mode="serialization")
    schema["title"] = "smtp-session Outcome"
    schema["description"] = f"The outcome of one SMTP session request, schema {SCHEMA_VERSION}."
    return schema

"""Service settings from the environment (prefix SMTP_SESSION_), validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import platformdirs
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from smtp_session.tasks.contract import DEFAULT_CONCURRENCY
from smtp_session.tasks.egress import (
    DEFAULT_MAX_PER_DESTINATION,
    DEFAULT_PORTS,
    EgressPolicy,
    parse_networks,
    parse_ports,
)
from smtp_session.tasks.errors import SessionWorkerError
from smtp_session.tasks.request import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    MAX_RETRIES,
    MAX_TIMEOUT,
    NATIVE_IGNORES_CA_FILE,
    Trust,
)
from smtp_session.worker import embedded_broker

if TYPE_CHECKING:
    import dns.asyncresolver

ENV_PREFIX = "SMTP_SESSION_"
APP_NAME = "smtp-session"
DEFAULT_METRICS_PORT = 9808
DEFAULT_MAX_TIMEOUT = 30.0
MAX_WORKER_CONCURRENCY = 2000
#: Broker URLs of a Redis server (kombu's spellings).
REDIS_SCHEMES = ("redis://", "rediss://", "redis+")
DEFAULT_METRICS_ADDRESS = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the worker from elsewhere


class InvalidSettings(SessionWorkerError, ValueError):
    """An environment variable holds an unusable value."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class Settings(BaseSettings):
    """See docs/settings.md; every field is `SMTP_SESSION_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Not in repr(): URLs carry passwords (redis://:password@host).
    broker_url: str | None = Field(default=None, repr=False)
    result_backend: str | None = Field(default=None, repr=False)
    # Per user, not per current directory: `make run` and `enqueue` meet from anywhere.
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_state_dir(APP_NAME)))
    targets: Path | None = None
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=0, le=65535)
    # Extension: ADDRESS:PORT for /metrics, overriding METRICS_PORT; port 0 picks a free port
    # (the worker logs `metrics.listening` with the one it got).
    metrics_listen: str | None = Field(default=None, pattern=r"^\[?[0-9A-Za-z.:-]+\]?:\d{1,5}$")
    log_format: Literal["json", "console"] = "json"
    trust: Trust = "auto"
    ca_file: Path | None = None
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, le=MAX_TIMEOUT, allow_inf_nan=False)
    retries: int = Field(default=DEFAULT_RETRIES, ge=0, le=MAX_RETRIES)
    sweep_concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=10_000)
    # Sessions one worker process runs at once (its pool threads, sharing one event loop).
    worker_concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=MAX_WORKER_CONCURRENCY)
    # The longest `timeout` a worker accepts; it bounds how long a task can run, and so
    # how soon Redis hands the tasks of a killed worker to another one.
    max_timeout: float = Field(
        default=DEFAULT_MAX_TIMEOUT, gt=0, le=MAX_TIMEOUT, allow_inf_nan=False
    )

    # The egress policy of requests from the queue (docs/settings.md): CIDRs added to the
    # public internet, and the ports allowed (empty: 25, 465, 587, 2525).
    allow_networks: str = ""
    allow_ports: str = ""
    # DNS servers asked to discover the servers of mail-domain targets (IP[:PORT], comma-
    # separated); empty: the system's resolver (/etc/resolv.conf).
    dns_servers: str = ""
    # Sessions at once to one destination address, per worker process.
    max_per_destination: int = Field(default=DEFAULT_MAX_PER_DESTINATION, ge=1, le=10_000)

    @field_validator("allow_networks")
    @classmethod
    def _check_networks(cls, text: str) -> str:
        parse_networks(text)
        return text

    @field_validator("dns_servers")
    @classmethod
    def _check_dns_servers(cls, text: str) -> str:
        from smtp_session.tasks.discovery import parse_nameservers  # dnspython: on demand

        parse_nameservers(text)
        return text

    @field_validator("allow_ports")
    @classmethod
    def _check_ports(cls, text: str) -> str:
        if text.strip():
            parse_ports(text)
        return text

    def discovery_resolver(self) -> dns.asyncresolver.Resolver | None:
        """The resolver of mail-domain discovery: SMTP_SESSION_DNS_SERVERS, else None (the
        system's)."""
        from smtp_session.tasks.discovery import parse_nameservers, resolver_for

        return resolver_for(parse_nameservers(self.dns_servers))

    def check_ca_file(self) -> None:
        """Raise InvalidSettings when SMTP_SESSION_CA_FILE cannot be used: checked when a
        process that runs sessions starts (worker, check, sweep), not by every command."""
        from smtp_session.tasks.trust import ca_file_problem, read_ca_file  # the TLS stack

        if self.ca_file is not None:
            try:
                read_ca_file(str(self.ca_file))
            except (OSError, ValueError) as exc:
                problem = f"{str(self.ca_file)!r}: {ca_file_problem(exc)}"
                raise InvalidSettings(f"{ENV_PREFIX}CA_FILE", problem) from None

    @property
    def egress_policy(self) -> EgressPolicy:
        """Where requests from the queue may connect."""
        ports = parse_ports(self.allow_ports) if self.allow_ports.strip() else DEFAULT_PORTS
        return EgressPolicy(parse_networks(self.allow_networks), ports)

    @model_validator(mode="after")
    def _ca_file_needs_portable_trust(self) -> Settings:
        if self.ca_file is not None and self.trust == "native":
            raise ValueError(f"ca_file: {NATIVE_IGNORES_CA_FILE}")
        return self

    @model_validator(mode="after")
    def _timeout_within_max(self) -> Settings:
        if self.timeout > self.max_timeout:
            raise ValueError(
                f"timeout: must be at most {ENV_PREFIX}MAX_TIMEOUT ({self.max_timeout:g} s)"
            )
        return self

    @property
    def listen_address(self) -> tuple[str, int] | None:
        """Where /metrics listens, or None when disabled (METRICS_PORT=0)."""
        if self.metrics_listen is not None:
            host, _, port = self.metrics_listen.rpartition(":")
            return host.strip("[]"), int(port)
        if self.metrics_port == 0:
            return None
        return DEFAULT_METRICS_ADDRESS, self.metrics_port

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or embedded_broker.url(self.data_dir)

    @property
    def redis_broker(self) -> bool:
        """Whether the broker speaks Redis: a Redis server, or the embedded Valkey."""
        return self.effective_broker_url.startswith(REDIS_SCHEMES)

    @property
    def effective_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.redis_broker:
            return self.effective_broker_url  # Redis is both broker and result store
        return f"file://{(self.data_dir / 'results').resolve()}"

    @property
    def extra_ca_file(self) -> str | None:
        """The operator's CAs, added to the portable store of every session."""
        return str(self.ca_file) if self.ca_file is not None else None

    def request_defaults(self) -> dict[str, Any]:
        """Defaults applied under every request's own fields."""
        defaults: dict[str, Any] = {
            "trust": self.trust,
            "timeout": self.timeout,
            "retries": self.retries,
        }
        return defaults


def load_settings() -> Settings:
    """Read the environment once; raises InvalidSettings naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]
        problem = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            field = str(error["loc"][0])
        else:  # a check across fields names its field first: "timeout: must be …"
            field, _, problem = problem.partition(": ")
        raise InvalidSettings(
            ENV_PREFIX + field.upper(), problem[:1].lower() + problem[1:]
        ) from None

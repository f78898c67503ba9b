"""Results of checking many servers: a mail domain's verdict, and a sweep's summary.

Both are plain data, read back by smtp_session.worker.client like the Outcome is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from smtp_session.tasks.errors import ErrorCategory
from smtp_session.tasks.outcome import SCHEMA_VERSION, Outcome, join_host_port

#: When a mail domain counts as up: at least one of its servers ok, or every one.
Require = Literal["any", "all"]
REQUIRE_DEFAULT: Require = "any"


class DomainOutcome(BaseModel):
    """What checking a `domain` target came to: its verdict and each server's Outcome."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    schema_: int = Field(default=SCHEMA_VERSION, alias="schema")
    ok: bool
    err_message: str
    error: ErrorCategory | None = None
    domain: str
    target: str | None = None
    require: Require
    servers: int
    servers_ok: int
    started_at: str
    duration_s: float
    outcomes: list[Outcome] = []

    def to_dict(self, *, outcomes: bool = True) -> dict[str, Any]:
        """The JSON-ready dict; without `outcomes` when a sweep lists them already."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"outcomes"})
        if outcomes:
            data["outcomes"] = [outcome.to_dict() for outcome in self.outcomes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainOutcome:
        fields = {key: value for key, value in data.items() if key in _DOMAIN_KEYS}
        fields["outcomes"] = [Outcome.from_dict(item) for item in data.get("outcomes", [])]
        return cls.model_validate(fields)


_DOMAIN_KEYS = frozenset(
    field.alias or name for name, field in DomainOutcome.model_fields.items()
) - {"outcomes"}


def domain_verdict(
    domain: str,
    outcomes: Sequence[Outcome],
    *,
    discovered: bool,
    require: Require,
    target: str | None,
    started_at: str,
    duration_s: float,
) -> DomainOutcome:
    """The verdict on `domain` from its servers' outcomes; when discovery failed
    (`discovered` false), `outcomes` holds the one Outcome saying why."""
    servers = len(outcomes) if discovered else 0
    failed = [outcome for outcome in outcomes if not outcome.ok]
    ok = discovered and (not failed if require == "all" else len(failed) < servers)
    first = None if ok else failed[0]
    return DomainOutcome(
        ok=ok,
        err_message="" if first is None else _why(domain, first, len(failed), servers),
        error=None if first is None else first.error,
        domain=domain,
        target=target,
        require=require,
        servers=servers,
        servers_ok=servers - len(failed) if discovered else 0,
        started_at=started_at,
        duration_s=duration_s,
        outcomes=list(outcomes),
    )


def _why(domain: str, failed: Outcome, count: int, servers: int) -> str:
    if not servers:
        return failed.err_message
    server = join_host_port(failed.host, failed.port)
    return f"{count} of {servers} servers of {domain} failed; {server}: {failed.err_message}"


class SweepSummary(BaseModel):
    """The `smtp_session.sweep` result: every session's Outcome, and each domain's verdict."""

    model_config = ConfigDict(frozen=True)

    total: int
    ok: int
    failed: int
    duration_s: float
    outcomes: list[Outcome]
    domains: list[DomainOutcome] = []

    @property
    def targets_ok(self) -> bool:
        """Every target up: each host target's session ok, each domain's verdict ok."""
        return all(outcome.ok for outcome in self.outcomes if outcome.domain is None) and all(
            domain.ok for domain in self.domains
        )

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"outcomes", "domains"})
        return {
            **data,
            "outcomes": [outcome.to_dict() for outcome in self.outcomes],
            "domains": [domain.to_dict(outcomes=False) for domain in self.domains],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSummary:
        return cls(
            total=data["total"],
            ok=data["ok"],
            failed=data["failed"],
            duration_s=data["duration_s"],
            outcomes=[Outcome.from_dict(item) for item in data["outcomes"]],
            domains=[DomainOutcome.from_dict(item) for item in data.get("domains", [])],
        )

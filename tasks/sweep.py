"""Check many servers at once in one process, with a bound on concurrent sessions."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver

from smtp_session.tasks.contract import attempt_time_limit
from smtp_session.tasks.discovery import MAX_DISCOVERED, QUERY_ROUNDS, discover
from smtp_session.tasks.errors import ErrorCategory, SessionFailure, Stage
from smtp_session.tasks.observe import DEFAULT_OBSERVERS, SessionObserver, report, report_domain
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.request import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    SessionRequest,
    parse_request,
)
from smtp_session.tasks.session import (
    DEFAULT_RETRY_POLICY,
    MAX_BACKOFF,
    UNGUARDED,
    Guards,
    RetryPolicy,
    open_session,
    utc_now,
)
from smtp_session.tasks.summary import (
    REQUIRE_DEFAULT,
    DomainOutcome,
    Require,
    SweepSummary,
    domain_verdict,
)
from smtp_session.tasks.trust_memory import TrustMemory


@dataclass(frozen=True)
class DomainCheck:
    """A target given as a mail domain: its hosts are discovered (submission SRV records,
        then MX, then the domain's own address) when checked.

        Each discovered host becomes a session of its own, with `fields` as its request; the
    domain is up when `require` ("any" or "all") of them are ok.
    """

    domain: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    require: Require = REQUIRE_DEFAULT


SweepItem = SessionRequest | DomainCheck


def with_defaults(item: SweepItem, defaults: Mapping[str, Any]) -> SweepItem:
    """The item with `defaults` (the settings' request defaults) under its own fields."""
    if isinstance(item, DomainCheck):
        return DomainCheck(item.domain, {**defaults, **item.fields}, item.require)
    return parse_request({**defaults, **item.model_dump(exclude_unset=True)})


def request_time_limit(timeout: float, retries: int) -> float:
    """The longest one request with in-process retries may take (each backoff at its cap)."""
    return (retries + 1) * attempt_time_limit(timeout) + retries * MAX_BACKOFF


def time_limit(item: SweepItem, *, concurrency: int) -> float:
    """The longest checking `item` may take: its deadlines, retries and discovery added up."""
    if isinstance(item, SessionRequest):
        return request_time_limit(item.timeout, item.retries)
    timeout, retries = item.fields.get("timeout"), item.fields.get("retries")
    timeout = float(timeout) if isinstance(timeout, int | float) else DEFAULT_TIMEOUT
    retries = retries if isinstance(retries, int) else DEFAULT_RETRIES
    # The discovery queries (SRV twice, MX, the address records), each bounded by the
    # timeout; then the hosts, as many at once as the concurrency allows.
    rounds = math.ceil(MAX_DISCOVERED / concurrency)
    return QUERY_ROUNDS * timeout + rounds * request_time_limit(timeout, retries)


@dataclass
class _Sweep:
    concurrency: int
    environ: Mapping[str, str] | None
    observers: Sequence[SessionObserver]
    trust_memory: TrustMemory | None
    extra_ca_file: str | None
    guards: Guards
    retry_policy: RetryPolicy
    on_outcome: Callable[[Outcome], None] | None
    resolver: dns.asyncresolver.Resolver | None
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)

    def _done(self, outcome: Outcome) -> Outcome:
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    async def session(
        self, request: SessionRequest | Mapping[str, Any], *, domain: str | None = None
    ) -> Outcome:
        """One session; a server discovered for `domain` has its outcomes marked so."""
        observers = self.observers if domain is None else (_Discovered(domain, self.observers),)
        async with self._slots:
            outcome = await open_session(
                request,
                environ=self.environ,
                observers=observers,
                trust_memory=self.trust_memory,
                extra_ca_file=self.extra_ca_file,
                guards=self.guards,
                retry_policy=self.retry_policy,
            )
        return self._done(outcome if domain is None else _marked(outcome, domain))

    async def domain(self, check: DomainCheck) -> DomainOutcome:
        loop = asyncio.get_running_loop()
        started, started_at = loop.time(), utc_now()
        target = check.fields.get("target")
        target = target if isinstance(target, str) else None
        try:
            async with self._slots:
                timeout = check.fields.get("timeout", DEFAULT_TIMEOUT)
                hosts = await discover(
                    check.domain,
                    resolver=self.resolver,
                    lifetime=float(timeout) if isinstance(timeout, int | float) else None,
                )
        except SessionFailure as exc:
            failure = Outcome(
                ok=False,
                err_message=exc.message,
                error=ErrorCategory.DNS,
                stage=Stage.RESOLVE,
                retryable=ErrorCategory.DNS.retryable,
                host=check.domain,
                target=target,
                domain=check.domain,
                started_at=started_at,
            )
            # No session: what discovery found (nothing) is told as the domain's verdict.
            outcomes, discovered = [self._done(failure)], False
        else:
            # What discovery found (the port, and implicit TLS for _submissions), unless
            # the target itself says otherwise.
            requests = [
                {
                    "port": found.port,
                    **({"security": found.security} if found.security is not None else {}),
                    **check.fields,
                    "host": found.host,
                }
                for found in hosts
            ]
            sessions = (self.session(request, domain=check.domain) for request in requests)
            outcomes, discovered = list(await asyncio.gather(*sessions)), True
        verdict = domain_verdict(
            check.domain,
            outcomes,
            discovered=discovered,
            require=check.require,
            target=target,
            started_at=started_at,
            duration_s=round(loop.time() - started, 3),
        )
        report_domain(verdict, observers=self.observers)
        return verdict

    async def item(self, item: SweepItem) -> tuple[list[Outcome], list[DomainOutcome]]:
        """The item's outcomes, and its verdict when it is a domain."""
        if isinstance(item, DomainCheck):
            verdict = await self.domain(item)
            return verdict.outcomes, [verdict]
        return [await self.session(item)], []


def _marked(outcome: Outcome, domain: str) -> Outcome:
    return outcome.model_copy(update={"domain": domain})


@dataclass(frozen=True)
class _Discovered:
    """Passes on a discovered server's outcomes, marked with the domain it was found for."""

    domain: str
    observers: Sequence[SessionObserver]

    def attempt_ended(self, outcome: Outcome) -> None:
        report(_marked(outcome, self.domain), final=False, observers=self.observers)

    def request_ended(self, outcome: Outcome) -> None:
        report(_marked(outcome, self.domain), final=True, observers=self.observers)

    def domain_ended(self, outcome: DomainOutcome) -> None:
        report_domain(outcome, observers=self.observers)


async def sweep(
    items: Sequence[SweepItem],
    *,
    concurrency: int,
    environ: Mapping[str, str] | None = None,
    observers: Sequence[SessionObserver] = DEFAULT_OBSERVERS,
    trust_memory: TrustMemory | None = None,
    extra_ca_file: str | None = None,
    guards: Guards = UNGUARDED,
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    on_outcome: Callable[[Outcome], None] | None = None,
    resolver: dns.asyncresolver.Resolver | None = None,
) -> SweepSummary:
    """Check every item with at most `concurrency` sessions open at once.

    Outcomes come back in the order of `items` (a domain's hosts in discovery order);
    `on_outcome` is called as each one finishes, for a progress display. One dead server
    costs its own deadline and holds one slot, never the others'.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    runner = _Sweep(
        concurrency,
        environ,
        observers,
        trust_memory,
        extra_ca_file,
        guards,
        retry_policy,
        on_outcome,
        resolver,
    )
    parts = await asyncio.gather(*(runner.item(item) for item in items))
    outcomes = [outcome for part, _ in parts for outcome in part]
    ok = sum(outcome.ok for outcome in outcomes)
    return SweepSummary(
        total=len(outcomes),
        ok=ok,
        failed=len(outcomes) - ok,
        duration_s=round(loop.time() - started, 3),
        outcomes=outcomes,
        domains=[domain for _, part in parts for domain in part],
    )

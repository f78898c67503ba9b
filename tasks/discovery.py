"""Find the submission servers of a mail domain: RFC 6186 SRV first, then MX (dnspython)."""

from __future__ import annotations

from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from smtp_session.tasks.errors import ErrorCategory, SessionFailure

SUBMISSION_SRV = "_submission._tcp"
MX_PORT = 25
MAX_DISCOVERED = 10


@dataclass(frozen=True)
class DiscoveredHost:
    host: str
    port: int
    source: str  # "srv" or "mx"


def _name(record_target: dns.name.Name) -> str:
    return record_target.to_text(omit_final_dot=True)


async def _query(
    resolver: dns.asyncresolver.Resolver, name: str, kind: str
) -> dns.resolver.Answer | None:
    try:
        return await resolver.resolve(name, kind)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None


async def discover(
    domain: str,
    *,
    resolver: dns.asyncresolver.Resolver | None = None,
    lifetime: float | None = None,
) -> list[DiscoveredHost]:
    """The domain's submission hosts, best first; raises SessionFailure(DNS) if none.

    SRV records are ordered by priority, then weight (heaviest first); a lone "." target
    means "no service here" (RFC 2782) and falls through to MX like no record at all.
    `lifetime` bounds each query of the system's resolver (the target's timeout).
    """
    try:
        if resolver is None:
            resolver = dns.asyncresolver.Resolver()
            if lifetime is not None:
                resolver.lifetime = lifetime
        srv = await _query(resolver, f"{SUBMISSION_SRV}.{domain}", "SRV")
        if srv is not None:
            records = sorted(srv, key=lambda r: (r.priority, -r.weight))
            hosts = [
                DiscoveredHost(_name(r.target), r.port, "srv")
                for r in records
                if _name(r.target) not in ("", ".") and r.port > 0
            ]
            if hosts:
                return hosts[:MAX_DISCOVERED]
        mx = await _query(resolver, domain, "MX")
        if mx is not None:
            records = sorted(mx, key=lambda r: r.preference)
            hosts = [
                DiscoveredHost(_name(r.exchange), MX_PORT, "mx")
                for r in records
                if _name(r.exchange) not in ("", ".")
            ]
            if hosts:
                return hosts[:MAX_DISCOVERED]
    except dns.exception.DNSException as exc:
        raise SessionFailure(
            ErrorCategory.DNS, f"could not discover the servers of {domain}: {exc}"
        ) from None
    raise SessionFailure(
        ErrorCategory.DNS, f"{domain} has no {SUBMISSION_SRV} SRV record and no MX record"
    )

"""Find the servers of a mail domain by the RFCs (dnspython's async resolver).

The order of questions, each asked only when the ones before found no host:

1. ``_submissions._tcp`` SRV: submission with implicit TLS (RFC 8314 §5.1, preferred);
2. ``_submission._tcp`` SRV: submission with STARTTLS (RFC 6186);
3. MX (RFC 5321 §5.1), port 25; a null MX (``0 .``, RFC 7505) says the domain accepts
   no mail, and ends discovery with that;
4. no MX at all: the domain's own address records (A, AAAA), as its implicit MX.

SRV records are ordered per RFC 2782: by priority, then by a weighted random choice
within each priority. A target of "." means the service is decidedly not available
(RFC 2782, RFC 6186 §3.4): a ``_submissions`` "." still lets ``_submission`` answer, but
when no submission SRV names a host and one of them says ".", the domain has said it
offers no submission service, and discovery fails saying so (MX, port 25, is the relay
service, not what was asked for: it is not checked in its place).
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.IN.SRV import SRV

from smtp_session.tasks.errors import ErrorCategory, SessionFailure

SUBMISSIONS_SRV = "_submissions._tcp"
SUBMISSION_SRV = "_submission._tcp"
MX_PORT = 25
MAX_DISCOVERED = 10
#: Rounds of queries discovery may wait for, each bounded by `lifetime`: the two SRV
#: names, MX, then the address records (A and AAAA at once).
QUERY_ROUNDS = 4

#: How a discovered host is to be secured: implicit TLS, STARTTLS, or None when the
#: record does not say (MX: the request's own `security`, `auto` by default).
DiscoveredSecurity = Literal["tls", "starttls"]
Source = Literal["srv", "mx", "implicit-mx"]

#: The submission services asked for, preferred first, with the security each implies.
SERVICES: tuple[tuple[str, DiscoveredSecurity], ...] = (
    (SUBMISSIONS_SRV, "tls"),
    (SUBMISSION_SRV, "starttls"),
)


class RandomSource(Protocol):
    """What the weighted SRV choice needs of a random source (`random.Random` has it)."""

    def randint(self, a: int, b: int) -> int: ...


@dataclass(frozen=True)
class DiscoveredHost:
    host: str
    port: int
    source: Source
    #: "tls" for `_submissions`, "starttls" for `_submission`, None for MX.
    security: DiscoveredSecurity | None = None


def _name(record_target: dns.name.Name) -> str:
    return record_target.to_text(omit_final_dot=True)


def _is_root(record_target: dns.name.Name) -> bool:
    return _name(record_target) in ("", ".")


async def _query(
    resolver: dns.asyncresolver.Resolver, name: str, kind: str
) -> dns.resolver.Answer | None:
    try:
        return await resolver.resolve(name, kind)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None


def weighted_order(records: Sequence[SRV], rng: RandomSource) -> list[SRV]:
    """`records` in RFC 2782 order: by priority; within one, a weighted random choice.

    Within a priority, the records not yet chosen are listed lightest first, a number is
    drawn from 0 to the sum of their weights, and the first whose running sum reaches it
    is next; a weight-0 record can come first only when the draw is 0.
    """
    ordered: list[SRV] = []
    for priority in sorted({record.priority for record in records}):
        # "Any order, weight 0 first": by weight, then name, so that a draw picks the
        # same record whatever order the answer came in.
        left = sorted(
            (record for record in records if record.priority == priority),
            key=lambda record: (record.weight, _name(record.target), record.port),
        )
        while left:
            draw = rng.randint(0, sum(record.weight for record in left))
            running = 0
            for index, record in enumerate(left):
                running += record.weight
                if running >= draw:
                    ordered.append(left.pop(index))
                    break
            else:  # a draw past the sum (a source that ignores its bounds): the last
                ordered.append(left.pop())
    return ordered


async def _srv_hosts(
    resolver: dns.asyncresolver.Resolver,
    name: str,
    security: DiscoveredSecurity,
    rng: RandomSource,
) -> tuple[list[DiscoveredHost], bool]:
    """The hosts an SRV name offers, and whether it says "." (service not available)."""
    answer = await _query(resolver, name, "SRV")
    if answer is None:
        return [], False
    records: list[SRV] = list(answer)
    usable = [r for r in records if not _is_root(r.target) and r.port > 0]
    hosts = [
        DiscoveredHost(_name(r.target), r.port, "srv", security)
        for r in weighted_order(usable, rng)
    ]
    return hosts, any(_is_root(r.target) for r in records)


async def _mx_hosts(resolver: dns.asyncresolver.Resolver, domain: str) -> list[DiscoveredHost]:
    """The MX hosts by preference; the domain itself when it has no MX but an address."""
    mx = await _query(resolver, domain, "MX")
    if mx is None:
        addresses = await asyncio.gather(
            _query(resolver, domain, "A"), _query(resolver, domain, "AAAA")
        )
        if any(answer is not None for answer in addresses):
            return [DiscoveredHost(domain, MX_PORT, "implicit-mx")]
        return []
    records = sorted(mx, key=lambda r: r.preference)
    hosts = [
        DiscoveredHost(_name(r.exchange), MX_PORT, "mx")
        for r in records
        if not _is_root(r.exchange)
    ]
    if not hosts:
        raise SessionFailure(ErrorCategory.DNS, f"{domain} accepts no mail (null MX, RFC 7505)")
    return hosts


async def _discover(
    domain: str, resolver: dns.asyncresolver.Resolver, rng: RandomSource
) -> list[DiscoveredHost]:
    declined: list[str] = []
    for service, security in SERVICES:
        name = f"{service}.{domain}"
        hosts, dot = await _srv_hosts(resolver, name, security, rng)
        if hosts:
            return hosts
        if dot:
            declined.append(name)
    if declined:
        raise SessionFailure(
            ErrorCategory.DNS,
            f"{domain} publishes no submission service "
            f'({" and ".join(declined)} SRV target ".": not available, RFC 6186)',
        )
    hosts = await _mx_hosts(resolver, domain)
    if hosts:
        return hosts
    services = " or ".join(service for service, _ in SERVICES)
    raise SessionFailure(
        ErrorCategory.DNS,
        f"{domain} has no {services} SRV record, no MX record and no address record",
    )


def parse_nameservers(text: str) -> list[tuple[str, int]]:
    """`IP[:PORT]` entries, comma-separated (`[v6]:PORT` for IPv6 with a port); raises
    ValueError naming the entry."""
    servers: list[tuple[str, int]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        host, port = entry, "53"
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest.removeprefix(":") or port
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address (with an optional :port)") from None
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{entry!r}: the port must be 1-65535")
        servers.append((address, int(port)))
    return servers


def resolver_for(nameservers: list[tuple[str, int]]) -> dns.asyncresolver.Resolver | None:
    """A resolver asking these servers only (None for none: the system's resolver)."""
    if not nameservers:
        return None
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [
        dns.nameserver.Do53Nameserver(address, port) for address, port in nameservers
    ]
    return resolver


async def discover(
    domain: str,
    *,
    resolver: dns.asyncresolver.Resolver | None = None,
    lifetime: float | None = None,
    rng: RandomSource | None = None,
) -> list[DiscoveredHost]:
    """The domain's hosts, best first (at most MAX_DISCOVERED); raises SessionFailure(DNS).

    `lifetime` bounds each query of the system's resolver (dnspython's default resolver,
    from /etc/resolv.conf) by the target's timeout; there are at most QUERY_ROUNDS of them
    in a row. `rng` draws the weighted SRV order (a `random.Random` of its own by default).
    """
    try:
        # dnspython's process-wide resolver (/etc/resolv.conf, read once) unless one is
        # given; this check's deadline, when shorter, on a copy of it.
        resolver = copy.copy(resolver or dns.asyncresolver.get_default_resolver())
        if lifetime is not None:
            resolver.lifetime = min(resolver.lifetime, lifetime)
        hosts = await _discover(domain, resolver, rng if rng is not None else random.Random())
    except dns.exception.DNSException as exc:
        raise SessionFailure(
            ErrorCategory.DNS, f"could not discover the servers of {domain}: {exc}"
        ) from None
    return hosts[:MAX_DISCOVERED]

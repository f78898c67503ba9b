"""Where a request from the queue may connect: public unicast addresses on SMTP ports.

What arrives through the queue was typed by a tenant of a web backend. Unchecked, it
would make the worker a port scanner of the backend's own network (10.0.0.5:6379, the
cloud metadata service at 169.254.169.254, 127.0.0.1…), reading the answer's shape back
in `err_message`. So a queue request may reach public unicast addresses on the SMTP
ports only, unless the operator allowed more (SMTP_SESSION_ALLOW_NETWORKS, _ALLOW_PORTS).
The addresses checked are the resolved ones, and they are the only ones connected to:
no second lookup, so DNS rebinding gets nothing through. Configured targets and the
command line (an operator) are not restricted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from smtp_session.tasks.errors import ErrorCategory, SessionFailure

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = frozenset({25, 465, 587, 2525})
DEFAULT_MAX_PER_DESTINATION = 20
ALLOW_NETWORKS_SETTING = "SMTP_SESSION_ALLOW_NETWORKS"
ALLOW_PORTS_SETTING = "SMTP_SESSION_ALLOW_PORTS"

#: Address ranges that are not the public internet, with what each is; first match wins.
#: IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, NAT64) are judged by
#: the IPv4 address inside them (see _embedded_ipv4).
REFUSED_RANGES: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address (RFC 1918)"),
    ("100.64.0.0/10", "a shared address of carrier-grade NAT (RFC 6598)"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address (where cloud metadata services answer)"),
    ("172.16.0.0/12", "a private address (RFC 1918)"),
    ("192.0.0.0/24", "an IETF protocol assignment"),
    ("192.0.2.0/24", "a documentation address (RFC 5737)"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address (RFC 1918)"),
    ("198.18.0.0/15", "a benchmarking address (RFC 2544)"),
    ("198.51.100.0/24", "a documentation address (RFC 5737)"),
    ("203.0.113.0/24", "a documentation address (RFC 5737)"),
    ("224.0.0.0/4", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/32", "a Teredo tunnel address"),
    ("2001::/23", "an IETF protocol assignment"),
    ("2001:db8::/32", "a documentation address (RFC 3849)"),
    ("fc00::/7", "a unique local address (ULA)"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
)
_REFUSED = tuple((ipaddress.ip_network(cidr), reason) for cidr, reason in REFUSED_RANGES)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
NOT_PUBLIC = "not a public unicast address"


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, compatible), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def why_not_public(address: Address) -> str | None:
    """What makes `address` other than public unicast (None: it is public)."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        reason = why_not_public(inner)
        return None if reason is None else f"{reason}, in an IPv6 form ({inner})"
    for network, reason in _REFUSED:
        if address.version == network.version and address in network:
            return reason
    return None if address.is_global else NOT_PUBLIC


def parse_networks(text: str) -> tuple[Network, ...]:
    """`10.20.0.0/16,127.0.0.0/8` → networks; raises ValueError naming the bad item."""
    networks: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not a network in CIDR form ({exc})") from None
    return tuple(networks)


def parse_ports(text: str) -> frozenset[int]:
    """`25,587,1024-65535` → the set of ports; raises ValueError naming the bad item."""
    ports: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        low, dash, high = item.partition("-")
        bounds = (low, high) if dash else (low, low)
        if not all(bound.isascii() and bound.isdigit() for bound in bounds):
            raise ValueError(f"{item!r} is not a port or a range of ports (like 1024-65535)")
        first, last = int(bounds[0]), int(bounds[1])
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"{item!r} is not within 1-65535, low to high")
        ports.update(range(first, last + 1))
    if not ports:
        raise ValueError("names no port")
    return frozenset(ports)


def _describe_ports(ports: frozenset[int]) -> str:
    ordered = sorted(ports)
    return ", ".join(str(port) for port in ordered[:8]) + (" …" if len(ordered) > 8 else "")


@dataclass(frozen=True)
class EgressPolicy:
    """What a queue request may reach: public addresses, `allowed_networks`, `ports`."""

    allowed_networks: tuple[Network, ...] = ()
    ports: frozenset[int] = DEFAULT_PORTS

    def check_port(self, port: int) -> None:
        """Raise SessionFailure(BLOCKED) unless `port` is allowed."""
        if port not in self.ports:
            raise SessionFailure(
                ErrorCategory.BLOCKED,
                f"port {port} is not allowed: requests from the queue may use ports "
                f"{_describe_ports(self.ports)} only; see {ALLOW_PORTS_SETTING}",
            )

    def refusal(self, address: Address) -> str | None:
        """Why `address` may not be reached (None: it may)."""
        inner = _embedded_ipv4(address)
        if any(
            candidate.version == network.version and candidate in network
            for candidate in (address, inner)
            if candidate is not None
            for network in self.allowed_networks
        ):
            return None
        return why_not_public(address)

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Raise SessionFailure(BLOCKED) if any address `host` resolved to is refused."""
        for text in addresses:
            reason = self.refusal(ipaddress.ip_address(text.partition("%")[0]))
            if reason is None:
                continue
            subject = text if host == text else f"{host} resolves to {text}, which"
            raise SessionFailure(
                ErrorCategory.BLOCKED,
                f"{subject} is {reason}: requests from the queue may reach public "
                f"addresses only; see {ALLOW_NETWORKS_SETTING}",
            )


@dataclass
class DestinationLimit:
    """At most `per_destination` sessions at once to one address, in this process.

    A burst of requests cannot turn the worker against one server, and a sweep of many
    tenants on one provider stays under its "too many connections". The others wait
    their turn, inside their own deadline.
    """

    per_destination: int = DEFAULT_MAX_PER_DESTINATION
    _slots: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    _users: dict[str, int] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def slot(self, address: str) -> AsyncIterator[None]:
        """Hold one of `address`'s slots for the body (waiting for one if none is free)."""
        semaphore = self._slots.setdefault(address, asyncio.Semaphore(self.per_destination))
        self._users[address] = self._users.get(address, 0) + 1
        try:
            async with semaphore:
                yield
        finally:
            self._users[address] -= 1
            if not self._users[address]:  # nobody holds or awaits it: forget the address
                del self._users[address], self._slots[address]

"""A tiny DNS server on loopback for discovery tests, and a resolver that asks only it.

The server listens on 127.0.0.1 UDP port 0 and answers from a table of records; the
resolver is built without reading /etc/resolv.conf, so no test ever asks public DNS.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import dns.asyncresolver
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tests.servers import LOOPBACK

#: Resolver deadline for the whole lookup; loopback answers in microseconds.
LIFETIME = 2.0
TTL = 300

#: ``(name, type) -> rdata in zone-file text``.
Records = Mapping[tuple[str, str], Sequence[str]]


class DnsServer(asyncio.DatagramProtocol):
    """A tiny authoritative-looking DNS server over UDP that answers from ``records``.

    A name it has no record of at all gets NXDOMAIN; a known name asked for another type
    gets an empty NOERROR answer. Names in ``servfail`` get SERVFAIL, and names in
    ``silent`` get nothing at all (the resolver times out).
    """

    def __init__(
        self,
        records: Records,
        *,
        servfail: Collection[str] = (),
        silent: Collection[str] = (),
    ) -> None:
        self.records = {
            (dns.name.from_text(name), dns.rdatatype.from_text(kind)): list(rdata)
            for (name, kind), rdata in records.items()
        }
        self.names = {name for name, _ in self.records}
        self.servfail = {dns.name.from_text(name) for name in servfail}
        self.silent = {dns.name.from_text(name) for name in silent}
        #: Every question received, as ``(name without final dot, type)``.
        self.queries: list[tuple[str, str]] = []
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(LOOPBACK, 0))
        self._transport = transport
        self.port = int(self._transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def resolver(self, lifetime: float = LIFETIME) -> dns.asyncresolver.Resolver:
        """A resolver that asks this server and nothing else."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(LOOPBACK, self.port)]
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name, kind = question.name, question.rdtype
        self.queries.append((name.to_text(omit_final_dot=True), dns.rdatatype.to_text(kind)))
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif (name, kind) in self.records:
            response.answer.append(
                dns.rrset.from_text_list(
                    name, TTL, dns.rdataclass.IN, kind, self.records[name, kind]
                )
            )
        elif name not in self.names:
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self._transport is not None
        self._transport.sendto(response.to_wire(), addr)


async def serve(
    servers: list[DnsServer],
    records: Records,
    *,
    servfail: Collection[str] = (),
    silent: Collection[str] = (),
) -> DnsServer:
    server = DnsServer(records, servfail=servfail, silent=silent)
    await server.start()
    servers.append(server)
    return server

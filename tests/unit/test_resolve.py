"""connect_first: happy eyeballs over the addresses already resolved, on loopback.

Every address here refuses at once (a port bound but not listening), so the attempts
run back to back and the tests take milliseconds; tests/integration/test_happy_eyeballs.py
has the addresses that hang or answer late.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import socket
import threading
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from smtp_session.tasks.discovery import parse_nameservers
from smtp_session.tasks.resolve import (
    LOOKUP_THREADS,
    AddressInfo,
    address_literal,
    connect_first,
    in_lookup_thread,
    is_public_fqdn,
    literal_address,
)
from smtp_session.worker.settings import Settings

pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")
BUDGET = 5.0  # never reached here: refusals are immediate


@contextlib.contextmanager
def refusing(*hosts: str) -> Iterator[list[AddressInfo]]:
    """The address of a port bound (port 0) but not listening on each host: it refuses."""
    with contextlib.ExitStack() as stack:
        addresses: list[AddressInfo] = []
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            found = literal_address(host, sock.getsockname()[1])
            assert found is not None
            addresses += found
        yield addresses


#: Bound on each wait of the lookup-thread test (it takes milliseconds).
WAIT = 5.0


def deadline(seconds: float = BUDGET) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_all_refused_raises_refused_and_names_the_last_address() -> None:
    tried: list[str] = []
    with (
        refusing("127.0.0.2", "127.0.0.3", "127.0.0.4") as addresses,
        pytest.raises(ConnectionRefusedError) as raised,
    ):
        await connect_first(addresses, deadline(), tried)
    assert raised.value.errno == errno.ECONNREFUSED
    assert tried == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # tried[-1]: the last one


async def test_ipv6_and_ipv4_are_interleaved() -> None:
    """Resolver order v6, v6, v4, v4 is tried v6, v4, v6, v4 (RFC 8305 §4)."""
    tried: list[str] = []
    with (
        refusing("::1", "::1", "127.0.0.1", "127.0.0.2") as addresses,
        pytest.raises(ConnectionRefusedError),
    ):
        await connect_first(addresses, deadline(), tried)
    assert tried == ["::1", "127.0.0.1", "::1", "127.0.0.2"]


async def test_connects_past_a_refusal_without_a_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal starts the next attempt at once; only the given addresses are used."""

    def no_lookup(*args: object) -> None:
        raise AssertionError(f"connect_first looked a name up again: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    server = await asyncio.start_server(lambda _r, w: w.close(), "::1", 0)
    tried: list[str] = []
    try:
        with refusing("127.0.0.2") as refused:
            healthy = literal_address("::1", server.sockets[0].getsockname()[1])
            assert healthy is not None
            started = asyncio.get_running_loop().time()
            sock = await connect_first(refused + healthy, deadline(), tried)
            elapsed = asyncio.get_running_loop().time() - started
        with sock:
            assert sock.getpeername()[0] == "::1"
    finally:
        server.close()
        await server.wait_closed()
    assert tried == ["127.0.0.2", "::1"]
    assert elapsed < 0.2  # not the 0.25 s attempt delay: the refusal moved on at once


async def test_no_address_is_an_os_error() -> None:
    with pytest.raises(OSError, match="no address to connect to"):
        await connect_first([], deadline(), [])


@pytest.mark.parametrize(
    ("name", "public"),
    [
        ("mx1.mail.example.org", True),
        ("host.example.com.", True),
        ("localhost", False),
        ("vm", False),  # no dot: not qualified
        ("vm.localdomain", False),
        ("printer.local", False),
        ("ip-10-0-0-5.ec2.internal", False),
        ("nas.home.arpa", False),
        ("db.LOCALHOST", False),
        ("mail.test", False),
        ("192.0.2.10", False),
        ("2001:db8::1", False),
    ],
)
def test_is_public_fqdn(name: str, public: bool) -> None:
    assert is_public_fqdn(name) is public


@pytest.mark.parametrize(
    ("address", "literal"),
    [
        ("192.0.2.10", "[192.0.2.10]"),
        ("2001:db8::1", "[IPv6:2001:db8::1]"),
        ("2001:0db8:0000::0001", "[IPv6:2001:db8::1]"),
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
        ("::ffff:192.0.2.10", "[192.0.2.10]"),
    ],
)
def test_address_literal(address: str, literal: str) -> None:
    assert address_literal(address) == literal


@pytest.mark.parametrize(
    ("text", "servers"),
    [
        ("", []),
        ("192.0.2.53", [("192.0.2.53", 53)]),
        (
            "127.0.0.1:5353, [::1]:53,2001:db8::53",
            [("127.0.0.1", 5353), ("::1", 53), ("2001:db8::53", 53)],
        ),
    ],
)
def test_dns_servers_are_addresses_with_optional_ports(
    text: str, servers: list[tuple[str, int]]
) -> None:
    assert parse_nameservers(text) == servers


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("dns.example", "'dns.example' is not an IP address"),
        ("127.0.0.1:0", "'127.0.0.1:0': the port must be 1-65535"),
        ("[::1]:x", "'[::1]:x': the port must be 1-65535"),
    ],
)
def test_a_bad_dns_server_is_named(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_nameservers(text)
    with pytest.raises(ValidationError, match="dns_servers"):
        Settings(dns_servers=text)


async def test_lookups_share_a_bounded_number_of_threads() -> None:
    gate, entered = threading.Event(), threading.Semaphore(0)
    calls: list[int] = []

    def slow_lookup(number: int) -> int:
        entered.release()
        gate.wait(WAIT)
        calls.append(number)
        return number

    # More lookups than threads, all stuck on a slow resolver: they wait their turn.
    lookups = [asyncio.ensure_future(in_lookup_thread(slow_lookup, n)) for n in range(100)]
    for _ in range(LOOKUP_THREADS):  # every thread holds one
        assert await asyncio.to_thread(entered.acquire, True, WAIT)
    threads = [t for t in threading.enumerate() if t.name == "smtp-session-lookup"]
    assert len(threads) == LOOKUP_THREADS
    assert all(thread.daemon for thread in threads)  # never held at exit
    # A deadline abandons a lookup; one abandoned while it waited its turn is never run.
    abandoned = lookups[-1]
    abandoned.cancel()
    gate.set()
    assert await asyncio.gather(*lookups[:-1]) == list(range(99))
    # One lookup per thread that waits for all the others: every thread is past the
    # abandoned one when they meet.
    meeting = threading.Barrier(LOOKUP_THREADS, timeout=WAIT)
    await asyncio.gather(*(in_lookup_thread(meeting.wait) for _ in range(LOOKUP_THREADS)))
    assert 99 not in calls and len(calls) == 99

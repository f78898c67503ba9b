"""Happy eyeballs against addresses that hang or answer late, on loopback.

A *blackhole* is a listener (port 0, backlog 0) whose accept queue one connection of the
test already fills: Linux drops every further SYN, so a connect to it hangs, as to a
host whose packets go nowhere. A *late* address is a blackhole that makes room again
just after the first SYN was dropped: the client's SYN is retransmitted after Linux's
initial retransmission timeout of 1 s, and then connects: a healthy address 1 s away.

Why the old connect loop fails here: it gave each address an equal share of the time
left (`(deadline - now) / addresses left`) and then dropped it. Twelve late addresses
with a 2 s budget got 2/12 s ≈ 0.17 s each, far less than the 1 s each needs, so none
connected ("timeout at connect") although every one would have: the issue's twelve
addresses 150 ms away with a 1 s budget (1/12 s each), scaled to what loopback can do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from smtp_session.tasks import session as session_module
from smtp_session.tasks.resolve import AddressInfo, connect_first, literal_address
from tests.servers import LOOPBACK, SmtpServerFactory
from tests.unit.test_resolve import refusing

#: 127.0.0.2 … 127.0.0.13: Linux routes all of 127/8 to the loopback interface.
TWELVE = [f"127.0.0.{last}" for last in range(2, 14)]
#: Linux's initial SYN retransmission timeout: how far away a late address is.
LATE = 1.0


class Blackhole:
    """A listener whose full accept queue drops every SYN (see the module docstring)."""

    def __init__(self, host: str, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, port))
        self.listener.listen(0)  # a queue of one connection on Linux
        self.filler = socket.create_connection(self.listener.getsockname()[:2], timeout=5)
        found = literal_address(host, self.listener.getsockname()[1])
        assert found is not None
        self.address: AddressInfo = found[0]

    def make_room(self) -> None:
        """Take the filler off the queue: the next SYN (a retransmission) is answered."""
        accepted, _ = self.listener.accept()
        accepted.close()

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


@contextlib.contextmanager
def blackholes(*hosts: str) -> Iterator[list[Blackhole]]:
    holes: list[Blackhole] = []
    try:
        holes.extend(Blackhole(host) for host in hosts)
        yield holes
    finally:
        for hole in holes:
            hole.close()


def sockets_to(holes: list[Blackhole]) -> int:
    """This process's TCP sockets whose peer is one of the holes' listeners.

    Only these: other threads of the test process open and close descriptors of their own
    meanwhile. A socket's inode, from /proc/self/fd, is looked up in the kernel's tables.
    """
    ports = {hole.listener.getsockname()[1] for hole in holes}
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table, encoding="ascii") as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                count += remote_port in ports and fields[9] in inodes
    return count


async def make_room_once_tried(holes: list[Blackhole], tried: list[str]) -> None:
    """Each blackhole makes room 0.1 s after its first attempt began: it answers late."""
    waiting = {str(hole.address[4][0]): hole for hole in holes}
    while waiting:
        for address in [address for address in tried if address in waiting]:
            await asyncio.sleep(0.1)  # its SYN has been dropped by now
            waiting.pop(address).make_room()
        await asyncio.sleep(0.01)


async def race(
    holes: list[Blackhole], late: list[Blackhole], budget: float, tried: list[str]
) -> tuple[str | None, float]:
    """connect_first to `holes` (`late` among them answer late) within `budget`.

    The address connected to (None: TimeoutError) and the seconds it took; checks that
    every attempt that lost the race, or ran out of time, was closed.
    """
    loop = asyncio.get_running_loop()
    helper = asyncio.create_task(make_room_once_tried(late, tried))
    before = sockets_to(holes)
    assert before == len(holes)  # each hole's filler: what is counted is what is open
    started = loop.time()
    try:
        sock = await connect_first([hole.address for hole in holes], started + budget, tried)
    except TimeoutError:
        assert sockets_to(holes) == before
        return None, loop.time() - started
    finally:
        helper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await helper
    elapsed = loop.time() - started
    with sock:
        assert sockets_to(holes) == before + 1  # the winner's socket, nothing else
        return str(sock.getpeername()[0]), elapsed


async def test_twelve_late_addresses_connect_within_the_budget() -> None:
    """Every address 1 s away, 2 s budget: the first attempt is kept and connects."""
    tried: list[str] = []
    with blackholes(*TWELVE) as holes:
        peer, elapsed = await race(holes, holes, 2.0, tried)
    assert peer == TWELVE[0]
    assert LATE - 0.1 < elapsed < 2.0
    # Attempts started every 0.25 s meanwhile; the winner, started first, is named last.
    assert tried[-1] == TWELVE[0]
    assert tried[:-1] == TWELVE[1 : len(tried)]
    assert 4 <= len(tried) < len(TWELVE)


async def test_hanging_addresses_then_a_late_one() -> None:
    """Two addresses that never answer, then one 1 s away, 2 s budget: it connects.

    The old loop gave each 2/3 s: the late address, reached last, had 2/3 s left.
    """
    tried: list[str] = []
    with blackholes(*TWELVE[:3]) as holes:
        peer, elapsed = await race(holes, holes[2:], 2.0, tried)
    assert peer == TWELVE[2]
    assert tried == TWELVE[:3]
    assert 2 * 0.25 + LATE - 0.1 < elapsed < 2.0  # started 2 x 0.25 s in, answered 1 s later


async def test_the_connect_deadline_bounds_every_attempt() -> None:
    """Nothing answers: TimeoutError at the deadline, no attempt left open."""
    tried: list[str] = []
    with blackholes(*TWELVE[:3]) as holes:
        peer, elapsed = await race(holes, [], 0.6, tried)
    assert peer is None
    assert 0.55 < elapsed < 0.8
    assert tried == TWELVE[:3]


# ----------------------------------------------------------------- through open_session


async def session_to(
    monkeypatch: pytest.MonkeyPatch, addresses: list[AddressInfo], port: int, **fields: Any
) -> Any:
    """open_session to a name the resolver answers with `addresses`."""

    async def resolve(host: str, resolved_port: int) -> list[AddressInfo]:
        assert (host, resolved_port) == ("mail.example.test", port)
        return addresses

    monkeypatch.setattr(session_module, "resolve", resolve)
    request = {"host": "mail.example.test", "port": port, "security": "plain", **fields}
    return await session_module.open_session(request, environ={})


async def test_session_connects_past_a_blackhole(
    monkeypatch: pytest.MonkeyPatch, smtp_server_factory: SmtpServerFactory
) -> None:
    server = await smtp_server_factory(mode="plain")
    with blackholes("::1") as holes:
        healthy = literal_address(LOOPBACK, server.port)
        assert healthy is not None
        outcome = await session_to(
            monkeypatch, [holes[0].address, *healthy], server.port, connect_timeout=1
        )
    assert outcome.ok, outcome.err_message
    assert outcome.address == LOOPBACK


async def test_session_all_refused_names_the_last_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with refusing("127.0.0.2", "127.0.0.3") as addresses:
        port = addresses[0][4][1]
        addresses[1] = (*addresses[1][:4], ("127.0.0.3", port))  # one port, as resolved
        with socket.socket() as same_port:
            same_port.bind(("127.0.0.3", port))  # bound, not listening: refuses
            outcome = await session_to(monkeypatch, addresses, port, retries=0)
    assert (outcome.error, outcome.stage) == ("refused", "connect")
    assert outcome.err_message == f"connection refused by 127.0.0.3 port {port}"
    assert outcome.address == "127.0.0.3"

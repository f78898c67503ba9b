"""sweep(): many loopback servers at once, bounded concurrency, outcomes in input order.

The servers here are deliberately tiny (a banner after an injected delay, then 250 to
EHLO and 221 to QUIT): hundreds of aiosmtpd instances would measure aiosmtpd, and the
point is how the sweep schedules sessions. Every server of a fleet shares one counter
of open connections, so the fleet sees how many sessions the sweep runs at once.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

from smtp_session.tasks.errors import ErrorCategory
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.request import SessionRequest
from smtp_session.tasks.session import RetryPolicy
from smtp_session.tasks.sweep import sweep
from tests.servers import LOOPBACK, RawServerFactory

#: Fleet size of the big sweep: 185 slow but healthy, 10 refused, 5 silent.
HEALTHY, REFUSED, SILENT = 185, 10, 5
#: Banner delays of the healthy servers are spread evenly over [0, MAX_DELAY].
MAX_DELAY = 0.3
#: Deadline of each session in the big sweep: what a silent server costs.
DEAD_TIMEOUT = 1.0
FAST_RETRY = RetryPolicy(base=0.01, cap=0.02)


def request(port: int, *, timeout: float = DEAD_TIMEOUT, **fields: Any) -> SessionRequest:
    defaults: dict[str, Any] = {"security": "plain", "ehlo_name": "sweep.test", "retries": 0}
    return SessionRequest.model_validate(
        {**defaults, "host": LOOPBACK, "port": port, "timeout": timeout, **fields}
    )


class Fleet:
    """Minimal SMTP servers on loopback, one per delay, counting open connections together."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.accepted = 0
        self.completed = 0  # sessions that reached QUIT
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, delays: Sequence[float]) -> list[int]:
        """One server per delay; returns their ports in the same order."""
        return list(await asyncio.gather(*(self._start_one(delay) for delay in delays)))

    async def _start_one(self, delay: float) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(delay, reader, writer)

        server = await asyncio.start_server(serve, LOOPBACK, 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _serve(
        self, delay: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        self.accepted += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        open_here = True
        try:
            await asyncio.sleep(delay)  # the injected fault: a slow greeting
            writer.write(b"220 ok\r\n")
            await writer.drain()
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250 ok\r\n")
                elif verb == b"QUIT":
                    # Counted closed before the reply goes out, so the client cannot free
                    # its slot and connect again while this one still counts as open.
                    self.active -= 1
                    open_here = False
                    self.completed += 1
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"502 not here\r\n")
                await writer.drain()
        except OSError:
            pass  # the client left mid-session; what it saw is the test's business
        finally:
            if open_here:
                self.active -= 1
            self._writers.discard(writer)
            writer.close()

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for server in self._servers:
            await server.wait_closed()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = Fleet()
    yield fleet
    await fleet.aclose()


@pytest.fixture
def refused_ports() -> Iterator[list[int]]:
    """Loopback ports that refuse connections: bound, never listening, held for the test."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(REFUSED)]
    try:
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        yield [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# ----------------------------------------------------------------------------- 200 servers


async def test_sweep_of_200_servers_takes_the_slowest_not_the_sum(
    fleet: Fleet, refused_ports: list[int], raw_server_factory: RawServerFactory
) -> None:
    delays = [MAX_DELAY * index / (HEALTHY - 1) for index in range(HEALTHY)]
    healthy = await fleet.start(delays)
    silent = [(await raw_server_factory("silent")).port for _ in range(SILENT)]
    # Interleave: dead servers scattered through the input, not bunched at the end.
    ports = list(healthy)
    for offset, port in enumerate(refused_ports + silent):
        ports.insert(offset * 13 + 5, port)
    kinds = dict.fromkeys(healthy, "ok")
    kinds |= dict.fromkeys(refused_ports, "refused")
    kinds |= dict.fromkeys(silent, "timeout")
    delay_of = dict(zip(healthy, delays, strict=True))

    calls: list[Outcome] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    summary = await sweep(
        [request(port) for port in ports],
        concurrency=100,
        retry_policy=FAST_RETRY,
        on_outcome=calls.append,
    )
    wall = loop.time() - started

    # Every outcome, in input order.
    assert [outcome.port for outcome in summary.outcomes] == ports
    assert (summary.total, summary.ok, summary.failed) == (200, HEALTHY, REFUSED + SILENT)
    for outcome in summary.outcomes:
        assert outcome.port is not None
        kind = kinds[outcome.port]
        if kind == "ok":
            assert outcome.ok, (outcome.port, outcome.err_message)
        else:
            assert outcome.error == ErrorCategory(kind), (outcome.port, outcome.err_message)
    assert fleet.completed == HEALTHY

    # Time: close to the slowest (a silent server's whole deadline), far below the sum.
    serial = sum(delays) + SILENT * DEAD_TIMEOUT
    assert serial > 30
    assert DEAD_TIMEOUT <= wall < 3.0, wall
    assert summary.duration_s == pytest.approx(wall, abs=0.1)

    # A dead server costs its own deadline and nobody else's: each healthy session took
    # its own delay and less than the deadline the silent ones used up.
    for outcome in summary.outcomes:
        if outcome.ok:
            assert outcome.port is not None
            assert outcome.timings.total is not None
            assert delay_of[outcome.port] <= outcome.timings.total < DEAD_TIMEOUT, outcome

    # on_outcome: once per outcome, as each finishes (the silent ones last).
    assert sorted(map(id, calls)) == sorted(map(id, summary.outcomes))
    assert {outcome.port for outcome in calls[-SILENT:]} == set(silent)


# ----------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("concurrency", [1, 5])
async def test_concurrency_bound_holds(fleet: Fleet, concurrency: int) -> None:
    delay = 0.05
    ports = await fleet.start([delay] * 20)
    loop = asyncio.get_running_loop()
    started = loop.time()
    summary = await sweep([request(port) for port in ports], concurrency=concurrency)
    wall = loop.time() - started
    assert summary.ok == 20
    assert fleet.accepted == 20
    # The bound is reached and never passed.
    assert fleet.peak == concurrency
    # 20 sessions, `concurrency` at a time: at least that many rounds of the delay.
    assert wall >= (20 // concurrency) * delay * 0.9


async def test_concurrency_above_the_item_count_runs_all_at_once(fleet: Fleet) -> None:
    ports = await fleet.start([0.2] * 10)
    summary = await sweep([request(port) for port in ports], concurrency=200)
    assert summary.ok == 10
    assert fleet.peak == 10


@pytest.mark.parametrize("concurrency", [0, -1])
async def test_concurrency_below_one_is_refused(concurrency: int) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        await sweep([request(25)], concurrency=concurrency)


async def test_empty_sweep(fleet: Fleet) -> None:
    calls: list[Outcome] = []
    summary = await sweep([], concurrency=10, on_outcome=calls.append)
    assert (summary.total, summary.ok, summary.failed, summary.outcomes) == (0, 0, 0, [])
    assert calls == []


# ----------------------------------------------------------------------------- summary


async def test_summary_to_dict_is_the_task_result(fleet: Fleet, refused_ports: list[int]) -> None:
    (port,) = await fleet.start([0.0])
    summary = await sweep(
        [request(port, target="up"), request(refused_ports[0], target="down")],
        concurrency=2,
        retry_policy=FAST_RETRY,
    )
    data = summary.to_dict()
    assert set(data) == {"total", "ok", "failed", "duration_s", "outcomes", "domains"}
    assert data["domains"] == []
    assert (data["total"], data["ok"], data["failed"]) == (2, 1, 1)
    assert isinstance(data["duration_s"], float)
    up, down = data["outcomes"]
    assert (up["schema"], up["ok"], up["target"], up["err_message"]) == (1, True, "up", "")
    assert (down["ok"], down["error"], down["target"]) == (False, "refused", "down")
    assert down["err_message"]


async def test_retries_of_one_server_hold_only_its_own_slot(
    fleet: Fleet, refused_ports: list[int]
) -> None:
    # A refused server retried with backoff keeps one slot; with two slots, the other
    # ten healthy servers go through the second slot meanwhile.
    ports = await fleet.start([0.0] * 10)
    slow_retry = RetryPolicy(base=0.4, cap=0.4)  # 0.2-0.4 s per backoff, two backoffs
    calls: list[Outcome] = []
    summary = await sweep(
        [request(refused_ports[0], retries=2), *(request(port) for port in ports)],
        concurrency=2,
        retry_policy=slow_retry,
        on_outcome=calls.append,
    )
    refused = summary.outcomes[0]
    assert (refused.error, refused.attempts) == (ErrorCategory.REFUSED, 3)
    assert summary.ok == 10
    assert calls[-1] is refused
    assert fleet.completed == 10

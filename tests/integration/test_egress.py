"""The egress policy through a real worker: a tenant's request reaches nothing it may not.

A listener on loopback counts every connection it is offered: for a blocked request it
must count none. The operator's allowance (SMTP_SESSION_ALLOW_NETWORKS, _ALLOW_PORTS)
opens exactly what it names.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import trustme
from celery import Celery

from smtp_session.tasks.outcome import Outcome
from tests.integration.conftest import (
    ENV_PREFIX,
    START_TIMEOUT,
    RedisServer,
    WorkerFactory,
    WorkerProcess,
    wait_until_ready,
    worker_env,
)
from tests.servers import LOOPBACK, RawServerFactory, SmtpServerFactory

OPEN_TASK = "smtp_session.open"
RESULT_TIMEOUT = 30.0
EHLO_NAME = "client.example"
#: Spellings of this machine a tenant might try; each resolves to a loopback address.
LOOPBACK_SPELLINGS = ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433", "127.1")
#: Sessions at once to one address in the bounded test, and how many are sent.
PER_DESTINATION, HELD = 2, 6


async def start(
    start_worker: WorkerFactory, client: Celery, redis: RedisServer, tmp_path: Path, **env: str
) -> WorkerProcess:
    """A worker on `redis` without the tests' loopback allowance, plus `env` settings."""
    settings = {ENV_PREFIX + name.upper(): value for name, value in env.items()}
    full = worker_env(
        tmp_path / "data",
        {ENV_PREFIX + "BROKER_URL": redis.url, **settings},
        allow_loopback=False,
    )
    worker = start_worker(env=full, concurrency=None)
    await asyncio.to_thread(wait_until_ready, client, worker, timeout=START_TIMEOUT)
    return worker


async def outcomes(client: Celery, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = [client.send_task(OPEN_TASK, kwargs=request) for request in requests]

    def collect() -> list[dict[str, Any]]:
        return [result.get(timeout=RESULT_TIMEOUT) for result in results]

    found = await asyncio.to_thread(collect)
    for outcome in found:
        Outcome.from_dict(outcome)
    return found


async def test_a_queue_request_for_this_machine_is_blocked_and_nothing_is_sent(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    raw_server_factory: RawServerFactory,
    tmp_path: Path,
) -> None:
    listener = await raw_server_factory("silent")
    # Every port allowed, so that the address is what the policy has to catch.
    await start(start_worker, celery_client, redis_server, tmp_path, allow_ports="1-65535")
    requests = [
        {"host": host, "port": listener.port, "ehlo_name": EHLO_NAME, "retries": 2}
        for host in LOOPBACK_SPELLINGS
    ]
    requests.append({"host": "169.254.169.254", "port": 80})

    found = await outcomes(celery_client, requests)

    for request, outcome in zip(requests, found, strict=True):
        assert (outcome["ok"], outcome["error"], outcome["retryable"]) == (
            False,
            "blocked",
            False,
        ), outcome
        assert "requests from the queue may reach public addresses only" in outcome["err_message"]
        assert "SMTP_SESSION_ALLOW_NETWORKS" in outcome["err_message"]
        assert outcome["attempts"] == 1, request  # not retried
    assert found[0]["err_message"].startswith("127.0.0.1 is a loopback address")
    assert found[1]["err_message"].startswith("localhost resolves to ")
    assert found[-1]["err_message"].startswith("169.254.169.254 is a link-local address")
    assert listener.connections_accepted == 0


async def test_ports_outside_the_smtp_ones_are_blocked_before_anything(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    raw_server_factory: RawServerFactory,
    tmp_path: Path,
) -> None:
    listener = await raw_server_factory("silent")
    await start(start_worker, celery_client, redis_server, tmp_path, allow_networks="127.0.0.0/8")

    (outcome,) = await outcomes(celery_client, [{"host": LOOPBACK, "port": listener.port}])

    assert (outcome["error"], outcome["stage"]) == ("blocked", "validate"), outcome
    assert outcome["err_message"] == (
        f"port {listener.port} is not allowed: requests from the queue may use ports "
        "25, 465, 587, 2525 only; see SMTP_SESSION_ALLOW_PORTS"
    )
    assert listener.connections_accepted == 0


async def test_the_operators_allowance_opens_what_it_names_and_ca_pem_verifies(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    smtp_server_factory: SmtpServerFactory,
    ca: trustme.CA,
    ca_pem_path: str,
    tmp_path: Path,
) -> None:
    plain = await smtp_server_factory(mode="plain")
    starttls = await smtp_server_factory(mode="starttls")
    await start(
        start_worker,
        celery_client,
        redis_server,
        tmp_path,
        allow_networks="127.0.0.0/8",
        allow_ports="1024-65535",
    )
    ca_pem = ca.cert_pem.bytes().decode()
    base = {"host": LOOPBACK, "ehlo_name": EHLO_NAME, "retries": 0}

    allowed, verified, garbage, with_key, path = await outcomes(
        celery_client,
        [
            {**base, "port": plain.port, "security": "plain"},
            {**base, "port": starttls.port, "ca_pem": ca_pem},
            {**base, "port": starttls.port, "ca_pem": "-----BEGIN CERTIFICATE-----\nnope\n"},
            {**base, "port": starttls.port, "ca_pem": ca_pem + ca.private_key_pem.bytes().decode()},
            {**base, "port": starttls.port, "ca_file": ca_pem_path},
        ],
    )

    assert allowed["ok"] is True, allowed
    # The tenant's CA, sent as text: trusted from the first handshake, never a file.
    assert verified["ok"] is True, verified
    assert (verified["tls"]["trust"], verified["tls"]["fallback"]) == ("portable", False)
    assert garbage["err_message"].startswith("ca_pem: holds no PEM certificate")
    assert with_key["err_message"] == "ca_pem: must hold CA certificates only, not a private key"
    assert path["err_message"].startswith("ca_file: is not accepted from the queue")
    for refused in (garbage, with_key, path):
        assert refused["error"] == "invalid_request"
    assert starttls.connections_accepted == 1  # only the verified one connected
    assert plain.connections_accepted == 1


async def test_at_most_n_sessions_at_once_to_one_address(
    start_worker: WorkerFactory,
    celery_client: Celery,
    redis_server: RedisServer,
    raw_server_factory: RawServerFactory,
    tmp_path: Path,
) -> None:
    held = await raw_server_factory("held_session")
    await start(
        start_worker,
        celery_client,
        redis_server,
        tmp_path,
        allow_networks="127.0.0.0/8",
        allow_ports="1024-65535",
        max_per_destination=str(PER_DESTINATION),
    )
    request = {
        "host": LOOPBACK,
        "port": held.port,
        "security": "plain",
        "ehlo_name": EHLO_NAME,
        "retries": 0,
    }

    found = await outcomes(celery_client, [request] * HELD)

    # The others waited their turn, inside their own deadline, and all got through.
    assert [outcome["ok"] for outcome in found] == [True] * HELD, found
    assert held.peak_open_connections == PER_DESTINATION
    assert held.connections_accepted == HELD

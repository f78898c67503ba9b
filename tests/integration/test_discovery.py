"""Discovery of a mail domain's servers against a DNS server on loopback.

The RFCs followed: `_submissions._tcp` (RFC 8314 §5.1), then `_submission._tcp`
(RFC 6186), SRV order by priority and weighted choice (RFC 2782), "." as "no service",
then MX by preference, a null MX (RFC 7505), and the implicit MX (RFC 5321 §5.1).

The DNS server (tests.dns_server) answers from a table of records on loopback; the
resolver points at it alone, so no test ever asks public DNS anything.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import dns.asyncresolver
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from dns.rdtypes.IN.SRV import SRV

from smtp_session.tasks.discovery import (
    MAX_DISCOVERED,
    MX_PORT,
    DiscoveredHost,
    discover,
    weighted_order,
)
from smtp_session.tasks.errors import ErrorCategory, SessionFailure, Stage
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.sweep import DomainCheck, sweep
from smtp_session.worker.targets import parse_targets
from tests.dns_server import DnsServer, Records, serve
from tests.servers import SmtpServerFactory

DOMAIN = "example.test"
SRV_NAME = f"_submission._tcp.{DOMAIN}"
TLS_SRV_NAME = f"_submissions._tcp.{DOMAIN}"
#: The SRV questions asked when neither submission service names a host.
BOTH_SRV = [(TLS_SRV_NAME, "SRV"), (SRV_NAME, "SRV")]
#: Deadline in the tests where the server stays silent: the wait is the point.
SHORT_LIFETIME = 0.3


class ScriptedDraws:
    """A random source that returns the given draws in turn and records each range."""

    def __init__(self, *draws: int) -> None:
        self.draws = list(draws)
        self.ranges: list[tuple[int, int]] = []

    def randint(self, a: int, b: int) -> int:
        self.ranges.append((a, b))
        return self.draws.pop(0)


async def found(server: DnsServer, domain: str = DOMAIN) -> list[tuple[str, int, str]]:
    hosts = await discover(domain, resolver=server.resolver())
    return [(host.host, host.port, host.source) for host in hosts]


async def refused(server: DnsServer, domain: str = DOMAIN) -> SessionFailure:
    with pytest.raises(SessionFailure) as caught:
        await discover(domain, resolver=server.resolver(SHORT_LIFETIME))
    assert caught.value.category is ErrorCategory.DNS
    return caught.value


# ----------------------------------------------------------------------------- SRV


async def test_submissions_srv_is_preferred_and_means_implicit_tls(
    dns_servers: list[DnsServer],
) -> None:
    # RFC 8314 §5.1: implicit TLS first; the STARTTLS service and MX are never asked.
    server = await serve(
        dns_servers,
        {
            (TLS_SRV_NAME, "SRV"): ["0 0 465 tls.example.test."],
            (SRV_NAME, "SRV"): ["0 0 587 starttls.example.test."],
            (DOMAIN, "MX"): ["10 mx.example.test."],
        },
    )
    hosts = await discover(DOMAIN, resolver=server.resolver())
    assert hosts == [DiscoveredHost("tls.example.test", 465, "srv", "tls")]
    assert server.queries == [(TLS_SRV_NAME, "SRV")]


@pytest.mark.parametrize(
    "submissions",
    [
        pytest.param({}, id="no-submissions"),
        pytest.param({(TLS_SRV_NAME, "SRV"): ["0 0 0 ."]}, id="submissions-dot"),
    ],
)
async def test_submission_srv_after_no_submissions_means_starttls(
    dns_servers: list[DnsServer], submissions: Records
) -> None:
    # A "." for _submissions says only that implicit TLS is not offered: the STARTTLS
    # service is another one, and answers.
    server = await serve(
        dns_servers,
        {
            **submissions,
            (SRV_NAME, "SRV"): ["0 0 587 starttls.example.test."],
            (DOMAIN, "MX"): ["10 mx.example.test."],
        },
    )
    hosts = await discover(DOMAIN, resolver=server.resolver())
    assert hosts == [DiscoveredHost("starttls.example.test", 587, "srv", "starttls")]
    assert server.queries == BOTH_SRV


async def test_srv_is_ordered_by_priority_then_weighted_draw(
    dns_servers: list[DnsServer],
) -> None:
    server = await serve(
        dns_servers,
        {
            (SRV_NAME, "SRV"): [
                "20 100 587 backup.example.test.",
                "10 5 587 light.example.test.",
                "10 60 465 heavy.example.test.",
                "10 0 587 zero.example.test.",
                "0 0 2587 first.example.test.",
            ],
        },
    )
    # Priority 10 is listed lightest first (zero 0, light 5, heavy 60): a draw of 65
    # reaches only heavy's running sum; then 0 picks zero (sum 0), and light is left.
    draws = ScriptedDraws(0, 65, 0, 3, 42)
    hosts = await discover(DOMAIN, resolver=server.resolver(), rng=draws)
    assert [(h.host, h.port) for h in hosts] == [
        ("first.example.test", 2587),
        ("heavy.example.test", 465),
        ("zero.example.test", 587),
        ("light.example.test", 587),
        ("backup.example.test", 587),
    ]
    assert draws.ranges == [(0, 0), (0, 65), (0, 5), (0, 5), (0, 100)]


def test_srv_weighted_draw_picks_first_in_proportion_to_weight() -> None:
    # RFC 2782: the chance of being tried first is proportional to the weight; a weight-0
    # record comes first only on a draw of exactly 0.
    records = [
        record
        for text in ("10 0 587 zero.test.", "10 10 587 light.test.", "10 30 587 heavy.test.")
        if isinstance(record := dns.rdata.from_text("IN", "SRV", text), SRV)
    ]
    assert len(records) == 3
    rng = random.Random(2782)
    runs = 4100
    firsts = Counter(weighted_order(records, rng)[0].target.to_text() for _ in range(runs))
    assert firsts["zero.test."] == pytest.approx(runs / 41, abs=60)
    assert firsts["light.test."] == pytest.approx(runs * 10 / 41, abs=150)
    assert firsts["heavy.test."] == pytest.approx(runs * 30 / 41, abs=150)


async def test_srv_dot_target_means_no_submission_service(
    dns_servers: list[DnsServer],
) -> None:
    # RFC 2782, RFC 6186 §3.4: "." says the service is decidedly not available; the MX
    # (relay, port 25) is not checked in its place.
    server = await serve(
        dns_servers,
        {
            (SRV_NAME, "SRV"): ["0 0 0 ."],
            (DOMAIN, "MX"): ["10 mx.example.test."],
        },
    )
    failure = await refused(server)
    assert failure.message == (
        f"{DOMAIN} publishes no submission service "
        f'({SRV_NAME} SRV target ".": not available, RFC 6186)'
    )
    assert server.queries == BOTH_SRV


async def test_both_srv_dot_targets_are_named_in_the_failure(
    dns_servers: list[DnsServer],
) -> None:
    server = await serve(
        dns_servers,
        {(TLS_SRV_NAME, "SRV"): ["0 0 0 ."], (SRV_NAME, "SRV"): ["0 0 0 ."]},
    )
    failure = await refused(server)
    assert f'{TLS_SRV_NAME} and {SRV_NAME} SRV target "."' in failure.message
    assert "publishes no submission service" in failure.message


async def test_srv_name_without_srv_record_falls_to_mx(dns_servers: list[DnsServer]) -> None:
    # The SRV name exists (NOERROR) but holds no SRV: the NoAnswer path, not NXDOMAIN.
    server = await serve(
        dns_servers,
        {(SRV_NAME, "TXT"): ['"nothing here"'], (DOMAIN, "MX"): ["5 mx.example.test."]},
    )
    assert await found(server) == [("mx.example.test", MX_PORT, "mx")]


async def test_discovered_hosts_are_capped(dns_servers: list[DnsServer]) -> None:
    server = await serve(
        dns_servers,
        {(SRV_NAME, "SRV"): [f"{n} 0 587 s{n:02}.example.test." for n in range(15)]},
    )
    hosts = await found(server)
    assert len(hosts) == MAX_DISCOVERED
    assert hosts[0] == ("s00.example.test", 587, "srv")
    assert hosts[-1] == (f"s{MAX_DISCOVERED - 1:02}.example.test", 587, "srv")


# ----------------------------------------------------------------------------- MX


async def test_no_srv_gives_mx_by_preference_on_port_25(dns_servers: list[DnsServer]) -> None:
    server = await serve(
        dns_servers,
        {
            (DOMAIN, "MX"): [
                "30 mx3.example.test.",
                "10 mx1.example.test.",
                "20 mx2.example.test.",
            ]
        },
    )
    assert await found(server) == [
        ("mx1.example.test", 25, "mx"),
        ("mx2.example.test", 25, "mx"),
        ("mx3.example.test", 25, "mx"),
    ]
    assert server.queries == [*BOTH_SRV, (DOMAIN, "MX")]


@pytest.mark.parametrize(
    ("kind", "address"), [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")], ids=["a", "aaaa"]
)
async def test_no_mx_falls_back_to_the_domains_address(
    dns_servers: list[DnsServer], kind: str, address: str
) -> None:
    # RFC 5321 §5.1: no MX but an address is an implicit MX, the domain itself, port 25.
    server = await serve(dns_servers, {(DOMAIN, kind): [address]})
    hosts = await discover(DOMAIN, resolver=server.resolver())
    assert hosts == [DiscoveredHost(DOMAIN, MX_PORT, "implicit-mx")]
    assert server.queries[:3] == [*BOTH_SRV, (DOMAIN, "MX")]
    assert sorted(server.queries[3:]) == [(DOMAIN, "A"), (DOMAIN, "AAAA")]


async def test_discover_returns_discovered_hosts(dns_servers: list[DnsServer]) -> None:
    server = await serve(dns_servers, {(DOMAIN, "MX"): ["10 mx.example.test."]})
    hosts = await discover(DOMAIN, resolver=server.resolver())
    assert hosts == [DiscoveredHost("mx.example.test", MX_PORT, "mx", None)]


# ----------------------------------------------------------------------------- failures


async def test_neither_srv_nor_mx_nor_address_is_a_dns_failure(
    dns_servers: list[DnsServer],
) -> None:
    server = await serve(dns_servers, {(DOMAIN, "TXT"): ['"v=spf1 -all"']})
    failure = await refused(server)
    assert failure.message == (
        f"{DOMAIN} has no _submissions._tcp or _submission._tcp SRV record, "
        "no MX record and no address record"
    )


async def test_unknown_domain_is_a_dns_failure(dns_servers: list[DnsServer]) -> None:
    server = await serve(dns_servers, {})
    failure = await refused(server, "nowhere.test")
    assert "nowhere.test" in failure.message
    assert "no MX record" in failure.message


async def test_null_mx_says_the_domain_accepts_no_mail(dns_servers: list[DnsServer]) -> None:
    # RFC 7505: "0 ." says the domain accepts no mail; it is not a host to connect to,
    # and the domain's address is no implicit MX either.
    server = await serve(dns_servers, {(DOMAIN, "MX"): ["0 ."], (DOMAIN, "A"): ["192.0.2.1"]})
    failure = await refused(server)
    assert failure.message == f"{DOMAIN} accepts no mail (null MX, RFC 7505)"
    assert server.queries == [*BOTH_SRV, (DOMAIN, "MX")]


async def test_servfail_is_a_dns_failure(dns_servers: list[DnsServer]) -> None:
    server = await serve(dns_servers, {}, servfail=[SRV_NAME, DOMAIN])
    failure = await refused(server)
    assert failure.message.startswith(f"could not discover the servers of {DOMAIN}: ")
    assert "SERVFAIL" in failure.message


async def test_servfail_on_mx_after_no_srv_is_a_dns_failure(dns_servers: list[DnsServer]) -> None:
    server = await serve(dns_servers, {}, servfail=[DOMAIN])
    failure = await refused(server)
    assert failure.message.startswith(f"could not discover the servers of {DOMAIN}: ")
    assert server.queries[:2] == BOTH_SRV
    assert (DOMAIN, "MX") in server.queries


async def test_resolver_timeout_is_a_dns_failure(dns_servers: list[DnsServer]) -> None:
    server = await serve(dns_servers, {}, silent=[SRV_NAME])
    loop = asyncio.get_running_loop()
    started = loop.time()
    failure = await refused(server)
    waited = loop.time() - started
    assert failure.message.startswith(f"could not discover the servers of {DOMAIN}: ")
    assert "timed out" in failure.message or "timeout" in failure.message.lower()
    # The resolver's lifetime bounds the wait, not some default of several seconds.
    assert SHORT_LIFETIME * 0.9 <= waited < SHORT_LIFETIME + 1.0


# ----------------------------------------------------------------------------- in a sweep


async def test_sweep_checks_each_discovered_host_and_reports_dns_failures(
    dns_servers: list[DnsServer], smtp_server_factory: SmtpServerFactory
) -> None:
    smtp = await smtp_server_factory(mode="plain")
    server = await serve(
        dns_servers,
        {(SRV_NAME, "SRV"): [f"0 0 {smtp.port} localhost."]},
    )
    calls: list[Outcome] = []
    summary = await sweep(
        [
            DomainCheck(DOMAIN, {"security": "plain", "target": "dom"}),
            DomainCheck("nowhere.test", {"security": "plain", "target": "lost"}),
        ],
        concurrency=4,
        resolver=server.resolver(),
        on_outcome=calls.append,
    )
    assert (summary.total, summary.ok, summary.failed) == (2, 1, 1)
    good, lost = summary.outcomes
    assert good.ok, good.err_message
    assert (good.host, good.port, good.target, good.security) == (
        "localhost",
        smtp.port,
        "dom",
        "plain",
    )
    assert smtp.verbs == ["EHLO", "QUIT"]
    assert not lost.ok
    assert (lost.error, lost.stage, lost.host, lost.target) == (
        ErrorCategory.DNS,
        Stage.RESOLVE,
        "nowhere.test",
        "lost",
    )
    assert lost.retryable
    assert "nowhere.test" in lost.err_message
    assert sorted(map(id, calls)) == sorted(map(id, summary.outcomes))


async def test_sweep_runs_one_session_per_discovered_host_in_discovery_order(
    dns_servers: list[DnsServer], smtp_server_factory: SmtpServerFactory
) -> None:
    primary = await smtp_server_factory(mode="plain")
    backup = await smtp_server_factory(mode="plain")
    server = await serve(
        dns_servers,
        {
            (SRV_NAME, "SRV"): [
                f"20 0 {backup.port} localhost.",
                f"10 0 {primary.port} localhost.",
            ]
        },
    )
    summary = await sweep(
        [DomainCheck(DOMAIN, {"security": "plain", "target": "dom"})],
        concurrency=1,
        resolver=server.resolver(),
    )
    assert [(o.ok, o.port, o.target) for o in summary.outcomes] == [
        (True, primary.port, "dom"),
        (True, backup.port, "dom"),
    ]
    assert primary.connections_accepted == backup.connections_accepted == 1


async def test_sweep_domain_port_from_fields_wins_over_srv(
    dns_servers: list[DnsServer], smtp_server_factory: SmtpServerFactory
) -> None:
    # A port configured for the target is the operator's choice: discovery fills it only
    # when none is given (the MX port 25 rarely allows submission).
    smtp = await smtp_server_factory(mode="plain")
    server = await serve(dns_servers, {(DOMAIN, "MX"): ["10 localhost."]})
    summary = await sweep(
        [DomainCheck(DOMAIN, {"security": "plain", "port": smtp.port})],
        concurrency=1,
        resolver=server.resolver(),
    )
    (outcome,) = summary.outcomes
    assert outcome.ok, outcome.err_message
    assert outcome.port == smtp.port


async def test_sweep_of_a_domain_target_keeps_the_srv_port_over_a_defaults_port(
    dns_servers: list[DnsServer], smtp_server_factory: SmtpServerFactory
) -> None:
    # [defaults] port = 587 is for host targets: the SRV record names the port to use.
    smtp = await smtp_server_factory(mode="plain")
    server = await serve(dns_servers, {(SRV_NAME, "SRV"): [f"0 0 {smtp.port} localhost."]})
    (target,) = parse_targets(
        {
            "defaults": {"port": 587, "security": "tls"},
            "targets": [{"name": "dom", "domain": DOMAIN, "security": "plain"}],
        }
    )
    summary = await sweep([target.sweep_item()], concurrency=1, resolver=server.resolver())
    (outcome,) = summary.outcomes
    assert outcome.ok, outcome.err_message
    assert (outcome.port, outcome.security, outcome.target) == (smtp.port, "plain", "dom")


async def test_sweep_checks_a_submissions_host_with_implicit_tls(
    dns_servers: list[DnsServer], smtp_server_factory: SmtpServerFactory, ca_pem_path: str
) -> None:
    # RFC 8314: a host found under _submissions speaks TLS from the first byte.
    smtp = await smtp_server_factory(mode="tls")
    server = await serve(dns_servers, {(TLS_SRV_NAME, "SRV"): [f"0 1 {smtp.port} localhost."]})
    summary = await sweep(
        [DomainCheck(DOMAIN, {"ca_file": ca_pem_path, "ehlo_name": "client.example"})],
        concurrency=1,
        resolver=server.resolver(),
    )
    (outcome,) = summary.outcomes
    assert outcome.ok, outcome.err_message
    assert (outcome.security, outcome.port) == ("tls", smtp.port)

"""The egress policy of queue requests: every refused range, its IPv6 forms, odd spellings."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp_session.tasks.egress import (
    DEFAULT_PORTS,
    NOT_PUBLIC,
    REFUSED_RANGES,
    EgressPolicy,
    parse_networks,
    parse_ports,
    why_not_public,
)
from smtp_session.tasks.errors import ErrorCategory, InvalidRequest, SessionFailure
from smtp_session.tasks.request import parse_request
from smtp_session.tasks.resolve import resolve

PUBLIC = ("8.8.8.8", "1.1.1.1", "2a00:1450:4001:80b::2005", "2606:4700:4700::1111")
DEFAULT_POLICY = EgressPolicy()


def inside(cidr: str) -> str:
    """An address inside `cidr` that no earlier, narrower row of the table claims."""
    network = ipaddress.ip_network(cidr)
    return str(network[-1] if network.num_addresses > 1 else network[0])


@pytest.mark.parametrize(("cidr", "reason"), REFUSED_RANGES)
def test_every_row_of_the_table_refuses_its_range(cidr: str, reason: str) -> None:
    found = why_not_public(ipaddress.ip_address(inside(cidr)))
    # The last address of a wide range may fall in a narrower row listed first: both refuse.
    assert found is not None
    if cidr not in {"240.0.0.0/4", "2001::/23"}:
        assert found == reason


@pytest.mark.parametrize("address", PUBLIC)
def test_public_unicast_addresses_pass(address: str) -> None:
    assert why_not_public(ipaddress.ip_address(address)) is None
    DEFAULT_POLICY.check_addresses("smtp.example.com", [address])


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("::ffff:127.0.0.1", "a loopback address, in an IPv6 form (127.0.0.1)"),
        ("::ffff:a9fe:a9fe", "a link-local address"),  # 169.254.169.254, mapped
        ("2002:a00:1::1", "a private address (RFC 1918), in an IPv6 form (10.0.0.1)"),  # 6to4
        ("64:ff9b::7f00:1", "a loopback address, in an IPv6 form"),  # NAT64
        ("::7f00:1", "a loopback address, in an IPv6 form"),  # IPv4-compatible
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a Teredo tunnel address"),
        ("fe80::1", "a link-local address"),
        ("fd12:3456::1", "a unique local address (ULA)"),
    ],
)
def test_ipv6_forms_are_judged_by_what_they_carry(address: str, words: str) -> None:
    reason = why_not_public(ipaddress.ip_address(address))
    assert reason is not None and reason.startswith(words), reason


def test_a_refused_address_says_which_and_why_and_where_to_widen() -> None:
    with pytest.raises(SessionFailure) as raised:
        DEFAULT_POLICY.check_addresses("mail.tenant.example", ["8.8.8.8", "10.0.0.5"])
    assert raised.value.category is ErrorCategory.BLOCKED
    assert raised.value.message == (
        "mail.tenant.example resolves to 10.0.0.5, which is a private address (RFC 1918): "
        "requests from the queue may reach public addresses only; "
        "see SMTP_SESSION_ALLOW_NETWORKS"
    )
    with pytest.raises(SessionFailure, match=r"^127\.0\.0\.1 is a loopback address: "):
        DEFAULT_POLICY.check_addresses("127.0.0.1", ["127.0.0.1"])


def test_operators_widen_the_networks_and_set_the_ports() -> None:
    policy = EgressPolicy(parse_networks("127.0.0.0/8, 10.20.0.0/16"), parse_ports("25,1024-65535"))
    policy.check_addresses("relay.internal", ["10.20.1.2", "127.0.0.1", "::ffff:127.0.0.1"])
    with pytest.raises(SessionFailure, match=r"10\.21\.0\.1, which is a private address"):
        policy.check_addresses("relay.internal", ["10.21.0.1"])
    policy.check_port(2525)
    with pytest.raises(SessionFailure, match="port 587 is not allowed"):
        policy.check_port(587)
    assert {25, 465, 587, 2525} == DEFAULT_PORTS
    with pytest.raises(SessionFailure, match=r"ports 25, 465, 587, 2525 only"):
        DEFAULT_POLICY.check_port(6379)


@pytest.mark.parametrize(
    ("text", "words"),
    [("10.0.0.0/33", "'10.0.0.0/33' is not a network"), ("10.0.0.1/8", "has host bits")],
)
def test_bad_networks_are_named(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_networks(text)


@pytest.mark.parametrize(
    ("text", "words"),
    [("25,x", "'x' is not a port"), ("70000", "not within 1-65535"), ("30-20", "low to high")],
)
def test_bad_ports_are_named(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_ports(text)


# ----------------------------------------------------------------------------- spellings

#: Refused IPv4 addresses an attacker would aim at.
TARGETS = st.sampled_from(["127.0.0.1", "127.0.0.53", "10.0.0.5", "169.254.169.254", "0.0.0.0"])


def spellings(address: str) -> list[str]:
    """Ways to write `address` that the system resolver (inet_aton) or IPv6 accept."""
    a, b, c, d = (int(part) for part in address.split("."))
    number = int(ipaddress.IPv4Address(address))
    return [
        address,
        str(number),  # 2130706433
        hex(number),  # 0x7f000001
        f"0x{a:x}.{b}.{c}.{d}",  # 0x7f.0.0.1
        f"0{a:o}.{b}.{c}.{d}",  # 0177.0.0.1
        f"{a}.{(b << 16) | (c << 8) | d}",  # 127.1
        f"{a}.{b}.{(c << 8) | d}",  # 127.0.1
        f"::ffff:{address}",
        f"[::ffff:{address}]",
        f"::ffff:{(a << 8) | b:x}:{(c << 8) | d:x}",
        f"64:ff9b::{address}",
        f"2002:{(a << 8) | b:x}:{(c << 8) | d:x}::1",
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=TARGETS, choice=st.integers(min_value=0, max_value=11))
def test_no_spelling_of_a_refused_address_gets_through(target: str, choice: int) -> None:
    spelling = spellings(target)[choice]
    try:
        request = parse_request({"host": spelling, "port": 25})
    except InvalidRequest:
        return  # refused before any I/O: never reaches a socket
    try:
        addresses = asyncio.run(resolve(request.connect_host, request.effective_port))
    except socket.gaierror:
        return  # does not resolve: nothing to connect to
    with pytest.raises(SessionFailure) as raised:
        DEFAULT_POLICY.check_addresses(request.connect_host, [a[4][0] for a in addresses])
    assert raised.value.category is ErrorCategory.BLOCKED


def test_a_name_is_judged_by_every_address_it_resolves_to() -> None:
    addresses = asyncio.run(resolve("localhost", 25))
    with pytest.raises(SessionFailure, match=r"^localhost resolves to .*loopback"):
        DEFAULT_POLICY.check_addresses("localhost", [a[4][0] for a in addresses])
    assert NOT_PUBLIC == "not a public unicast address"

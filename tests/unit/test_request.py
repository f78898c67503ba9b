"""Request validation: every bad field is named, before any I/O."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtp_session.tasks.errors import InvalidRequest
from smtp_session.tasks.request import check_queue_request, parse_request
from smtp_session.worker.settings import InvalidSettings, load_settings

#: A private key where a CA certificate belongs (its body does not matter: refused unread).
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        ({"host": ""}, "host", "must not be empty"),
        ({"host": "smtp example.com"}, "host", "must not contain spaces"),
        ({"host": "smtp\x00.example.com"}, "host", "control characters"),
        ({"host": "a" * 254}, "host", "longer than 253"),
        ({"host": "-bad-.example.com"}, "host", "not a valid host name"),
        ({"host": "x", "port": 0}, "port", "greater than or equal to 1"),
        ({"host": "x", "port": 70000}, "port", "less than or equal to 65535"),
        ({"host": "x", "port": "25"}, "port", "valid integer"),
        ({"host": "x", "timeout": -1}, "timeout", "greater than 0"),
        ({"host": "x", "timeout": float("nan")}, "timeout", "finite"),
        ({"host": "x", "retries": -1}, "retries", "greater than or equal to 0"),
        ({"host": "x", "security": "ssl"}, "security", "'auto', 'starttls', 'tls' or 'plain'"),
        ({"host": "x", "trust": "none"}, "trust", "'auto', 'native' or 'portable'"),
        ({"host": "x", "credentials": "a/b"}, "credentials", "letters, digits"),
        ({"host": "x", "ehlo_name": "a b"}, "ehlo_name", "printable ASCII"),
        ({"host": "x", "password": "hunter2"}, "password", "unknown field"),
        ({"port": 25}, "host", "is required"),
        ({"host": "x", "security": "plain", "credentials": "c"}, "credentials", "need TLS"),
        ({"host": "x", "ca_pem": "x" * 65_537}, "ca_pem", "at most 65536 characters"),
        ({"host": "x", "ca_pem": "not a certificate"}, "ca_pem", "holds no PEM certificate"),
        ({"host": "x", "ca_pem": KEY_PEM}, "ca_pem", "not a private key"),
        ({"host": "x", "ca_file": "/ca.pem", "trust": "native"}, "ca_file", "not used with trust"),
        ({"host": "x", "tls_name": ""}, "tls_name", "must not be empty"),
        ({"host": "x", "tls_name": "mail example.com"}, "tls_name", "must not contain spaces"),
        ({"host": "x", "tls_name": "a" * 254}, "tls_name", "longer than 253"),
        ({"host": "x", "tls_name": "*.example.com"}, "tls_name", "not a valid host name"),
        ({"host": "x", "tls_name": "192.0.2.1"}, "tls_name", "not an IP address"),
        ({"host": "x", "tls_name": "[2001:db8::1]"}, "tls_name", "not an IP address"),
        ({"host": "x", "tls_name": 7}, "tls_name", "valid string"),
        ({"host": "x", "security": "plain", "tls_name": "mx.example"}, "tls_name", "not used"),
    ],
)
def test_invalid_fields_are_named(fields: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(fields)
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{field}: ")


def test_a_non_mapping_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="request: must be a mapping"):
        parse_request(["host", "x"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "port", "security"),
    [
        ({"host": "x"}, 587, "starttls"),
        ({"host": "x", "port": 465}, 465, "tls"),
        ({"host": "x", "port": 25}, 25, "starttls"),
        ({"host": "x", "security": "tls"}, 465, "tls"),
        ({"host": "x", "security": "plain"}, 587, "plain"),
        ({"host": "x", "port": 465, "security": "starttls"}, 465, "starttls"),
    ],
)
def test_auto_security_and_default_port(fields: dict[str, Any], port: int, security: str) -> None:
    request = parse_request(fields)
    assert request.effective_port == port
    assert request.effective_security == security


def test_stage_timeouts_default_to_the_timeout_and_never_exceed_it() -> None:
    default = parse_request({"host": "x"})
    assert (default.effective_connect_timeout, default.effective_command_timeout) == (10.0, 10.0)
    long = parse_request({"host": "x", "timeout": 20.0})
    assert (long.effective_connect_timeout, long.effective_command_timeout) == (20.0, 20.0)
    capped = parse_request({"host": "x", "timeout": 2.0, "connect_timeout": 5.0})
    assert capped.effective_connect_timeout == 2.0
    explicit = parse_request({"host": "x", "connect_timeout": 1.5, "command_timeout": 0.5})
    assert (explicit.effective_connect_timeout, explicit.effective_command_timeout) == (1.5, 0.5)


@pytest.mark.parametrize(
    ("host", "wire"),
    [
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),  # IDNA 2008: not fass.de
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("192.0.2.1", "192.0.2.1"),
        ("smtp.example.com.", "smtp.example.com"),
    ],
)
def test_hosts_go_on_the_wire_in_ascii(host: str, wire: str) -> None:
    assert parse_request({"host": host}).connect_host == wire


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"host": "192.0.2.1"}, "192.0.2.1"),
        ({"host": "192.0.2.1", "tls_name": "Mail.Example.COM."}, "mail.example.com"),
        ({"host": "192.0.2.1", "tls_name": "bücher.example"}, "xn--bcher-kva.example"),
        ({"host": "lb.example", "tls_name": "smtp.example"}, "smtp.example"),
    ],
)
def test_tls_name_is_what_tls_names_and_host_what_is_connected_to(
    fields: dict[str, Any], name: str
) -> None:
    request = parse_request(fields)
    assert request.tls_server_name == name
    assert request.connect_host == parse_request({"host": fields["host"]}).connect_host


@given(st.text(max_size=300))
def test_any_host_string_validates_or_is_named(host: str) -> None:
    try:
        request = parse_request({"host": host})
    except InvalidRequest as exc:
        error: InvalidRequest | None = exc
    else:
        error = None
        assert request.connect_host
        assert " " not in request.connect_host
    assert error is None or error.field == "host"


def test_a_queue_request_may_not_name_a_file_on_the_worker() -> None:
    with pytest.raises(InvalidRequest, match=r"^ca_file: is not accepted from the queue"):
        check_queue_request(parse_request({"host": "x", "ca_file": "/etc/passwd"}))
    check_queue_request(parse_request({"host": "x"}))


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("SMTP_SESSION_ALLOW_NETWORKS", "10.0.0.0/33", "'10.0.0.0/33' is not a network"),
        ("SMTP_SESSION_ALLOW_PORTS", "25,smtp", "'smtp' is not a port"),
        ("SMTP_SESSION_MAX_PER_DESTINATION", "0", "greater than or equal to 1"),
    ],
)
def test_a_bad_egress_setting_stops_the_start_naming_it(
    variable: str, value: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidSettings) as caught:
        load_settings()
    assert caught.value.variable == variable
    assert words in caught.value.problem

"""The client's greeting: the name it sends in EHLO, and HELO for servers without EHLO."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from smtp_session.tasks import resolve
from smtp_session.tasks.session import open_session
from tests.integration.test_session import PASSWORD, USER, session
from tests.servers import SmtpServer, SmtpServerFactory

EHLO_NAME = "probe.example"
NOT_RECOGNIZED = "502 5.5.2 Error: command not recognized"

SetFqdn = Callable[[str], None]


@pytest.fixture
def host_fqdn(monkeypatch: pytest.MonkeyPatch) -> SetFqdn:
    """Sets what socket.getfqdn() says about this host, and forgets the name looked up."""

    def set_fqdn(name: str) -> None:
        monkeypatch.setattr(socket, "getfqdn", lambda *_: name)
        monkeypatch.setattr(resolve, "_local_name", [])

    return set_fqdn


# ----------------------------------------------------------------------------- the name


@pytest.mark.parametrize("fqdn", ["localhost", "vm", "vm.localdomain", "build-7.internal"])
async def test_without_a_public_fqdn_ehlo_sends_the_address_literal(
    smtp_server_factory: SmtpServerFactory, host_fqdn: SetFqdn, fqdn: str
) -> None:
    host_fqdn(fqdn)
    server = await smtp_server_factory(mode="plain")
    outcome = await session(server.port, security="plain")
    assert outcome.ok, outcome.err_message
    assert [(command.verb, command.arg) for command in server.commands] == [
        ("EHLO", "[127.0.0.1]"),  # RFC 5321 §4.1.3: this connection's own address
        ("QUIT", ""),
    ]


async def test_an_ipv6_connection_sends_an_ipv6_literal(host_fqdn: SetFqdn) -> None:
    host_fqdn("localhost")
    server = SmtpServer(mode="plain")
    server.host = "::1"
    async with server:
        outcome = await open_session(
            {"host": "::1", "port": server.port, "security": "plain", "retries": 0}
        )
    assert outcome.ok, outcome.err_message
    assert server.commands[0].arg == "[IPv6:::1]"


@pytest.mark.parametrize(
    ("fields", "sent"), [({}, "mx1.mail.example.org"), ({"ehlo_name": EHLO_NAME}, EHLO_NAME)]
)
async def test_a_public_fqdn_is_the_ehlo_name_unless_the_request_gives_one(
    smtp_server_factory: SmtpServerFactory, host_fqdn: SetFqdn, fields: dict[str, str], sent: str
) -> None:
    host_fqdn("mx1.mail.example.org")
    server = await smtp_server_factory(mode="plain")
    outcome = await session(server.port, security="plain", **fields)
    assert outcome.ok, outcome.err_message
    assert server.commands[0].arg == sent


# ----------------------------------------------------------------------------- HELO


@pytest.mark.parametrize("refusal", [NOT_RECOGNIZED, "500 5.5.1 Command unrecognized"])
@pytest.mark.parametrize("mode", ["plain", "tls"])
async def test_a_helo_only_server_gets_helo_when_no_extension_is_needed(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str, refusal: str, mode: str
) -> None:
    # RFC 5321 §4.1.1.1: EHLO "not recognized" (500, 502) is answered with HELO.
    server = await smtp_server_factory(mode=mode, replies={"EHLO": refusal})  # type: ignore[arg-type]
    outcome = await session(server.port, security=mode, ca_file=ca_pem_path, ehlo_name=EHLO_NAME)
    assert outcome.ok, outcome.err_message
    assert [(command.verb, command.arg) for command in server.commands] == [
        ("EHLO", EHLO_NAME),
        ("HELO", EHLO_NAME),
        ("QUIT", ""),
    ]
    assert outcome.server is not None
    assert (outcome.server.extensions, outcome.server.auth_mechanisms) == ([], [])


@pytest.mark.parametrize(
    ("mode", "credentials"), [("starttls", None), ("starttls", "good"), ("tls", "good")]
)
async def test_without_ehlo_no_extension_is_assumed(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str, mode: str, credentials: str | None
) -> None:
    # STARTTLS and AUTH are extensions, which only EHLO offers: HELO would not make them
    # appear, so the refusal stands (its hint: tests/integration/test_provider_replies.py).
    server = await smtp_server_factory(
        mode=mode,  # type: ignore[arg-type]
        auth={USER: PASSWORD},
        replies={"EHLO": NOT_RECOGNIZED},
    )
    fields = {"credentials": credentials} if credentials else {}
    outcome = await session(server.port, security=mode, ca_file=ca_pem_path, **fields)
    assert (outcome.error, outcome.stage, outcome.smtp_code) == ("smtp_permanent", "ehlo", 502)
    assert server.verbs == ["EHLO"]  # no HELO, no STARTTLS, no AUTH

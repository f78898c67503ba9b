"""The test servers themselves behave as documented (raw sockets and aiosmtplib only).

These tests pin the fixtures' contract so that a product test failing against one of
them points at the product, not at the harness.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from tests.servers import (
    AUTH_FAILED_REPLY,
    BANNER_421,
    BANNER_554,
    BANNER_OK,
    EXPIRED_NOT_AFTER,
    GARBAGE,
    HELD_SESSION_SECONDS,
    HTTP_400,
    LOOPBACK,
    OAUTH_ERROR,
    SLOW_DRIP_START,
    AuthAttempt,
    RawBehaviour,
    RawServerFactory,
    SmtpServer,
    SmtpServerFactory,
    client_ssl_context,
    leaf_certificate,
)

# Long enough to tell "nothing comes" from "late", short enough for a quick suite.
QUIET_PERIOD = 0.3
READ_TIMEOUT = 2.0
CLIENT_TIMEOUT = 5.0
USERS = {"alice": "correct horse"}
TOKENS = {"alice": "ya29.token"}


def smtp_client(
    server: SmtpServer, ca: trustme.CA, *, use_tls: bool = False, start_tls: bool | None = None
) -> aiosmtplib.SMTP:
    """An aiosmtplib client for ``server`` that trusts ``ca`` only."""
    return aiosmtplib.SMTP(
        hostname=server.host,
        port=server.port,
        tls_context=client_ssl_context(ca),
        local_hostname="client.example",
        timeout=CLIENT_TIMEOUT,
        use_tls=use_tls,
        start_tls=start_tls,
    )


async def read_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), READ_TIMEOUT)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):  # the server reset or closed first: closed anyway
        await writer.wait_closed()


# ----------------------------------------------------------------------------- certificates


def test_ca_pem_path_holds_the_ca(ca: trustme.CA, ca_pem_path: str) -> None:
    assert Path(ca_pem_path).read_bytes() == ca.cert_pem.bytes()


def test_expired_cert_is_expired(expired_cert: trustme.LeafCert) -> None:
    assert leaf_certificate(expired_cert).not_valid_after_utc == EXPIRED_NOT_AFTER


@pytest.mark.parametrize(
    ("cert_fixture", "verify_code"),
    [
        ("expired_cert", 10),  # X509_V_ERR_CERT_HAS_EXPIRED
        ("wrong_host_cert", 62),  # X509_V_ERR_HOSTNAME_MISMATCH
        ("unknown_ca_cert", 20),  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    ],
)
async def test_bad_certificates_fail_verification(
    request: pytest.FixtureRequest,
    smtp_server_factory: SmtpServerFactory,
    ca: trustme.CA,
    cert_fixture: str,
    verify_code: int,
) -> None:
    cert: trustme.LeafCert = request.getfixturevalue(cert_fixture)
    server = await smtp_server_factory(mode="tls", cert=cert)
    with pytest.raises(ssl.SSLCertVerificationError) as excinfo:
        await asyncio.open_connection(
            server.host, server.port, ssl=client_ssl_context(ca), server_hostname="localhost"
        )
    assert excinfo.value.verify_code == verify_code
    await server.wait_idle()
    assert server.tls_handshake_failures == 1
    assert server.commands == []


async def test_ca_pem_path_verifies_good_cert(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str
) -> None:
    server = await smtp_server_factory(mode="tls")
    context = ssl.create_default_context(cafile=ca_pem_path)
    reader, writer = await asyncio.open_connection(
        server.host, server.port, ssl=context, server_hostname=LOOPBACK
    )
    assert (await read_line(reader)).startswith(b"220 localhost ")
    await close(writer)


# ----------------------------------------------------------------------------- SmtpServer


async def test_starttls_server(smtp_server: SmtpServer, ca: trustme.CA) -> None:
    async with smtp_client(smtp_server, ca, start_tls=True) as client:
        assert client.get_transport_info("sslcontext") is not None
        await client.ehlo()  # aiosmtplib leaves the post-STARTTLS EHLO to the caller
        assert not client.supports_extension("auth")  # no AUTH configured
    assert smtp_server.verbs == ["EHLO", "STARTTLS", "EHLO", "QUIT"]
    assert smtp_server.connections_accepted == 1
    assert smtp_server.tls_handshakes_completed == 1
    await smtp_server.wait_idle()


async def test_starttls_required_before_other_commands(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(auth=USERS)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    await read_line(reader)
    writer.write(b"EHLO client.example\r\n")
    lines = [await read_line(reader)]
    while lines[-1][3:4] == b"-":
        lines.append(await read_line(reader))
    assert b"250-STARTTLS\r\n" in lines
    assert not any(b"AUTH" in line for line in lines)  # only after STARTTLS
    writer.write(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0correct horse") + b"\r\n")
    assert (await read_line(reader)).startswith(b"530 ")
    writer.write(b"QUIT\r\n")
    assert (await read_line(reader)).startswith(b"221 ")
    await close(writer)
    # A refused AUTH is still recorded, credential stripped.
    assert [(c.verb, c.arg) for c in server.commands] == [
        ("EHLO", "client.example"),
        ("AUTH", "PLAIN"),
        ("QUIT", ""),
    ]
    assert server.auth_attempts == []


async def test_implicit_tls_server(smtp_server_factory: SmtpServerFactory, ca: trustme.CA) -> None:
    server = await smtp_server_factory(mode="tls", auth=USERS)
    async with smtp_client(server, ca, use_tls=True) as client:
        assert not client.supports_extension("starttls")
        await client.login("alice", USERS["alice"])
    assert server.verbs == ["EHLO", "AUTH", "QUIT"]
    assert server.tls_handshakes_completed == 1


@pytest.mark.parametrize("starttls_offered", [None, False])
async def test_plain_servers_offer_no_starttls(
    smtp_server_factory: SmtpServerFactory, ca: trustme.CA, starttls_offered: bool | None
) -> None:
    if starttls_offered is None:
        server = await smtp_server_factory(mode="plain")
    else:
        server = await smtp_server_factory(mode="starttls", starttls_offered=False)
    async with smtp_client(server, ca, start_tls=False) as client:
        await client.ehlo()
        assert not client.supports_extension("starttls")
        assert not client.supports_extension("auth")
    assert "STARTTLS" not in server.verbs


@pytest.mark.parametrize("method", ["auth_plain", "auth_login"])
async def test_auth_success_and_535(
    smtp_server_factory: SmtpServerFactory, ca: trustme.CA, method: str
) -> None:
    server = await smtp_server_factory(auth=USERS)
    async with smtp_client(server, ca, start_tls=True) as client:
        await client.ehlo()
        assert client.server_auth_methods == ["login", "plain"]
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as excinfo:
            await getattr(client, method)("alice", "wrong")
        assert f"{excinfo.value.code} {excinfo.value.message}" == AUTH_FAILED_REPLY
        response = await getattr(client, method)("alice", USERS["alice"])
        assert response.code == 235
    mechanism = method.removeprefix("auth_").upper()
    assert server.auth_attempts == [
        AuthAttempt(1, mechanism, "alice", success=False),
        AuthAttempt(1, mechanism, "alice", success=True),
    ]
    # Only commands are recorded, never AUTH continuation lines.
    assert server.verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "AUTH", "QUIT"]


async def test_xoauth2(smtp_server_factory: SmtpServerFactory, ca: trustme.CA) -> None:
    server = await smtp_server_factory(auth=USERS, oauth_tokens=TOKENS)
    async with smtp_client(server, ca, start_tls=True) as client:
        await client.ehlo()
        assert "xoauth2" in client.server_auth_methods
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as excinfo:
            await client.auth_xoauth2("alice", "expired-token")
        assert excinfo.value.code == 535
        assert (await client.auth_xoauth2("alice", TOKENS["alice"])).code == 235
    assert [(a.mechanism, a.success) for a in server.auth_attempts] == [
        ("XOAUTH2", False),
        ("XOAUTH2", True),
    ]
    assert server.verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "AUTH", "QUIT"]


async def test_xoauth2_error_challenge(
    smtp_server_factory: SmtpServerFactory, ca: trustme.CA
) -> None:
    custom = {"status": "400", "scope": "https://mail.google.com/"}
    for oauth_error, expected in ((None, OAUTH_ERROR), (custom, custom)):
        server = await smtp_server_factory(oauth_tokens=TOKENS, oauth_error=oauth_error)
        async with smtp_client(server, ca, start_tls=True) as client:
            await client.ehlo()
            initial = aiosmtplib.auth.auth_xoauth2_encode("alice", "expired-token")
            challenge = await client.execute_command(b"AUTH", b"XOAUTH2", initial)
            assert challenge.code == 334
            assert json.loads(base64.b64decode(challenge.message)) == expected
            final = await client.execute_command(b"")  # the client's empty answer
            assert f"{final.code} {final.message}" == AUTH_FAILED_REPLY


async def test_replies_replace_the_servers_own(
    smtp_server_factory: SmtpServerFactory, ca: trustme.CA
) -> None:
    helo_only = await smtp_server_factory(
        mode="plain", replies={"EHLO": "502 5.5.2 Error: command not recognized"}
    )
    async with smtp_client(helo_only, ca, start_tls=False) as client:
        with pytest.raises(aiosmtplib.SMTPHeloError) as refused:
            await client.ehlo()
        assert (refused.value.code, refused.value.message) == (
            502,
            "5.5.2 Error: command not recognized",
        )
        assert (await client.helo()).code == 250  # HELO keeps the server's own reply
    two_lines = "534-5.7.9 Application-specific password required.\r\n534 5.7.9 Learn more"
    auth = await smtp_server_factory(auth=USERS, replies={"AUTH": two_lines})
    async with smtp_client(auth, ca, start_tls=True) as client:
        await client.ehlo()
        assert client.server_auth_methods  # EHLO is the server's own, AUTH offered
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused_auth:
            await client.auth_plain("alice", USERS["alice"])  # the right password, even
        assert (refused_auth.value.code, refused_auth.value.message) == (
            534,
            "5.7.9 Application-specific password required.\n5.7.9 Learn more",
        )
    assert auth.verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "QUIT"]


async def test_counts_connections_and_waits_for_idle(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")
    connections = [await asyncio.open_connection(server.host, server.port) for _ in range(3)]
    await server.wait_connections(3)
    assert server.connections_accepted == 3
    for _, writer in connections:
        await close(writer)
    await server.wait_idle()
    assert server.open_connections == 0


async def test_stop_drops_open_connections(smtp_server_factory: SmtpServerFactory) -> None:
    server = await smtp_server_factory(mode="tls")
    # Never starts the handshake: the server must still drop it at stop().
    reader, writer = await asyncio.open_connection(server.host, server.port)
    await server.wait_connections(1)
    await server.stop()
    assert await asyncio.wait_for(reader.read(), READ_TIMEOUT) == b""
    assert server.open_connections == 0
    await close(writer)


# ----------------------------------------------------------------------------- RawServer


async def test_silent(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("silent")
    reader, writer = await asyncio.open_connection(*server.address)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET_PERIOD)
    assert server.connections_accepted == 1
    assert server.open_connections == 1  # still open: teardown would close it
    await close(writer)


@pytest.mark.parametrize(
    ("behaviour", "sent"),
    [("banner_421", BANNER_421), ("banner_554", BANNER_554), ("http", HTTP_400)],
)
async def test_reply_then_close(
    raw_server_factory: RawServerFactory, behaviour: RawBehaviour, sent: bytes
) -> None:
    server = await raw_server_factory(behaviour)
    reader, writer = await asyncio.open_connection(*server.address)
    assert await asyncio.wait_for(reader.read(), READ_TIMEOUT) == sent  # then EOF
    await close(writer)
    await server.wait_idle()


async def test_garbage(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("garbage")
    reader, writer = await asyncio.open_connection(*server.address)
    assert await read_line(reader) == GARBAGE
    await close(writer)
    await server.wait_idle()


async def test_endless_line(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("endless_line")
    reader, writer = await asyncio.open_connection(*server.address, limit=1_000_000)
    with pytest.raises(ValueError, match="limit"):  # StreamReader's line-length guard
        await read_line(reader)
    await close(writer)
    await server.wait_idle()


async def test_slow_drip(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("slow_drip")
    reader, writer = await asyncio.open_connection(*server.address)
    assert await asyncio.wait_for(reader.readexactly(len(SLOW_DRIP_START) + 1), READ_TIMEOUT)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readline(), QUIET_PERIOD)
    await close(writer)
    await server.wait_idle()


async def test_close_after_banner(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("close_after_banner")
    reader, writer = await asyncio.open_connection(*server.address)
    assert await read_line(reader) == BANNER_OK
    writer.write(b"EHLO client.example\r\n")
    assert await asyncio.wait_for(reader.read(), READ_TIMEOUT) == b""
    await close(writer)


async def test_silent_after_banner(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("silent_after_banner")
    reader, writer = await asyncio.open_connection(*server.address)
    assert (await read_line(reader)).startswith(b"220 ")
    writer.write(b"EHLO client.example\r\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET_PERIOD)
    await close(writer)


async def test_reset_on_connect(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("reset_on_connect")
    reader, writer = await asyncio.open_connection(*server.address)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), READ_TIMEOUT)
    await close(writer)
    assert server.connections_accepted == 1


async def test_held_session(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("held_session")
    loop = asyncio.get_running_loop()
    opened = [await asyncio.open_connection(*server.address) for _ in range(3)]
    started = loop.time()
    # Three sessions held at once, each greeted after the hold, not one after the other.
    greetings = await asyncio.gather(*(read_line(reader) for reader, _ in opened))
    assert greetings == [BANNER_OK] * 3
    assert HELD_SESSION_SECONDS * 0.9 <= loop.time() - started < 2 * HELD_SESSION_SECONDS
    assert server.peak_open_connections == 3
    reader, writer = opened[0]
    writer.write(b"EHLO client.example\r\nQUIT\r\n")
    assert await read_line(reader) == b"250 ok\r\n"
    assert await read_line(reader) == b"221 bye\r\n"
    for _, other in opened:
        await close(other)
    await server.wait_idle()


async def test_held_then_silent(raw_server_factory: RawServerFactory) -> None:
    server = await raw_server_factory("held_then_silent")
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(*server.address)
    assert (await read_line(reader)).startswith(b"220 ")
    assert loop.time() - started >= HELD_SESSION_SECONDS * 0.9
    writer.write(b"EHLO client.example\r\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET_PERIOD)
    await close(writer)
    await server.wait_idle()


async def test_tls_silent_completes_the_handshake_then_says_nothing(
    raw_server_factory: RawServerFactory, ca: trustme.CA
) -> None:
    server = await raw_server_factory("tls_silent")
    reader, writer = await asyncio.open_connection(
        *server.address, ssl=client_ssl_context(ca), server_hostname=LOOPBACK
    )
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET_PERIOD)
    await close(writer)
    await server.wait_idle()


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("tls_alert_unrecognized_name", "TLSV1_UNRECOGNIZED_NAME"),
        ("tls_alert_protocol_version", "TLSV1_ALERT_PROTOCOL_VERSION"),
    ],
)
async def test_tls_alerts_reach_the_client(
    raw_server_factory: RawServerFactory, ca: trustme.CA, behaviour: RawBehaviour, reason: str
) -> None:
    server = await raw_server_factory(behaviour)
    with pytest.raises(ssl.SSLError) as caught:
        await asyncio.wait_for(
            asyncio.open_connection(
                *server.address, ssl=client_ssl_context(ca), server_hostname="mx.example"
            ),
            READ_TIMEOUT,
        )
    assert caught.value.reason == reason
    await server.wait_idle()


async def test_client_cert_required_ends_the_session_after_the_handshake(
    smtp_server_factory: SmtpServerFactory, ca: trustme.CA
) -> None:
    server = await smtp_server_factory(mode="starttls", client_cert_required=True)
    client = smtp_client(server, ca, start_tls=False)
    await client.connect()
    await client.starttls()  # TLS 1.3: complete on the client's side
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await client.ehlo()
    assert server.tls_handshakes_completed == 0
    assert server.server_names == [None]  # an address: no SNI
    client.close()


async def test_refused_port(refused_port: tuple[str, int]) -> None:
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*refused_port)

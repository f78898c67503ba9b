"""The envelope probe and the test message, against a real aiosmtpd server on loopback.

Nothing is delivered unless `send_test_message` asks: the server's DATA count stays 0.
"""

from __future__ import annotations

import email
import email.policy
from typing import Any

import pytest

from smtp_session.tasks.errors import ErrorCategory
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.session import RetryPolicy, open_session
from tests.servers import LOOPBACK, SmtpServer, SmtpServerFactory

USER, PASSWORD = "app@example.test", "correct horse battery"
SENDER, OTHER_SENDER = "app@example.test", "ceo@example.test"
ALICE, BOB = "alice@example.org", "bob@example.org"
SEND_AS_DENIED = (
    "550 5.7.60 SMTP; Client does not have permissions to send as this sender [SendAsDenied]"
)
MAILBOX_FULL = "452 4.2.2 Mailbox full"
FAST_RETRY = RetryPolicy(base=0.01, cap=0.02)


async def probe(server: SmtpServer, **fields: Any) -> Outcome:
    return await open_session(
        {
            "host": LOOPBACK,
            "port": server.port,
            "security": "plain",
            "retries": 0,
            "ehlo_name": "client.example",
            "mail_from": SENDER,
            "rcpt_to": [ALICE, BOB],
            **fields,
        },
        retry_policy=FAST_RETRY,
    )


def replies(outcome: Outcome) -> list[tuple[str, int | None]]:
    assert outcome.envelope is not None
    envelope = outcome.envelope
    return [(r.address, r.code) for r in (envelope.mail_from, *envelope.rcpt_to)]


async def test_an_accepted_envelope_delivers_nothing(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")
    outcome = await probe(server)
    assert outcome.ok, outcome.err_message
    assert replies(outcome) == [(SENDER, 250), (ALICE, 250), (BOB, 250)]
    assert outcome.envelope is not None and outcome.envelope.test_message is None
    assert outcome.envelope.rcpt_to[0].message == "2.1.5 Recipient OK"
    assert server.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET", "QUIT"]
    assert server.messages == []
    assert outcome.timings.mail is not None and outcome.timings.rcpt is not None


async def test_a_refused_sender_is_sender_rejected(smtp_server_factory: SmtpServerFactory) -> None:
    server = await smtp_server_factory(mode="plain", refuse={OTHER_SENDER: SEND_AS_DENIED})
    outcome = await probe(server, mail_from=OTHER_SENDER, retries=2)
    assert (outcome.error, outcome.stage, outcome.retryable, outcome.attempts) == (
        ErrorCategory.SENDER_REJECTED,
        "mail",
        False,
        1,
    )
    assert (outcome.smtp_code, outcome.smtp_enhanced) == (550, "5.7.60")
    assert "SendAsDenied" in outcome.err_message
    assert replies(outcome) == [(OTHER_SENDER, 550), (ALICE, None), (BOB, None)]
    assert "RCPT" not in server.verbs and server.messages == []


async def test_one_refused_recipient_of_two_is_recipient_rejected_naming_each(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain", refuse={ALICE: "550 5.1.1 No such user"})
    outcome = await probe(server, send_test_message=True)
    assert (outcome.error, outcome.stage, outcome.retryable) == (
        ErrorCategory.RECIPIENT_REJECTED,
        "rcpt",
        False,
    )
    assert outcome.err_message == "550 5.1.1 No such user"
    assert replies(outcome) == [(SENDER, 250), (ALICE, 550), (BOB, 250)]
    assert server.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"]  # no DATA
    assert server.messages == []


async def test_a_4xx_refusal_is_retryable(smtp_server_factory: SmtpServerFactory) -> None:
    server = await smtp_server_factory(mode="plain", refuse={BOB: MAILBOX_FULL})
    outcome = await probe(server, retries=1)
    assert (outcome.error, outcome.retryable, outcome.attempts) == (
        ErrorCategory.RECIPIENT_REJECTED,
        True,
        2,
    )


async def test_the_test_message_is_sent_once_and_its_headers_parse(
    smtp_server_factory: SmtpServerFactory, ca_pem_path: str
) -> None:
    server = await smtp_server_factory(mode="starttls", auth={USER: PASSWORD})
    outcome = await open_session(
        {
            "host": LOOPBACK,
            "port": server.port,
            "trust": "portable",
            "ca_file": ca_pem_path,
            "credentials": "app",
            "retries": 0,
            "mail_from": SENDER,
            "rcpt_to": [ALICE, BOB],
            "send_test_message": True,
        },
        environ={"SMTP_SESSION_SECRET_APP": f"{USER}:{PASSWORD}"},
    )
    assert outcome.ok, outcome.err_message
    assert outcome.authenticated
    assert outcome.envelope is not None and outcome.envelope.test_message is not None
    sent = outcome.envelope.test_message
    assert (sent.code, sent.message) == (250, "2.0.0 Ok: queued as Q0001")
    (raw,) = server.messages
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Message-ID"] == sent.message_id
    assert (message["From"], message["To"]) == (SENDER, f"{ALICE}, {BOB}")
    assert "test" in message["Subject"].lower()
    assert message["Date"] is not None
    assert server.verbs[-4:] == ["RCPT", "RCPT", "DATA", "QUIT"]
    assert outcome.timings.data is not None


async def test_an_international_address_needs_smtputf8(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    without = await smtp_server_factory(mode="plain")
    outcome = await probe(without, rcpt_to=["jörg@bücher.example"])
    assert outcome.error == ErrorCategory.RECIPIENT_REJECTED
    assert outcome.err_message == (
        "server does not offer SMTPUTF8, which 'jörg@bücher.example' needs"
    )
    assert "MAIL" not in without.verbs

    offering = await smtp_server_factory(mode="plain", smtputf8=True)
    outcome = await probe(offering, rcpt_to=["jörg@bücher.example"])
    assert outcome.ok, outcome.err_message
    assert any(c.verb == "MAIL" and "SMTPUTF8" in c.arg for c in offering.commands)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rcpt_to": None}, "rcpt_to: is required with mail_from (the envelope probe)"),
        ({"rcpt_to": ["not-an-address"]}, "rcpt_to: #1: 'not-an-address' is not an address"),
        ({"mail_from": "a b@example.test"}, "mail_from: 'a b@example.test': the local part"),
        ({"rcpt_to": [ALICE] * 11}, "rcpt_to: list should have at most 10 items"),
        ({"rcpt_to": [""]}, "rcpt_to: #1: the null path <> is no recipient"),
    ],
)
async def test_addresses_are_checked_before_any_io(
    smtp_server_factory: SmtpServerFactory, fields: dict[str, Any], message: str
) -> None:
    server = await smtp_server_factory(mode="plain")
    outcome = await probe(server, **fields)
    assert outcome.error == ErrorCategory.INVALID_REQUEST
    assert outcome.err_message.startswith(message), outcome.err_message
    assert server.connections_accepted == 0


async def test_the_transcript_shows_the_envelope_and_the_message_by_size(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = await smtp_server_factory(mode="plain")
    outcome = await probe(server, send_test_message=True, transcript=True)
    assert outcome.ok, outcome.err_message
    assert outcome.transcript is not None
    said = [(line.dir, line.line) for line in outcome.transcript]
    assert ("C", f"MAIL FROM:<{SENDER}>") in said
    assert [line for line in said if line[1].startswith("RCPT")] == [
        ("C", f"RCPT TO:<{ALICE}>"),
        ("C", f"RCPT TO:<{BOB}>"),
    ]
    (size,) = (len(message) for message in server.messages)
    data = said.index(("C", "DATA"))
    assert said[data + 1][1].startswith("[the message, ") and said[data + 2][0] == "S"
    assert said[data + 2][1] == "250 2.0.0 Ok: queued as Q0001"
    assert size > 0

"""The envelope probe's results, and the test message it sends when asked.

With `mail_from` and `rcpt_to` a session sends MAIL FROM and each RCPT TO after EHLO
and AUTH, then RSET: the server says whether this account may send from that address to
those recipients, and nothing is delivered. With `send_test_message` it sends DATA
instead of RSET: a short RFC 5322 message built here.
"""

from __future__ import annotations

import email.utils
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8

from pydantic import BaseModel, ConfigDict

TEST_SUBJECT = "SMTP settings test from smtp-session-worker"
TEST_BODY = (
    "This message was sent to test SMTP settings: the server accepted it for delivery.\n"
    "No reply is needed.\n"
)


def needs_smtputf8(address: str) -> bool:
    """RFC 6531: an address that is not ASCII can only go where SMTPUTF8 is offered."""
    return not address.isascii()


class EnvelopeReply(BaseModel):
    """The server's reply to MAIL FROM or to one RCPT TO."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    address: str
    code: int | None = None
    message: str = ""


class SentTestMessage(BaseModel):
    """The test message sent with DATA: its Message-ID and the server's final reply."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    message_id: str
    code: int | None = None
    message: str = ""


class Envelope(BaseModel):
    """What the envelope probe learnt; replies not reached stay without a code."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    mail_from: EnvelopeReply
    rcpt_to: list[EnvelopeReply]
    test_message: SentTestMessage | None = None


def compose_test_message(
    mail_from: str, rcpt_to: list[str], *, message_id_domain: str
) -> tuple[EmailMessage, str]:
    """The test message (Date, Message-ID, From, To, Subject) and its Message-ID."""
    international = needs_smtputf8(mail_from) or any(map(needs_smtputf8, rcpt_to))
    # Headers unfolded (RFC 5322's line limit is 998): a folded Message-ID trips up parsers.
    policy = (SMTPUTF8 if international else SMTP).clone(max_line_length=998)
    message = EmailMessage(policy=policy)
    message_id = email.utils.make_msgid("smtp-session", domain=message_id_domain)
    message["Date"] = email.utils.formatdate(usegmt=True)
    message["Message-ID"] = message_id
    message["From"] = mail_from or "<>"
    message["To"] = ", ".join(rcpt_to)
    message["Subject"] = TEST_SUBJECT
    message.set_content(TEST_BODY)
    return message, message_id

"""The SMTP dialogue of an attempt, as data (request field `transcript: true`).

What swaks prints, for a web backend to display: every command sent (`C`), every reply
line received (`S`) and every TLS handshake (`tls`), timed from the attempt's start (both
connections of a trust fallback).
AUTH payloads are never written: an AUTH command keeps its mechanism, and every line the
client sends while the AUTH exchange goes on is `[redacted]`; the server's lines are
redacted of every form of the secret. Lines and their number are bounded: a dialogue
longer than MAX_LINES keeps its first lines.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from smtp_session.tasks.secrets import REDACTED, Credentials, redact

#: Lines kept per attempt (the fallback's connection included).
MAX_LINES = 200
#: Characters kept per line (an EHLO reply line, a long 5xx text).
MAX_LINE = 512
AUTH_CONTINUE = 334

Direction = Literal["C", "S", "tls"]


class TranscriptLine(BaseModel):
    """One line of the dialogue: seconds since the attempt began, who, what."""

    # A newer worker's extra keys are ignored when an Outcome is read back.
    model_config = ConfigDict(frozen=True, extra="ignore")

    t: float
    dir: Direction
    line: str


def _printable(text: str) -> str:
    cleaned = "".join(ch if ch.isprintable() else "\N{REPLACEMENT CHARACTER}" for ch in text)
    return (
        cleaned if len(cleaned) <= MAX_LINE else cleaned[: MAX_LINE - 1] + "\N{HORIZONTAL ELLIPSIS}"
    )


class Transcript:
    """Collects the lines of one attempt; the server's text is redacted of `credentials`."""

    def __init__(self, credentials: Credentials | None = None) -> None:
        #: Redacted from the server's lines; the session adds an access token it obtains.
        self.credentials = credentials
        self._lines: list[TranscriptLine] = []
        self._started = time.monotonic()
        self._in_auth = False

    def _add(self, direction: Direction, line: str) -> None:
        if len(self._lines) >= MAX_LINES:
            return
        seconds = round(time.monotonic() - self._started, 6)
        self._lines.append(TranscriptLine(t=seconds, dir=direction, line=_printable(line)))

    def sent(self, *args: bytes) -> None:
        """A command the client sent (its arguments as aiosmtplib writes them)."""
        words = [arg.decode("ascii", "replace") for arg in args]
        if self._in_auth:
            line = REDACTED
        elif words and words[0].upper() == "AUTH":
            self._in_auth = True
            line = " ".join([*words[:2], REDACTED] if len(words) > 2 else words)
        else:
            line = " ".join(words)
        self._add("C", line)

    def received(self, code: int, message: str) -> None:
        """A reply: one `S` line per reply line, written as on the wire (`250-…`, `250 …`)."""
        if code != AUTH_CONTINUE:
            self._in_auth = False
        lines = redact(message, self.credentials).split("\n")
        for index, text in enumerate(lines):
            separator = "-" if index < len(lines) - 1 else " "
            self._add("S", f"{code}{separator}{text}".rstrip())

    def tls(self, text: str) -> None:
        """A TLS event: a handshake's result."""
        self._add("tls", text)

    def lines(self) -> list[TranscriptLine]:
        return list(self._lines)

"""The transcript's own rules: what the client sent during AUTH is never written."""

from __future__ import annotations

import base64

from smtp_session.tasks.secrets import REDACTED, Credentials
from smtp_session.tasks.transcript import MAX_LINE, Transcript

USER, PASSWORD = "alice", "s3cret-Passw0rd"


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def written(transcript: Transcript) -> list[tuple[str, str]]:
    return [(line.dir, line.line) for line in transcript.lines()]


def test_auth_login_hides_every_line_until_the_final_reply() -> None:
    transcript = Transcript(Credentials(USER, PASSWORD))
    transcript.sent(b"AUTH", b"LOGIN", b64(USER))
    transcript.received(334, "UGFzc3dvcmQ6")
    transcript.sent(b64(PASSWORD))
    transcript.received(235, "2.7.0 Authentication successful")
    transcript.sent(b"QUIT")
    assert written(transcript) == [
        ("C", f"AUTH LOGIN {REDACTED}"),
        ("S", "334 UGFzc3dvcmQ6"),
        ("C", REDACTED),
        ("S", "235 2.7.0 Authentication successful"),
        ("C", "QUIT"),
    ]


def test_an_auth_command_without_initial_response_keeps_its_mechanism() -> None:
    transcript = Transcript()
    transcript.sent(b"AUTH", b"LOGIN")
    transcript.received(334, "VXNlcm5hbWU6")
    transcript.sent(b64(USER))
    transcript.received(535, "5.7.8 no")
    assert written(transcript)[0] == ("C", "AUTH LOGIN")
    assert written(transcript)[2] == ("C", REDACTED)


def test_server_lines_are_redacted_split_and_cleaned() -> None:
    transcript = Transcript(Credentials(USER, PASSWORD))
    transcript.received(535, f"5.7.8 bad\nyou sent {PASSWORD}\nbye\x1b[31m")
    transcript.received(250, "x" * (2 * MAX_LINE))
    lines = written(transcript)
    assert lines[:3] == [
        ("S", "535-5.7.8 bad"),
        ("S", f"535-you sent {REDACTED}"),
        ("S", "535 bye\N{REPLACEMENT CHARACTER}[31m"),
    ]
    assert len(lines[3][1]) == MAX_LINE and lines[3][1].endswith("\N{HORIZONTAL ELLIPSIS}")

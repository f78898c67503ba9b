"""Text a server sent, made safe to show: the one place where it is cleaned and bounded.

Everything a server chooses — its replies, its EHLO keywords, the names in its
certificate — passes through here before it reaches an Outcome, a log line, a transcript
or a terminal. Non-printable characters become a replacement character: control bytes
(an escape sequence could repaint a terminal) and the lone surrogates that Python makes
of bytes that are not UTF-8 (strict JSON parsers refuse them). Lengths are bounded.
"""

from __future__ import annotations

# Room for a provider's whole refusal, every line of it: Gmail's two-line 535 with its
# help link, Microsoft's 5.7.139 with its link and server stamp (about 240 characters).
MAX_QUOTED_REPLY = 300
#: An EHLO keyword or AUTH mechanism (RFC 5321: at most a few dozen characters), and how
#: many of them an Outcome keeps.
MAX_KEYWORD = 64
MAX_KEYWORDS = 64
ELLIPSIS = "\N{HORIZONTAL ELLIPSIS}"


def printable(text: str, *, replacement: str = "?") -> str:
    """`text` with every character that is not printable replaced."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else replacement for ch in text)


def bounded(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with an ellipsis when longer."""
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS


def quote_reply(text: str) -> str:
    """A server's words made safe for one line: printable, its lines joined, bounded."""
    flat = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    cleaned = printable(flat)
    return cleaned if len(cleaned) <= MAX_QUOTED_REPLY else cleaned[:MAX_QUOTED_REPLY] + ELLIPSIS


def keywords(names: list[str]) -> list[str]:
    """EHLO keywords or AUTH mechanisms as an Outcome lists them: upper-case, bounded."""
    return [bounded(printable(name.upper()), MAX_KEYWORD) for name in names[:MAX_KEYWORDS]]

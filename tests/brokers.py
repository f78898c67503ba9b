"""Servers for the broker tests: an SMTP server whose sessions wait for the test's word.

A session that must end while the broker is away (restarted, killed) needs a server that
answers when the test says so, not after a sleep: :class:`GatedServer` greets only once
its gate is open.
"""

from __future__ import annotations

import asyncio

from smtp_session.tasks.outcome import Outcome
from tests.servers import RawServer


class GatedServer(RawServer):
    """A ``held_session`` server whose sessions begin only once :meth:`open_gate` is called.

    Until then every connection is accepted and left waiting for its greeting; after, each
    session is the held one: greeting after ``HELD_SESSION_SECONDS``, 250 to every command,
    221 to QUIT.
    """

    def __init__(self) -> None:
        super().__init__("held_session")
        self._gate = asyncio.Event()

    def open_gate(self) -> None:
        """Let every waiting session, and every later one, go on."""
        self._gate.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._gate.wait()
        await super()._serve(reader, writer)


def assert_ran_again(outcome: object, silent: RawServer, *, elapsed: float, within: float) -> None:
    """A task whose worker was killed mid-session (on a ``silent_after_banner`` server: it
    greets, so no wrong-mode probe connects too) ran once more, to its end, within `within`
    seconds: a second connection, timed out again."""
    assert elapsed < within, elapsed
    assert silent.connections_accepted == 2
    assert isinstance(outcome, Outcome)
    assert (outcome.error, outcome.attempts) == ("timeout", 1), outcome

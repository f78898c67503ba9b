"""kombu's Redis transport, with one fix: a channel closed after its connection was lost.

kombu 5.7's Redis channel gives up half-way through close() when the connection is gone
(the pending BRPOP reply, or deleting the broadcast queue, raises ConnectionError), and
stays open. Celery's consumer then closes it a second time, after the transport has let
go of its URL: restoring the channel's unacknowledged messages raises AttributeError
(`'NoneType' object has no attribute 'hostname'`), which Celery does not count as a
connection error, and the worker stops ("Unrecoverable error"). Any Redis restart while
tasks run did that. Here the first close() that fails marks the channel closed: the
messages it held stay in Redis's unacked set, where they are acknowledged by the tasks
still running or handed out again after the visibility timeout.

Installed under kombu's own transport names (`redis`, `rediss`, the `redis+socket` form),
so that every Redis URL of this process uses it; the worker and the CLI import it.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

REDIS_SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    """A Redis channel whose close() ends closed, even when the connection is gone."""

    def close(self) -> None:
        try:
            super().close()  # type: ignore[no-untyped-call]  # kombu is untyped
        except self.connection_errors:
            self.closed = True  # a second close() has nothing left it could do
            raise  # kombu's callers ignore connection errors on close


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


def install() -> None:
    """Make this transport the one behind every Redis URL in this process."""
    for scheme in REDIS_SCHEMES:
        TRANSPORT_ALIASES[scheme] = f"{__name__}:{Transport.__name__}"

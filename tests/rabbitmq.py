"""A real RabbitMQ (Debian's ``rabbitmq-server``) for the tests: loopback only, own node.

Everything is the test's own: the node name, the Erlang cookie (``HOME``), the mnesia and
log folders, the AMQP and distribution ports, and the ``epmd`` the node registers with,
which this module starts itself (so it is stopped by its PID, never by name). Nothing of
the Debian service is used: not its configuration, its cookie, its ports, nor its epmd.

RabbitMQ cannot be handed a listening socket, and its distribution port cannot be 0: the
ports are drawn at random from the ephemeral range, and a start that finds one taken
(epmd exits, the node's boot fails) is tried again with new ones.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import IO

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's, without the su wrapper
EPMD = "epmd"
#: What the node logs once it accepts AMQP connections, and when its boot failed.
READY_LINE = "Server startup complete"
FAILED_LINE = "BOOT FAILED"
#: A start takes 3-10 s on a busy two-core machine; a stop about 2 s.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: Starts tried before giving up on finding free ports.
START_TRIES = 3
PORTS = range(20_000, 60_000)


def _free_looking_port() -> int:
    """A random port nothing listens on now (the start itself proves it stays free)."""
    while True:
        port = random.choice(PORTS)
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.connect(("127.0.0.1", port))
            continue  # someone answers there
        return port


class RabbitMQServer:
    """``rabbitmq-server`` on 127.0.0.1 with its own epmd; restartable with its data."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.node = f"smtptest-{secrets.token_hex(4)}@localhost"
        self.home = folder / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        (folder / "enabled_plugins").write_text("[].\n")
        self.amqp_port = 0
        self.dist_port = 0
        self.epmd_port = 0
        self._epmd: subprocess.Popen[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _env(self) -> dict[str, str]:
        base = {
            name: value for name, value in os.environ.items() if not name.startswith("RABBITMQ_")
        }
        folder = str(self.folder)
        return base | {
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Distribution on loopback too, not on every interface.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": f"{folder}/mnesia",
            "RABBITMQ_LOG_BASE": f"{folder}/log",
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{folder}/enabled_plugins",
            # Not the Debian service's files under /etc/rabbitmq.
            "RABBITMQ_CONF_ENV_FILE": f"{folder}/rabbitmq-env.conf",
            "RABBITMQ_CONFIG_FILE": f"{folder}/rabbitmq",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{folder}/advanced.config",
        }

    def start(self) -> None:
        """Start (again, with the same node and data when restarted); return once ready."""
        assert self._process is None, "already running"
        first = self.amqp_port == 0
        for _ in range(START_TRIES):
            if self._epmd is None:
                self._start_epmd()
            if first:
                self.amqp_port, self.dist_port = _free_looking_port(), _free_looking_port()
            if self._start_node():
                return
            if not first:  # a restart keeps its ports: the clients know them
                break
        raise RuntimeError(f"rabbitmq-server did not start: see {self.folder / 'rabbitmq.log'}")

    def _start_epmd(self) -> None:
        for _ in range(START_TRIES):
            self.epmd_port = _free_looking_port()
            epmd = subprocess.Popen(
                [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_listening(self.epmd_port, epmd):
                self._epmd = epmd
                return
            epmd.kill()
            epmd.wait(STOP_TIMEOUT)
        raise RuntimeError("epmd did not start")

    @staticmethod
    def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> bool:
        """Whether `process` listens on `port` (False once it exited: the port was taken)."""
        for _ in range(100):
            with socket.socket() as probe, contextlib.suppress(OSError):
                probe.connect(("127.0.0.1", port))
                return True
            try:
                process.wait(0.05)  # epmd exits at once when it cannot bind
            except subprocess.TimeoutExpired:
                continue
            return False
        return False

    def _start_node(self) -> bool:
        self._log = (self.folder / "rabbitmq.log").open("ab")
        process = subprocess.Popen(
            [RABBITMQ_SERVER],
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._process = process
        outcome: list[bool] = []
        done = threading.Event()
        self._reader = threading.Thread(
            target=self._copy_log, args=(process, outcome, done), name="rabbitmq-log", daemon=True
        )
        self._reader.start()
        if done.wait(START_TIMEOUT) and outcome == [True]:
            return True
        self.stop()
        return False

    def _copy_log(
        self, process: subprocess.Popen[bytes], outcome: list[bool], done: threading.Event
    ) -> None:
        log = self._log
        assert process.stdout is not None and log is not None
        with process.stdout:  # the reader owns the pipe: closed at its end, not by the GC
            for line in process.stdout:
                log.write(line)
                log.flush()
                ready, failed = READY_LINE.encode() in line, FAILED_LINE.encode() in line
                if not done.is_set() and (ready or failed):
                    outcome.append(ready)
                    done.set()
        done.set()  # it exited

    def stop(self) -> None:
        """Stop the node (SIGTERM: a clean shutdown, messages kept on disk); idempotent."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        if self._reader is not None:  # it ends at the pipe's end, closing it
            self._reader.join(STOP_TIMEOUT)
            self._reader = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the node and its epmd, each by its PID."""
        self.stop()
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            epmd.terminate()
            epmd.wait(STOP_TIMEOUT)

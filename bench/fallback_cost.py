"""Cost of the trust fallback, with and without the per-host trust memory.

A STARTTLS server whose certificate chains to a throwaway CA that only the operator's CA
file holds (``SMTP_SESSION_CA_FILE``: ``open_session(extra_ca_file=...)``, added to the
portable store of every session): native trust (the operating system's store, through
truststore) refuses it, the portable store accepts it. The requests name no ``ca_file``
of their own: a request's ``ca_file`` is trusted at once, with no fallback to measure.
Three clients take turns, round by round:

* ``auto``: trust=auto, no memory: every check pays a failed native handshake, then
  opens a second connection in portable mode;
* ``auto+memory``: trust=auto with a ``TrustMemory`` (as each worker process keeps):
  after the first check, straight to portable;
* ``portable``: trust=portable, the floor: one connection, no fallback.

Then, as a second phase, what native trust costs when it *succeeds* (a server with a
publicly trusted certificate, the common case of trust=auto): the CA is appended to a
copy of the system bundle named by ``SSL_CERT_FILE``, and ``native`` alternates with
``portable``. On Linux truststore reloads the system store into its context at every
handshake; this phase shows what that costs.

Reported: milliseconds and client CPU per check, and the ratios.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    EHLO_NAME,
    LOOPBACK,
    cpu_seconds,
    make_pki,
    print_table,
    ratio,
    server_process,
    write_result,
)
from smtp_session.monitoring.logging import configure_logging
from smtp_session.tasks.outcome import Outcome
from smtp_session.tasks.session import open_session
from smtp_session.tasks.trust import forget_contexts
from smtp_session.tasks.trust_memory import TrustMemory

NAME = "fallback_cost"
VARIANTS = ("auto", "auto+memory", "portable")
NATIVE_VARIANTS = ("native", "portable")
ROUNDS = 6
CHECKS_PER_ROUND = 30
NATIVE_ROUNDS = 4
WARMUP = 5
SESSION_TIMEOUT = 10.0
DEBIAN_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _expected(variant: str, outcome: Outcome) -> bool:
    """Verified in the mode the variant means: after the fallback with plain trust=auto,
    straight to portable from the memory (once the warm-up taught it the server)."""
    tls = outcome.tls
    if not outcome.ok or tls is None:
        return False
    if variant == "native":
        return tls.trust == "native" and not tls.fallback
    return tls.trust == "portable" and (tls.fallback, tls.remembered) == (
        variant == "auto",
        variant == "auto+memory",
    )


def system_bundle_with(ca_file: Path, folder: Path) -> Path:
    """A copy of the system CA bundle with the throwaway CA appended."""
    system = ssl.get_default_verify_paths().cafile or DEBIAN_BUNDLE
    bundle = folder / "system-plus-ca.pem"
    bundle.write_bytes(Path(system).read_bytes() + b"\n" + ca_file.read_bytes())
    return bundle


class Interleaved:
    """Clients that take turns round by round, in a rotating order."""

    def __init__(
        self,
        fields: dict[str, dict[str, Any]],
        memories: dict[str, TrustMemory | None],
        *,
        extra_ca_file: str,
    ) -> None:
        self.fields = fields
        self.memories = memories
        self.extra_ca_file = extra_ca_file  # the operator's CAs, for every client
        self.variants = tuple(fields)
        self.wall = dict.fromkeys(self.variants, 0.0)
        self.cpu = dict.fromkeys(self.variants, 0.0)
        self.unexpected = dict.fromkeys(self.variants, 0)
        self.per_round: dict[str, list[float]] = {variant: [] for variant in self.variants}
        self.checks = 0

    async def _run(self, variant: str, count: int) -> tuple[float, float, int]:
        unexpected = 0
        started_cpu, started = cpu_seconds(), time.perf_counter()
        for _ in range(count):
            outcome = await open_session(
                dict(self.fields[variant]),
                trust_memory=self.memories.get(variant),
                extra_ca_file=self.extra_ca_file,
            )
            unexpected += not _expected(variant, outcome)
        return time.perf_counter() - started, cpu_seconds() - started_cpu, unexpected

    async def run(self, rounds: int, per_round: int) -> None:
        for variant in self.variants:  # warm-up; also teaches a memory its one host
            await self._run(variant, WARMUP)
        for number in range(rounds):
            shift = number % len(self.variants)
            for variant in self.variants[shift:] + self.variants[:shift]:
                seconds, cpu_used, unexpected = await self._run(variant, per_round)
                self.wall[variant] += seconds
                self.cpu[variant] += cpu_used
                self.unexpected[variant] += unexpected
                self.per_round[variant].append(seconds)
        self.checks = rounds * per_round

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            variant: {
                "checks": self.checks,
                "ms_per_check": round(1000 * self.wall[variant] / self.checks, 3),
                "cpu_ms_per_check": round(1000 * self.cpu[variant] / self.checks, 3),
                "unexpected_outcomes": self.unexpected[variant],
            }
            for variant in self.variants
        }

    def ratio(self, slower: str, faster: str) -> tuple[float, float]:
        """(aggregate, median of per-round) time ratio of two clients."""
        paired = [
            a / b for a, b in zip(self.per_round[slower], self.per_round[faster], strict=True)
        ]
        return (
            round(ratio(self.wall[slower], self.wall[faster]), 3),
            round(statistics.median(paired), 3),
        )


def _fields(port: int, trust: str) -> dict[str, Any]:
    return {
        "host": LOOPBACK,
        "port": port,
        "security": "starttls",
        "trust": trust,
        "ehlo_name": EHLO_NAME,
        "retries": 0,
        "timeout": SESSION_TIMEOUT,
    }


async def measure_fallback(port: int, ca_file: str) -> dict[str, Any]:
    runs = Interleaved(
        {
            "auto": _fields(port, "auto"),
            "auto+memory": _fields(port, "auto"),
            "portable": _fields(port, "portable"),
        },
        {"auto+memory": TrustMemory()},
        extra_ca_file=ca_file,
    )
    await runs.run(ROUNDS, CHECKS_PER_ROUND)
    variants = runs.summary()
    without, without_median = runs.ratio("auto", "auto+memory")
    memory_vs_portable, _ = runs.ratio("auto+memory", "portable")
    return {
        "variants": variants,
        "ratio_auto_to_memory": without,
        "ratio_auto_to_memory_median_round": without_median,
        "ratio_memory_to_portable": memory_vs_portable,
        "native_failure_ms": round(
            variants["auto"]["ms_per_check"] - variants["auto+memory"]["ms_per_check"], 3
        ),
    }


async def measure_native(port: int, ca_file: str) -> dict[str, Any]:
    runs = Interleaved(
        {
            "native": _fields(port, "native"),
            "portable": _fields(port, "portable"),
        },
        {},
        extra_ca_file=ca_file,
    )
    await runs.run(NATIVE_ROUNDS, CHECKS_PER_ROUND)
    variants = runs.summary()
    aggregate, median = runs.ratio("native", "portable")
    return {
        "variants": variants,
        "ratio_native_to_portable": aggregate,
        "ratio_native_to_portable_median_round": median,
        "native_extra_cpu_ms": round(
            variants["native"]["cpu_ms_per_check"] - variants["portable"]["cpu_ms_per_check"], 3
        ),
    }


def _table(title: str, variants: dict[str, dict[str, Any]], floor: str) -> None:
    print_table(
        title,
        ["client", "ms/check", "cpu ms/check", f"vs {floor}", "unexpected"],
        [
            [
                variant,
                data["ms_per_check"],
                data["cpu_ms_per_check"],
                round(ratio(data["ms_per_check"], variants[floor]["ms_per_check"]), 3),
                data["unexpected_outcomes"],
            ]
            for variant, data in variants.items()
        ],
    )


def report(fallback: dict[str, Any], native: dict[str, Any]) -> None:
    _table(
        f"trust fallback, STARTTLS, {ROUNDS} interleaved rounds of {CHECKS_PER_ROUND} checks",
        fallback["variants"],
        "portable",
    )
    print(
        f"\nwithout / with trust memory: {fallback['ratio_auto_to_memory']:.3f}x the time "
        f"(median round {fallback['ratio_auto_to_memory_median_round']:.3f}); "
        f"the failed native attempt costs {fallback['native_failure_ms']:.2f} ms per check; "
        f"with memory / plain portable: {fallback['ratio_memory_to_portable']:.3f}"
    )
    _table(
        f"native trust that succeeds (system bundle + CA via SSL_CERT_FILE), "
        f"{NATIVE_ROUNDS} interleaved rounds",
        native["variants"],
        "portable",
    )
    print(
        f"\nnative / portable: {native['ratio_native_to_portable']:.3f}x the time "
        f"(median round {native['ratio_native_to_portable_median_round']:.3f}); "
        f"native costs {native['native_extra_cpu_ms']:.2f} ms more CPU per check"
    )


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-fallback-") as name,
        open(os.devnull, "w") as sink,
    ):
        folder = Path(name)
        pki = make_pki(folder)
        configure_logging("json", level=logging.WARNING, stream=sink)
        args = ["--starttls", "1", "--chain", str(pki.server_chain)]
        with server_process(args, folder / "server.log") as server:
            port = server.ports["starttls"][0]
            fallback = asyncio.run(measure_fallback(port, str(pki.ca_file)))
            # Last, since it changes what native trust accepts in this process for good.
            os.environ["SSL_CERT_FILE"] = str(system_bundle_with(pki.ca_file, folder))
            forget_contexts()
            native = asyncio.run(measure_native(port, str(pki.ca_file)))
    report(fallback, native)
    write_result(
        NAME,
        {
            "rounds": ROUNDS,
            "checks_per_round": CHECKS_PER_ROUND,
            "fallback": fallback,
            "native_success": native,
        },
    )


if __name__ == "__main__":
    main()

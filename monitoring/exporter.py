"""The one /metrics endpoint of a worker process.

A worker is one process whose sessions share one event loop, so prometheus_client's
process-wide registry holds every session's values (and the process's own: memory, CPU,
open files), and /metrics serves it as it is.
"""

from __future__ import annotations

from http.server import HTTPServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


def start_exporter(address: str, port: int, registry: CollectorRegistry = REGISTRY) -> HTTPServer:
    """Serve /metrics on address:port (0: any free port; read it from the result)."""
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server

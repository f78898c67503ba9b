"""A real OAuth2 token endpoint over HTTPS on loopback, for the XOAUTH2 tests.

The standard library's HTTP server in a thread, with a trustme certificate. It issues a
fresh access token per grant and tells `on_issue` (the SMTP server's accepted tokens), so
that only the tokens it issued work; it can rotate refresh tokens, revoke them, answer
5xx, or hang.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs

import trustme

from tests.servers import LOOPBACK, server_ssl_context

Behaviour = Literal["normal", "hang", "error_500"]
#: How long a hanging answer waits at most (the tests' deadlines are far shorter).
HANG_SECONDS = 30.0


class TokenEndpoint:
    """`POST /token` for the refresh_token and client_credentials grants (RFC 6749 §6, §4.4)."""

    def __init__(
        self,
        cert: trustme.LeafCert,
        *,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        on_issue: Callable[[str], None],
        expires_in: int = 3600,
        rotate: bool = False,
    ) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self.refresh_tokens = {refresh_token}
        self.on_issue = on_issue
        self.expires_in = expires_in
        self.rotate = rotate
        self.behaviour: Behaviour = "normal"
        #: Every form posted, in order; and every access and refresh token issued.
        self.requests: list[dict[str, str]] = []
        self.issued: list[str] = []
        self._released = threading.Event()
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler_class())
        context = server_ssl_context(cert)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self._server.server_address[1]}/token"

    def start(self) -> TokenEndpoint:
        self._thread.start()
        return self

    def close(self) -> None:
        self._released.set()  # a hanging answer ends now
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def revoke(self) -> None:
        self.refresh_tokens.clear()

    def answer(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.requests.append(form)
        if (form.get("client_id"), form.get("client_secret")) != (
            self.client_id,
            self.client_secret,
        ):
            return 401, {"error": "invalid_client", "error_description": "Unknown client."}
        grant = form.get("grant_type")
        if grant == "refresh_token" and form.get("refresh_token") not in self.refresh_tokens:
            return 400, {
                "error": "invalid_grant",
                "error_description": "Token has been expired or revoked.",
            }
        if grant not in ("refresh_token", "client_credentials"):
            return 400, {"error": "unsupported_grant_type"}
        access_token = "ya29." + secrets.token_urlsafe(24)
        self.issued.append(access_token)
        self.on_issue(access_token)
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
        }
        if grant == "refresh_token" and self.rotate:
            rotated = "1//rt-" + secrets.token_urlsafe(24)
            self.refresh_tokens = {rotated}
            self.issued.append(rotated)
            body["refresh_token"] = rotated
        return 200, body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = parse_qs(self.rfile.read(length).decode())
                form = {key: values[0] for key, values in raw.items()}
                if endpoint.behaviour == "hang":
                    endpoint.requests.append(form)
                    endpoint._released.wait(HANG_SECONDS)
                    return
                body: dict[str, Any]
                if endpoint.behaviour == "error_500":
                    endpoint.requests.append(form)
                    status, body = 500, {}
                else:
                    status, body = endpoint.answer(form)
                data = json.dumps(body).encode() if body else b"<html>oops</html>"
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body else "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the tests read `requests`

        return Handler

"""Whether a TLS server asked for a client certificate: evidence `ssl` does not report.

This client never presents a certificate. A server that requires one ends the session
right after the handshake, and its alert ("certificate required") is often all that says
why, and often lost: with TLS 1.3 the client's side of the handshake is complete before
the server has read the (empty) certificate, so the alert comes at the next read, and a
server that closes with our next command unread resets the connection, which discards
it; asyncio's own server side never sends it. What always remains is the server's
CertificateRequest in the handshake, which `ssl` reads but does not report.

CPython's TLS message callback (`SSLContext._msg_callback`: underscored, but a hook of
the standard library since 3.8 and unchanged since) sees each handshake message as it is
read; `watch` installs it on a context, and the TLS objects of that context that were
asked for a certificate are remembered (weakly) until they are gone. A context that is a
wrapper (truststore's, where the native verifier is not OpenSSL) does not pass the hook
on: there, only the alert is evidence.
"""

from __future__ import annotations

import ssl
import weakref

# RFC 8446 §5.1 ContentType handshake, §4 HandshakeType certificate_request (TLS 1.2 too).
_HANDSHAKE = 22
_CERTIFICATE_REQUEST = 13

_asked: weakref.WeakSet[ssl.SSLObject] = weakref.WeakSet()


def _on_message(
    tls: ssl.SSLObject,
    direction: str,
    _version: object,
    content_type: int,
    message_type: int,
    _data: bytes,
) -> None:
    if direction == "read" and content_type == _HANDSHAKE and message_type == _CERTIFICATE_REQUEST:
        _asked.add(tls)


def watch(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context`, noting from now on which of its connections were asked for a certificate."""
    context._msg_callback = _on_message  # type: ignore[attr-defined]  # see the module's text
    return context


def asked_for_certificate(tls: ssl.SSLObject | None) -> bool:
    """Whether the server of this TLS object asked for a client certificate."""
    return tls is not None and tls in _asked

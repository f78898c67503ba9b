"""Why a refused chain is untrusted, told from the certificates the server presented.

OpenSSL reports a server that did not send its intermediate and a CA that nobody trusts
alike ("unable to get local issuer certificate"). The chain the server presented (read
on the report-only connection) and the portable trust store tell the cases apart: the
chain is followed from the server's certificate, issuer by issuer, by name and signature;
where it ends says what is wrong. A chain whose end a trusted CA did sign is refused for
another reason (a purpose, a weak key, the native store only...): not diagnosed here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import AuthorityInformationAccessOID

from smtp_session.tasks.server_text import quote_reply
from smtp_session.tasks.trust import UNREADABLE


class ChainFault(StrEnum):
    """Where a refused chain ends."""

    SELF_SIGNED = "self_signed"  # the server's certificate alone, signed by its own key
    UNTRUSTED_ROOT = "untrusted_root"  # in a self-signed root that no store holds
    INCOMPLETE = "incomplete"  # in the server's certificate: its issuer not sent, not trusted
    UNTRUSTED_INTERMEDIATE = "untrusted_intermediate"  # in a sent CA whose issuer is unknown


# {subject}: the certificate the chain ends in; {issuer}: its issuer; {aia}: where its
# issuer's certificate is published (" (caIssuers URL)"), or nothing; {add}: how this
# request adds a CA to its trust store.
_MESSAGES = {
    ChainFault.SELF_SIGNED: "the server's certificate {subject} is self-signed: no CA issued it",
    ChainFault.UNTRUSTED_ROOT: (
        "the chain ends in the self-signed root {subject}, which no trust store holds"
    ),
    ChainFault.INCOMPLETE: (
        "incomplete chain: the server did not send {issuer}, the issuer of its "
        "certificate{aia}, and no trust store holds it"
    ),
    ChainFault.UNTRUSTED_INTERMEDIATE: (
        "the chain ends in the intermediate {subject}, whose issuer {issuer}{aia} "
        "no trust store holds"
    ),
}
_HINTS = {
    ChainFault.SELF_SIGNED: (
        "give the server a certificate from a CA, or trust this one itself: add it {add}"
    ),
    ChainFault.UNTRUSTED_ROOT: (
        "if {subject} is your organisation's CA, add it {add}; otherwise the server needs "
        "a certificate from a CA that clients trust"
    ),
    ChainFault.INCOMPLETE: (
        "fix the server's chain: it must send the intermediate certificate(s) after its "
        "own (a full-chain file); if {issuer} is your organisation's root CA, add it {add} "
        "instead"
    ),
    ChainFault.UNTRUSTED_INTERMEDIATE: (
        "if {issuer} is your organisation's root CA, add it {add}; otherwise fix the "
        "server's chain: its intermediate leads to no root that clients trust"
    ),
}


@dataclass(frozen=True)
class ChainProblem:
    """What is wrong with a refused chain, with the names (made printable) to say it."""

    fault: ChainFault
    subject: str  # the certificate the chain ends in, quoted
    issuer: str  # its issuer, quoted
    ca_issuers: str | None = None  # the AIA caIssuers URL of that certificate

    def _fields(self) -> dict[str, str]:
        aia = f" (caIssuers {self.ca_issuers})" if self.ca_issuers else ""
        return {"subject": self.subject, "issuer": self.issuer, "aia": aia}

    @property
    def message(self) -> str:
        return _MESSAGES[self.fault].format(**self._fields())

    def hint(self, add: str) -> str:
        """The fix; `add` says how the request trusts a CA ("with ca_file")."""
        return _HINTS[self.fault].format(**self._fields(), add=add)


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` names and signed `certificate`."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature):
        # Another name; a key or signature algorithm cryptography does not use; another key.
        return False
    return True


def _path(presented: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """From the server's certificate up through the presented ones, issuer by issuer
    (in whatever order the server sent them), to a self-signed one or a missing issuer."""
    path, rest = [presented[0]], list(presented[1:])
    while not _issued_by(path[-1], path[-1]):
        issuer = next((candidate for candidate in rest if _issued_by(path[-1], candidate)), None)
        if issuer is None:
            break
        path.append(issuer)
        rest.remove(issuer)
    return path


def _ca_issuers(certificate: x509.Certificate) -> str | None:
    """The AIA caIssuers URL, an http one first (AD CS lists ldap: before it)."""
    try:
        access = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except (x509.ExtensionNotFound, *UNREADABLE):  # none, or extensions that do not parse
        return None
    urls = [
        str(description.access_location.value)
        for description in access.value
        if description.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        and isinstance(description.access_location, x509.UniformResourceIdentifier)
    ]
    url = next((url for url in urls if url.startswith("http")), urls[0] if urls else None)
    return quote_reply(url) if url else None


def _quoted(name: x509.Name) -> str:
    return f'"{quote_reply(name.rfc4514_string())}"'


def diagnose(
    presented: Sequence[x509.Certificate], anchors: Iterable[x509.Certificate]
) -> ChainProblem | None:
    """What is wrong with the chain a server presented, against the trusted `anchors`.

    None when nothing was presented, or when a trusted CA signed the chain's end: then
    the chain is complete and something else refused it.
    """
    if not presented:
        return None
    path = _path(presented)
    end = path[-1]
    if any(_issued_by(end, anchor) for anchor in anchors):
        return None
    if _issued_by(end, end):
        fault = ChainFault.SELF_SIGNED if len(path) == 1 else ChainFault.UNTRUSTED_ROOT
        return ChainProblem(fault, _quoted(end.subject), _quoted(end.issuer))
    fault = ChainFault.INCOMPLETE if len(path) == 1 else ChainFault.UNTRUSTED_INTERMEDIATE
    return ChainProblem(fault, _quoted(end.subject), _quoted(end.issuer), _ca_issuers(end))

"""Name lookups that a deadline can abandon.

The system resolver (getaddrinfo, getfqdn: /etc/hosts, nsswitch, then DNS, as every other
tool on the host resolves) blocks a thread. In asyncio's default executor an abandoned
lookup would still hold `asyncio.run()` at exit until the resolver gives up, whatever the
request's timeout; a few daemon threads of our own run them instead, in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from aiohappyeyeballs import AddrInfoType, start_connection

AddressInfo = tuple[int, int, int, str, tuple[Any, ...]]
LOCAL_NAME_TIMEOUT = 2.0  # then EHLO says the connection's address literal instead
#: Names no public DNS answers for, which strict servers refuse in EHLO: RFC 6761's
#: localhost, invalid and test, RFC 6762's local (mDNS), RFC 8375's home.arpa, ICANN's
#: private-use internal, and the localdomain of many /etc/hosts files.
NON_PUBLIC_SUFFIXES = frozenset(
    {"localhost", "localdomain", "local", "internal", "home.arpa", "invalid", "test"}
)
#: Threads that run the system resolver's lookups, at most (see _LookupThreads).
LOOKUP_THREADS = 16
#: RFC 8305 §5 "Connection Attempt Delay": its recommended 250 ms before the next address.
HAPPY_EYEBALLS_DELAY = 0.25

_T = TypeVar("_T")
_local_name: list[str] = []


class _LookupThreads:
    """A few daemon threads that run the system resolver's blocking calls, in turn.

    Daemon threads: an abandoned lookup never holds the process at exit (the standard
    library's thread pools join theirs). A bounded number: a sweep of thousands of names
    with a slow resolver makes lookups wait their turn, inside their own deadlines, rather
    than start a thread each.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._started < self.size:
                self._started += 1
                threading.Thread(target=self._work, name="smtp-session-lookup", daemon=True).start()
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            self._jobs.get()()


_lookups = _LookupThreads(LOOKUP_THREADS)


async def in_lookup_thread(func: Callable[..., _T], *args: Any) -> _T:
    """Run a blocking lookup on a lookup thread; cancelling the await abandons it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the caller stopped waiting (its deadline passed)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # result is a _T here

    def run() -> None:
        if future.done():
            return  # abandoned while it waited its turn: not worth asking
        result: _T | None = None
        error: BaseException | None = None
        try:
            result = func(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller, who classifies it
            error = exc
        # A closed loop means nobody waits for this answer any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    _lookups.submit(run)
    return await future


def is_ip_literal(text: str) -> bool:
    """Whether `text` is an IP address (a scoped IPv6 one too), not a name."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def literal_address(host: str, port: int) -> list[AddressInfo] | None:
    """An IP literal's socket address, no resolver needed (None for a name)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    if "%" in host:
        return None  # a scoped IPv6 address: let getaddrinfo turn the scope into an index
    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]


async def resolve(host: str, port: int) -> list[AddressInfo]:
    """The TCP addresses of host:port, in the resolver's order; raises socket.gaierror."""
    literal = literal_address(host, port)
    if literal is not None:
        return literal
    found = await in_lookup_thread(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    return [(int(f), int(k), p, name, tuple(a)) for f, k, p, name, a in found]


def is_public_fqdn(name: str) -> bool:
    """Whether `name` is a fully qualified DNS name that public DNS may know (for EHLO)."""
    labels = name.lower().rstrip(".").split(".")
    if len(labels) < 2 or literal_address(name, 0) is not None:
        return False
    return not {labels[-1], ".".join(labels[-2:])} & NON_PUBLIC_SUFFIXES


async def local_fqdn() -> str | None:
    """This machine's FQDN for EHLO, looked up once per process within a bound; None when
    it has none that strict servers accept (socket.getfqdn() says `localhost` on many)."""
    if not _local_name:
        try:
            async with asyncio.timeout(LOCAL_NAME_TIMEOUT):
                name = await in_lookup_thread(socket.getfqdn)
        except TimeoutError:
            name = socket.gethostname()
        _local_name.append(name)
    return _local_name[0] if is_public_fqdn(_local_name[0]) else None


def address_literal(address: str) -> str:
    """EHLO's stand-in for a name (RFC 5321 §4.1.3): `[192.0.2.10]`, `[IPv6:2001:db8::1]`."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # no zone in a literal
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip}]" if ip.version == 4 else f"[IPv6:{ip}]"


async def connect_first(
    addresses: list[AddressInfo], deadline: float, tried: list[str]
) -> socket.socket:
    """A non-blocking socket connected to the first of `addresses` to answer by `deadline`.

    Happy eyeballs (RFC 8305, by aiohappyeyeballs): IPv6 and IPv4 interleaved, a new
    attempt every HAPPY_EYEBALLS_DELAY s (at once when one fails), earlier attempts kept
    going, so a slow address is not abandoned for a dead one; every loser is closed. Only
    these addresses are connected to: nothing is looked up again (the egress policy
    checked exactly these). Each address is appended to `tried` as its attempt starts;
    the one connected to is moved to the end, so `tried[-1]` names it, or on failure the
    last address tried. Raises TimeoutError at `deadline`, else the attempts' OSError.
    """
    if not addresses:
        raise OSError("no address to connect to")
    started: dict[socket.socket, str] = {}  # each attempt's socket → its address

    def new_socket(info: AddrInfoType) -> socket.socket:
        family, kind, proto, _name, sockaddr = info
        tried.append(str(sockaddr[0]))
        sock = socket.socket(family, kind, proto)
        started[sock] = tried[-1]
        return sock

    async with asyncio.timeout_at(deadline):
        sock = await start_connection(
            addresses,
            happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
            interleave=1,
            socket_factory=new_socket,
        )
    winner = started[sock]
    tried.remove(winner)
    tried.append(winner)
    return sock

"""Per-host memory of which trust mode last verified, so a host that always needs the
portable store does not pay for a failing native handshake on every check (for a
time-to-live at a time)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_CAPACITY = 4096
#: How long a server is remembered. Then native trust is tried again: a chain the server
#: has fixed is noticed, and one still refused is a real fallback again, counted in
#: smtp_session_tls_fallback_total at least this often (the SmtpSessionTrustFallback
#: alert looks one hour back).
DEFAULT_TTL = 15 * 60.0

_Key = tuple[str, int]  # host, port


class TrustMemory:
    """A bounded LRU set of the servers that needed the portable store, each for `ttl` s."""

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not ttl > 0:
            raise ValueError("ttl must be more than 0 seconds")
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._expiries: OrderedDict[_Key, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiries)

    def needs_portable(self, key: _Key) -> bool:
        """True when, less than `ttl` s ago, native trust refused this server and portable
        verified it."""
        expires = self._expiries.get(key)
        if expires is None:
            return False
        if self._clock() >= expires:
            del self._expiries[key]
            return False
        self._expiries.move_to_end(key)
        return True

    def remember(self, key: _Key, mode: str | None) -> None:
        """Record the mode that verified (portable), or forget the server (native, failure).

        A server still remembered keeps its expiry: it is learnt anew only when native
        trust refuses it again, after the `ttl`.
        """
        if mode != "portable":
            self._expiries.pop(key, None)
            return
        if not self.needs_portable(key):
            self._expiries[key] = self._clock() + self.ttl
            while len(self._expiries) > self.capacity:
                self._expiries.popitem(last=False)

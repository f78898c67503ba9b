"""Per-host memory of which trust mode last verified, so a host that always needs the
portable store does not pay for a failing native handshake on every check."""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_CAPACITY = 4096

_Key = tuple[str, int, str | None, str | None]  # host, port, ca_file, ca_pem's digest


class TrustMemory:
    """A bounded LRU map of (host, port, ca_file) to the mode that last verified."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._modes: OrderedDict[_Key, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._modes)

    def needs_portable(self, key: _Key) -> bool:
        """True when the last verified handshake with this server needed the portable store."""
        if key not in self._modes:
            return False
        self._modes.move_to_end(key)
        return self._modes[key] == "portable"

    def remember(self, key: _Key, mode: str | None) -> None:
        """Record the mode that verified (portable), or forget the server (native, failure)."""
        if mode != "portable":
            self._modes.pop(key, None)
            return
        self._modes[key] = mode
        self._modes.move_to_end(key)
        while len(self._modes) > self.capacity:
            self._modes.popitem(last=False)

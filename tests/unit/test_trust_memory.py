"""The trust memory is a bounded LRU."""

from __future__ import annotations

import pytest

from smtp_session.tasks.trust_memory import TrustMemory


def test_remembers_portable_and_forgets_on_native() -> None:
    memory = TrustMemory()
    key = ("smtp.example.com", 587, None, None)
    assert not memory.needs_portable(key)
    memory.remember(key, "portable")
    assert memory.needs_portable(key)
    memory.remember(key, "native")
    assert not memory.needs_portable(key)
    assert len(memory) == 0


def test_capacity_evicts_the_least_recently_used() -> None:
    memory = TrustMemory(capacity=2)
    a, b, c = (("a", 25, None, None), ("b", 25, None, None), ("c", 25, None, None))
    memory.remember(a, "portable")
    memory.remember(b, "portable")
    assert memory.needs_portable(a)  # a is now the most recent
    memory.remember(c, "portable")
    assert len(memory) == 2
    assert memory.needs_portable(a)
    assert not memory.needs_portable(b)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        TrustMemory(capacity=0)

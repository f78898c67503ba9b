"""The trust memory is a bounded LRU whose entries live for a time-to-live."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from smtp_session.tasks.trust_memory import DEFAULT_TTL, TrustMemory

KEY = ("smtp.example.com", 587)
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_remembers_portable_and_forgets_on_native() -> None:
    memory = TrustMemory()
    assert not memory.needs_portable(KEY)
    memory.remember(KEY, "portable")
    assert memory.needs_portable(KEY)
    memory.remember(KEY, "native")
    assert not memory.needs_portable(KEY)
    assert len(memory) == 0


def test_capacity_evicts_the_least_recently_used() -> None:
    memory = TrustMemory(capacity=2)
    a, b, c = (("a", 25), ("b", 25), ("c", 25))
    memory.remember(a, "portable")
    memory.remember(b, "portable")
    assert memory.needs_portable(a)  # a is now the most recent
    memory.remember(c, "portable")
    assert len(memory) == 2
    assert memory.needs_portable(a)
    assert not memory.needs_portable(b)


def test_an_entry_lives_for_the_ttl() -> None:
    clock = FakeClock()
    memory = TrustMemory(ttl=60.0, clock=clock)
    memory.remember(KEY, "portable")
    clock.now += 59.9
    assert memory.needs_portable(KEY)
    clock.now += 0.1
    assert not memory.needs_portable(KEY)
    assert len(memory) == 0


def test_remembering_a_remembered_server_does_not_extend_its_ttl() -> None:
    # Sessions that start in portable and verify there say "portable" again: only a new
    # native refusal, after the TTL, teaches the server anew.
    clock = FakeClock()
    memory = TrustMemory(ttl=60.0, clock=clock)
    memory.remember(KEY, "portable")
    clock.now += 50.0
    memory.remember(KEY, "portable")
    clock.now += 10.0
    assert not memory.needs_portable(KEY)
    memory.remember(KEY, "portable")  # the fallback ran again: learnt anew
    clock.now += 59.0
    assert memory.needs_portable(KEY)


def test_the_default_ttl_lets_the_fallback_alert_see_a_fallback() -> None:
    # While a server is remembered no fallback is counted; SmtpSessionTrustFallback looks
    # one window back, so a still-refused chain must show a real fallback within it.
    groups = yaml.safe_load(RULES.read_text())["groups"]
    (rule,) = [
        rule
        for group in groups
        for rule in group["rules"]
        if rule.get("alert") == "SmtpSessionTrustFallback"
    ]
    window = re.search(r"smtp_session_tls_fallback_total\{[^}]*\}\[(\d+)([mh])\]", rule["expr"])
    assert window is not None, rule["expr"]
    seconds = int(window[1]) * {"m": 60, "h": 3600}[window[2]]
    assert TrustMemory().ttl == DEFAULT_TTL
    assert seconds > DEFAULT_TTL


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        TrustMemory(capacity=0)


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan")])
def test_ttl_must_be_positive(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        TrustMemory(ttl=ttl)

"""A configured target may not ask for more time than the worker allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtp_session.worker.targets import InvalidTargets, check_target_timeouts, load_targets


def test_a_target_timeout_above_the_workers_maximum_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "targets.toml"
    path.write_text(
        '[[targets]]\nname = "ok"\nhost = "smtp.example.com"\ntimeout = 30\n'
        '[[targets]]\nname = "slow"\ndomain = "example.com"\ntimeout = 45\n'
    )
    targets = load_targets(path)
    check_target_timeouts(targets, 45)
    with pytest.raises(InvalidTargets, match=r"target 'slow': timeout: must be at most 30 s"):
        check_target_timeouts(targets, 30)

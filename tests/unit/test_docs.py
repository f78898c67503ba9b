"""docs/ is the contract users read: checked against the code it describes.

Each page must name every item the code has (error categories, request fields, settings,
metrics, log events, task names, commands), the outcome's JSON Schema must be the one the
model makes, and no link in the repository may point outside it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from smtp_session.monitoring.metrics import SessionMetrics
from smtp_session.tasks.contract import CHECK_TARGET_TASK, OPEN_TASK, SWEEP_TASK
from smtp_session.tasks.errors import ErrorCategory
from smtp_session.tasks.outcome import Outcome, json_schema
from smtp_session.tasks.provider_replies import REPLY_HINTS
from smtp_session.tasks.request import SessionRequest
from smtp_session.worker.cli import main
from smtp_session.worker.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
SOURCES = ("tasks", "worker", "monitoring")
#: A log event name where the code writes one: log.info("metrics.listening", …), the
#: session events' _log_outcome("session.result", …), the signal-safe {"event": …}.
LOG_EVENT = re.compile(r'(?:(?<![\w.])log\.\w+\(|_log_outcome\(|"event": )\s*"([a-z_]+\.[a-z_]+)"')
#: A Markdown link's target, and a path that leaves the repository.
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
OUTSIDE = re.compile(r"\.\./shared|shared/DESIGN\.md")


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def table_keys(text: str) -> list[str]:
    """The backticked first cells of every Markdown table row in `text`."""
    return re.findall(r"^\| `([^`]+)`", text, flags=re.MULTILINE)


def test_the_checked_in_schema_is_the_one_the_model_makes() -> None:
    checked_in = json.loads(page("outcome.schema.json"))
    assert checked_in == json_schema(), "run: smtp-session schema > docs/outcome.schema.json"
    assert "schema" in checked_in["properties"] and "schema_" not in checked_in["properties"]


def test_every_error_category_is_in_the_table_once() -> None:
    keys = table_keys(page("errors.md"))
    assert sorted(category.value for category in ErrorCategory) == sorted(
        key for key in keys if key in {category.value for category in ErrorCategory}
    )


def test_every_provider_reply_row_is_documented_with_its_hint() -> None:
    text = page("errors.md")
    assert [row.name for row in REPLY_HINTS] == [
        key for key in table_keys(text) if key in {row.name for row in REPLY_HINTS}
    ]
    assert [row.name for row in REPLY_HINTS if row.hint not in text] == []


def test_every_request_field_is_documented() -> None:
    keys = set(table_keys(page("request.md")))
    assert set(SessionRequest.model_fields) <= keys


def test_every_setting_is_documented() -> None:
    text = page("settings.md")
    missing = [
        ENV_PREFIX + name.upper()
        for name in Settings.model_fields
        if f"`{ENV_PREFIX}{name.upper()}`" not in text
    ]
    assert missing == []


def test_every_metric_is_documented() -> None:
    registry = CollectorRegistry()
    SessionMetrics(registry)
    names = {family.name for family in registry.collect()}
    documented = set(table_keys(page("metrics.md")))
    # prometheus_client names a counter family without its _total suffix.
    assert {name if name in documented else f"{name}_total" for name in names} <= documented


def test_every_log_event_the_code_writes_is_documented() -> None:
    written = {
        event
        for folder in SOURCES
        for path in (REPO / folder).rglob("*.py")
        for event in LOG_EVENT.findall(path.read_text(encoding="utf-8"))
    }
    assert {"session.attempt", "session.result", "metrics.listening", "celery.notice"} <= written
    assert written <= set(table_keys(page("logs.md")))


def test_every_task_and_command_is_documented() -> None:
    tasks = page("tasks.md")
    for name in (OPEN_TASK, CHECK_TARGET_TASK, SWEEP_TASK):
        assert f"`{name}`" in tasks
    cli = page("cli.md")
    for command in main.commands:
        assert f"smtp-session {command}" in cli, command
    for code in ("0", "1", "2", "3", "130"):
        assert re.search(rf"^\| `?{code}`? \|", cli, flags=re.MULTILINE), code


def tracked_text_files() -> list[Path]:
    git = shutil.which("git")
    assert git is not None, "git lists the repository's files"
    listed = subprocess.run(
        [git, "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [
        REPO / name
        for name in listed
        if name.endswith((".md", ".py", ".toml", ".yaml", ".yml", ".service", ".env"))
        or Path(name).name in {"Makefile", "Dockerfile"}
    ]


@pytest.mark.parametrize("path", tracked_text_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_no_link_points_outside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not OUTSIDE.search(text), f"{path}: points at shared/, which is not in the repository"
    if path.suffix == ".md":
        for target in LINK.findall(text):
            if "://" in target:
                continue  # a web address, not a file of ours
            assert (path.parent / target).resolve().is_relative_to(REPO), target
            assert (path.parent / target).exists(), f"{path}: broken link {target}"


def _keys(data: object) -> object:
    """The nested key structure of a JSON value (dicts only; lists by their first item)."""
    if isinstance(data, dict):
        return {key: _keys(value) for key, value in data.items()}
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return [_keys(data[0])]
    return None


def test_the_outcome_examples_are_whole_outcomes() -> None:
    # "Every field is always present": each example shows every field the model writes.
    examples = re.findall(r"```json\n(\{\n  \"schema\": 1,.*?\n\})\n```", page("outcome.md"), re.S)
    assert len(examples) >= 2
    for text in examples:
        data = json.loads(text)
        assert _keys(Outcome.from_dict(data).to_dict()) == _keys(data)

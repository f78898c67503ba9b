"""The targets file: a valid file becomes Targets; every bad one is refused by name.

Each refusal must let an operator find the line to fix: the message names the file, the
target (by name, or by position when it has no usable name) and the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from smtp_session.tasks.request import SessionRequest
from smtp_session.tasks.sweep import DomainCheck
from smtp_session.worker.targets import (
    DEFAULT_INTERVAL,
    InvalidTargets,
    Target,
    load_targets,
    parse_targets,
)

VALID = """
[defaults]
timeout = 7.5
retries = 1
security = "starttls"
trust = "portable"

[[targets]]
name = "gmail-submission"
host = "smtp.gmail.com"
port = 587
credentials = "gmail"
interval = 300

[[targets]]
name = "relay"
host = "relay.example.test"
security = "tls"
retries = 0

[[targets]]
name = "example-mx"
domain = "example.test"
"""


def write(tmp_path: Path, text: str, name: str = "targets.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path) -> str:
    """The message of the InvalidTargets that loading ``path`` raises."""
    with pytest.raises(InvalidTargets) as caught:
        load_targets(path)
    return str(caught.value)


# ----------------------------------------------------------------------------- valid files


@pytest.fixture
def targets(tmp_path: Path) -> dict[str, Target]:
    loaded = load_targets(write(tmp_path, VALID))
    assert [target.name for target in loaded] == ["gmail-submission", "relay", "example-mx"]
    return {target.name: target for target in loaded}


def test_host_target_gets_defaults_and_its_own_fields(targets: dict[str, Target]) -> None:
    gmail = targets["gmail-submission"]
    assert gmail.domain is None
    assert gmail.interval == 300.0
    assert gmail.request == SessionRequest(
        host="smtp.gmail.com",
        port=587,
        security="starttls",
        trust="portable",
        timeout=7.5,
        retries=1,
        credentials="gmail",
        target="gmail-submission",
    )


def test_target_field_overrides_the_default(targets: dict[str, Target]) -> None:
    relay = targets["relay"]
    assert relay.request.security == "tls"
    assert relay.request.retries == 0
    assert relay.request.timeout == 7.5  # not overridden: still the default
    assert relay.request.effective_port == 465
    assert relay.request.target == "relay"


def test_interval_defaults_to_sixty_seconds(targets: dict[str, Target]) -> None:
    assert DEFAULT_INTERVAL == 60.0
    assert targets["relay"].interval == 60.0
    assert targets["example-mx"].interval == 60.0


def test_interval_from_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [defaults]
        interval = 15
        [[targets]]
        name = "a"
        host = "a.example.test"
        [[targets]]
        name = "b"
        host = "b.example.test"
        interval = 2.5
        """,
    )
    assert [target.interval for target in load_targets(path)] == [15.0, 2.5]


def test_domain_target_keeps_its_fields_for_each_discovered_host(
    targets: dict[str, Target],
) -> None:
    mx = targets["example-mx"]
    assert mx.domain == "example.test"
    assert mx.request.target == "example-mx"
    assert "host" not in mx.fields
    item = mx.sweep_item()
    assert isinstance(item, DomainCheck)
    assert item.domain == "example.test"
    # [defaults] security is left out: each discovered host's comes from discovery.
    assert dict(item.fields) == {
        "trust": "portable",
        "timeout": 7.5,
        "retries": 1,
        "target": "example-mx",
    }


def test_defaults_port_and_security_do_not_apply_to_domain_targets(tmp_path: Path) -> None:
    # Discovery finds each host's port (SRV) and security (_submissions: implicit TLS);
    # a [defaults] value would override them for every host. Host targets still get them.
    path = write(
        tmp_path,
        """
        [defaults]
        port = 587
        security = "tls"
        timeout = 4
        [[targets]]
        name = "host"
        host = "a.example.test"
        [[targets]]
        name = "dom"
        domain = "example.test"
        """,
    )
    host, domain = load_targets(path)
    assert (host.request.port, host.request.security) == (587, "tls")
    item = domain.sweep_item()
    assert isinstance(item, DomainCheck)
    assert dict(item.fields) == {"timeout": 4, "target": "dom"}


def test_a_domain_targets_own_port_and_security_are_kept(tmp_path: Path) -> None:
    # The operator's explicit choice for this domain wins over what discovery finds.
    path = write(
        tmp_path,
        """
        [defaults]
        port = 587
        [[targets]]
        name = "dom"
        domain = "example.test"
        port = 2525
        security = "starttls"
        """,
    )
    (domain,) = load_targets(path)
    item = domain.sweep_item()
    assert isinstance(item, DomainCheck)
    assert dict(item.fields) == {"port": 2525, "security": "starttls", "target": "dom"}


def test_require_comes_from_the_target_then_defaults_then_any(tmp_path: Path) -> None:
    text = (
        '[defaults]\nrequire = "all"\n'
        '[[targets]]\nname = "own"\ndomain = "a.example.test"\nrequire = "any"\n'
        '[[targets]]\nname = "default"\ndomain = "b.example.test"\n'
        '[[targets]]\nname = "host"\nhost = "c.example.test"\n'
    )
    own, default, host = load_targets(write(tmp_path, text))
    assert (own.require, default.require) == ("any", "all")
    items = [own.sweep_item(), default.sweep_item()]
    assert all(isinstance(item, DomainCheck) for item in items)
    assert [
        (item.require, "require" in item.fields) for item in items if isinstance(item, DomainCheck)
    ] == [
        ("any", False),
        ("all", False),
    ]
    assert isinstance(host.sweep_item(), SessionRequest)  # [defaults] require: no matter
    (bare,) = parse_targets({"targets": [{"name": "d", "domain": "d.example.test"}]})
    assert bare.require == "any"


def test_host_target_sweeps_its_request(targets: dict[str, Target]) -> None:
    target = next(t for t in targets.values() if t.domain is None)
    assert target.sweep_item() is target.request


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty-file"),
        pytest.param("# nothing yet\n", id="comments-only"),
        pytest.param("[defaults]\ntimeout = 3\n", id="defaults-only"),
        pytest.param("targets = []\n", id="empty-array"),
    ],
)
def test_a_file_without_targets_is_refused_by_name(tmp_path: Path, text: str) -> None:
    # A sweep of nothing would say "0 ok, 0 failed" and exit 0; a worker would check nothing.
    path = write(tmp_path, text)
    message = refusal(path)
    assert message.startswith(f"{path}: no targets"), message
    assert "[[targets]]" in message, message


def test_defaults_are_optional(tmp_path: Path) -> None:
    assert [target.name for target in load_targets(write(tmp_path, ONE_GOOD))] == ["good"]


def test_a_combination_in_defaults_is_judged_with_each_targets_own_fields(
    tmp_path: Path,
) -> None:
    # security = "plain" with credentials is refused, but every target here overrides it:
    # [defaults] is not to blame for a combination that no target has.
    path = write(
        tmp_path,
        '[defaults]\nsecurity = "plain"\ncredentials = "relay"\n'
        '[[targets]]\nname = "a"\nhost = "a.example.test"\nsecurity = "starttls"\n',
    )
    assert load_targets(path)[0].request.credentials == "relay"
    path = write(tmp_path, path.read_text() + '[[targets]]\nname = "b"\nhost = "b.example.test"\n')
    message = refusal(path)
    assert message.startswith(f"{path}: target 'b': credentials: need TLS"), message


def test_parse_targets_names_its_source() -> None:
    document = {"targets": [{"name": "a", "host": "a.example.test", "port": 0}]}
    with pytest.raises(InvalidTargets, match=r"^inline: target 'a': port: "):
        parse_targets(document, source="inline")


def test_invalid_targets_is_a_value_error() -> None:
    # Callers that only know "bad configuration" catch ValueError.
    assert issubclass(InvalidTargets, ValueError)


# ----------------------------------------------------------------------------- invalid files

ONE_GOOD = """
[[targets]]
name = "good"
host = "good.example.test"
"""


@pytest.mark.parametrize(
    ("text", "target", "field", "problem"),
    [
        pytest.param(
            ONE_GOOD + ONE_GOOD,
            "target 'good'",
            "name",
            "used twice",
            id="duplicate-names",
        ),
        pytest.param(
            '[[targets]]\nname = "lost"\nport = 587\n',
            "target 'lost'",
            "host",
            "required",
            id="neither-host-nor-domain",
        ),
        pytest.param(
            '[[targets]]\nname = "both"\nhost = "a.example.test"\ndomain = "example.test"\n',
            "target 'both'",
            "host",
            "domain",
            id="both-host-and-domain",
        ),
        pytest.param(
            ONE_GOOD + '[[targets]]\nname = "bad-port"\nhost = "b.example.test"\nport = 70000\n',
            "target 'bad-port'",
            "port",
            "less than or equal to 65535",
            id="port-too-big",
        ),
        pytest.param(
            '[[targets]]\nname = "p"\nhost = "b.example.test"\nport = "587"\n',
            "target 'p'",
            "port",
            "integer",
            id="port-as-string",
        ),
        pytest.param(
            '[[targets]]\nname = "typo"\nhost = "b.example.test"\npasword = "x"\n',
            "target 'typo'",
            "pasword",
            "unknown field",
            id="unknown-field",
        ),
        pytest.param(
            '[[targets]]\nname = "i"\nhost = "b.example.test"\ninterval = 0\n',
            "target 'i'",
            "interval",
            ">= 1",
            id="interval-zero",
        ),
        pytest.param(
            '[[targets]]\nname = "r"\ndomain = "example.test"\nrequire = "most"\n',
            "target 'r'",
            "require",
            "must be 'any' or 'all'",
            id="require-unknown",
        ),
        pytest.param(
            '[[targets]]\nname = "r"\nhost = "b.example.test"\nrequire = "all"\n',
            "target 'r'",
            "require",
            "only for domain targets",
            id="require-on-a-host-target",
        ),
        pytest.param(
            '[[targets]]\nname = "i"\nhost = "b.example.test"\ninterval = "x"\n',
            "target 'i'",
            "interval",
            ">= 1",
            id="interval-string",
        ),
        pytest.param(
            '[[targets]]\nname = "i"\nhost = "b.example.test"\ninterval = true\n',
            "target 'i'",
            "interval",
            ">= 1",
            id="interval-bool",
        ),
        pytest.param(
            '[[targets]]\nname = "i"\nhost = "b.example.test"\ninterval = 1e14\n',
            "target 'i'",
            "interval",
            "<= 31622400 (a year)",
            id="interval-beyond-a-year",
        ),
        pytest.param(
            '[[targets]]\nname = "i"\nhost = "b.example.test"\ninterval = -5\n',
            "target 'i'",
            "interval",
            ">= 1",
            id="interval-negative",
        ),
        pytest.param(
            '[[targets]]\nname = "i"\nhost = "b.example.test"\ninterval = nan\n',
            "target 'i'",
            "interval",
            ">= 1",
            id="interval-nan",
        ),
        pytest.param(
            '[[targets]]\nname = "i"\nhost = "b.example.test"\ninterval = inf\n',
            "target 'i'",
            "interval",
            ">= 1",
            id="interval-inf",
        ),
        pytest.param(
            ONE_GOOD + '[[targets]]\nhost = "nameless.example.test"\n',
            "target #2",
            "name: missing",
            "needs a unique name",
            id="missing-name-by-index",
        ),
        pytest.param(
            '[[targets]]\nname = 7\nhost = "b.example.test"\n',
            "target #1",
            "name",
            "letters, digits",
            id="name-not-a-string-by-index",
        ),
        pytest.param(
            '[[targets]]\nname = "has space"\nhost = "b.example.test"\n',
            "target #1",
            "name",
            "letters, digits",
            id="bad-name-by-index",
        ),
        pytest.param(
            '[[targets]]\nname = "d"\ndomain = 42\n',
            "target 'd'",
            "domain",
            "string",
            id="domain-not-a-string",
        ),
        pytest.param(
            '[[targets]]\nname = "d"\ndomain = "exa mple.test"\n',
            "target 'd'",
            "domain",
            "spaces",
            id="domain-not-a-valid-name",
        ),
        pytest.param(
            '[[targets]]\nname = "h"\nhost = "bad host.example.test"\n',
            "target 'h'",
            "host",
            "spaces",
            id="host-not-a-valid-name",
        ),
        pytest.param(
            '[defaults]\nsecurity = "plain"\n[[targets]]\nname = "c"\nhost = "c.example.test"\n'
            'credentials = "relay"\n',
            "target 'c'",
            "credentials",
            "need TLS",
            id="default-that-conflicts-with-the-targets-own-field",
        ),
    ],
)
def test_invalid_target_is_named(
    tmp_path: Path, text: str, target: str, field: str, problem: str
) -> None:
    path = write(tmp_path, text)
    message = refusal(path)
    assert message.startswith(f"{path}: {target}: "), message
    assert field in message.removeprefix(f"{path}: {target}: "), message
    assert problem in message, message


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        pytest.param('defaults = "fast"\n' + ONE_GOOD, "defaults", "table", id="defaults-string"),
        pytest.param("defaults = [1, 2]\n", "defaults", "table", id="defaults-array"),
        pytest.param("[defaults]\ninterval = 0\n", "defaults: interval", ">= 1", id="default-iv"),
        # A bad default is the default's fault, not the first target's that uses it.
        pytest.param(
            '[defaults]\ntimeout = "ten"\n' + ONE_GOOD,
            "defaults: timeout: ",
            "number",
            id="default-timeout-not-a-number",
        ),
        pytest.param(
            "[defaults]\nretries = -1\n" + ONE_GOOD,
            "defaults: retries: ",
            "greater than or equal to 0",
            id="default-retries-negative",
        ),
        pytest.param(
            '[defaults]\nname = "shared"\n' + ONE_GOOD,
            "defaults: name: ",
            "unknown field",
            id="default-name-is-not-a-default",
        ),
        pytest.param(
            "[defaults]\ntimeout = 0\n",
            "defaults: timeout: ",
            "greater than 0",
            id="bad-default-before-no-targets",
        ),
        pytest.param(
            "[defaults]\nrequire = 1\n" + ONE_GOOD,
            "defaults: require: ",
            "must be 'any' or 'all'",
            id="default-require-not-a-choice",
        ),
        pytest.param('targets = "x"\n', "targets", "array of tables", id="targets-not-array"),
        pytest.param("targets = [1]\n", "target #1", "table", id="target-not-a-table"),
        pytest.param("[target]\nx = 1\n", "unknown top-level key 'target'", "", id="unknown-key"),
        pytest.param(
            ONE_GOOD + "[schedule]\nx = 1\n",
            "unknown top-level key 'schedule'",
            "",
            id="unknown-key-after-targets",
        ),
    ],
)
def test_invalid_file_level_is_named(tmp_path: Path, text: str, where: str, problem: str) -> None:
    path = write(tmp_path, text)
    message = refusal(path)
    assert message.startswith(f"{path}: {where}"), message
    assert problem in message, message


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[[targets]]\nname = "a"\nhost = smtp.example.test\n')
    message = refusal(path)
    assert message.startswith(f"{path}: not valid TOML"), message
    assert "line 3" in message, message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "targets.toml"
    message = refusal(path)
    assert message.startswith(f"{path}: cannot be read"), message
    assert "No such file or directory" in message, message


def test_directory_instead_of_file_is_named(tmp_path: Path) -> None:
    message = refusal(tmp_path)
    assert message.startswith(f"{tmp_path}: cannot be read"), message


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "targets.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert refusal(path).startswith(f"{path}: not valid TOML")


def test_first_problem_wins_and_nothing_is_half_loaded(tmp_path: Path) -> None:
    # A bad third target refuses the whole file: a schedule is never built from part of it.
    path = write(
        tmp_path,
        ONE_GOOD + '[[targets]]\nname = "b"\nhost = "b.example.test"\n'
        '[[targets]]\nname = "c"\nhost = "c.example.test"\nsecurity = "ssl"\n',
    )
    message = refusal(path)
    assert message.startswith(f"{path}: target 'c': security: "), message

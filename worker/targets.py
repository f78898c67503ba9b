"""The targets file (TOML): named SMTP servers to health-check on a schedule."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

from smtp_session.tasks.errors import InvalidRequest, SessionWorkerError
from smtp_session.tasks.request import NAME_PATTERN, SessionRequest, parse_request
from smtp_session.tasks.summary import REQUIRE_DEFAULT, Require
from smtp_session.tasks.sweep import DomainCheck, SweepItem

DEFAULT_INTERVAL = 60.0
MIN_INTERVAL = 1.0
MAX_INTERVAL = 366 * 24 * 3600.0  # a year: beyond it a schedule overflows datetime
_TARGET_ONLY = ("name", "interval", "domain", "require")
_REQUIRE_VALUES = get_args(Require)
#: What discovery finds for each host of a domain target (the SRV port and the security
#: its service implies): a [defaults] value must not override it; the target's own may.
_DISCOVERED = ("port", "security")
#: Stands in for the host while a [defaults] field is validated on its own.
_DEFAULTS_HOST = "defaults.invalid"


class InvalidTargets(SessionWorkerError, ValueError):
    """The targets file cannot be used; the message names the file, target and field."""


@dataclass(frozen=True)
class Target:
    """One configured target: a request template, checked every `interval` seconds.

    `domain` targets have no host of their own: their hosts are discovered (SRV, then MX)
    when they are checked, and `request` holds the domain as a placeholder host. The port
    and security of each discovered host come from discovery unless the target sets its
    own: `[defaults]` `port` and `security` do not apply to domain targets.
    """

    name: str
    interval: float
    request: SessionRequest
    domain: str | None = None
    fields: dict[str, Any] = field(default_factory=dict, compare=False)
    require: Require = REQUIRE_DEFAULT

    def sweep_item(self) -> SweepItem:
        """What a sweep checks for this target: its request, or its domain to discover."""
        if self.domain is not None:
            return DomainCheck(self.domain, self.fields, self.require)
        return self.request


def _require(where: str, value: object) -> Require:
    if isinstance(value, str) and value in _REQUIRE_VALUES:
        return cast(Require, value)
    choices = " or ".join(repr(allowed) for allowed in _REQUIRE_VALUES)
    raise InvalidTargets(
        f"{where}: require: must be {choices} (the servers of a domain that must be ok)"
    )


def _interval(where: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not MIN_INTERVAL <= value <= MAX_INTERVAL
    ):
        raise InvalidTargets(
            f"{where}: interval: must be a number of seconds >= {MIN_INTERVAL:g} "
            f"and <= {MAX_INTERVAL:.0f} (a year)"
        )
    return float(value)


def _target(index: int, raw: object, defaults: Mapping[str, Any], source: str) -> Target:
    where = f"{source}: target #{index}"
    if not isinstance(raw, dict):
        raise InvalidTargets(f"{where}: must be a table ([[targets]])")
    name = raw.get("name")
    if name is None:
        raise InvalidTargets(f"{where}: name: missing (each [[targets]] needs a unique name)")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidTargets(f"{where}: name: must be 1-128 letters, digits, '_', '-' or '.'")
    where = f"{source}: target {name!r}"
    domain = raw.get("domain")
    if domain is not None and "host" in raw:
        raise InvalidTargets(f"{where}: give either host or domain, not both")
    if domain is None and "host" not in raw:
        raise InvalidTargets(f"{where}: host: is required (or domain, to discover the hosts)")
    if domain is not None and not isinstance(domain, str):
        raise InvalidTargets(f"{where}: domain: must be a string")
    interval = _interval(where, raw.get("interval", defaults.get("interval", DEFAULT_INTERVAL)))
    if domain is None and "require" in raw:
        raise InvalidTargets(
            f"{where}: require: only for domain targets (how many discovered servers must be ok)"
        )
    require = _require(where, raw.get("require", defaults.get("require", REQUIRE_DEFAULT)))
    own = ("interval", "require")
    skipped = (*own, *_DISCOVERED) if domain is not None else own
    fields = {key: value for key, value in defaults.items() if key not in skipped}
    fields |= {key: value for key, value in raw.items() if key not in _TARGET_ONLY}
    fields["target"] = name
    if domain is not None:
        fields["host"] = domain
    try:
        request = parse_request(fields)
    except InvalidRequest as exc:
        # A domain stands in the host field only to validate the rest: name it as written.
        field_name = "domain" if domain is not None and exc.field == "host" else exc.field
        raise InvalidTargets(f"{where}: {field_name}: {exc.problem}") from None
    if domain is not None:
        del fields["host"]
    return Target(
        name=name, interval=interval, request=request, domain=domain, fields=fields, require=require
    )


def _check_defaults(defaults: Mapping[str, Any], source: str) -> None:
    """Blame a bad [defaults] value on [defaults], not on the first target that uses it.

    Each field is validated on its own: a combination (credentials with security plain)
    may be fixed by each target's own fields, so it is judged per target.
    """
    where = f"{source}: defaults"
    for key, value in defaults.items():
        if key == "interval":
            _interval(where, value)
            continue
        if key == "require":
            _require(where, value)
            continue
        try:
            parse_request({"host": _DEFAULTS_HOST, key: value})
        except InvalidRequest as exc:
            raise InvalidTargets(f"{where}: {exc.field}: {exc.problem}") from None


def parse_targets(document: Mapping[str, Any], *, source: str = "targets") -> list[Target]:
    """Validate a parsed targets document; raises InvalidTargets."""
    unknown = set(document) - {"defaults", "targets"}
    if unknown:
        raise InvalidTargets(f"{source}: unknown top-level key {sorted(unknown)[0]!r}")
    defaults = document.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InvalidTargets(f"{source}: defaults: must be a table ([defaults])")
    _check_defaults(defaults, source)
    raw_targets = document.get("targets", [])
    if not isinstance(raw_targets, list):
        raise InvalidTargets(f"{source}: targets: must be an array of tables ([[targets]])")
    if not raw_targets:
        raise InvalidTargets(f"{source}: no targets: add at least one [[targets]] table")
    targets: list[Target] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_targets, start=1):
        target = _target(index, raw, defaults, source)
        if target.name in seen:
            raise InvalidTargets(f"{source}: target {target.name!r}: name is used twice")
        seen.add(target.name)
        targets.append(target)
    return targets


def load_targets(path: Path) -> list[Target]:
    """Read and validate a targets file; raises InvalidTargets naming the problem."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise InvalidTargets(f"{path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidTargets(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise InvalidTargets(f"{path}: not valid TOML (not UTF-8 text)") from None
    return parse_targets(document, source=str(path))


def check_target_timeouts(targets: list[Target], max_timeout: float) -> None:
    """Every configured target's timeout within the worker's maximum; raises InvalidTargets."""
    for target in targets:
        item = target.sweep_item()
        value = item.timeout if isinstance(item, SessionRequest) else item.fields.get("timeout")
        timeout = float(value) if isinstance(value, int | float) else None
        if timeout is not None and timeout > max_timeout:
            raise InvalidTargets(
                f"target {target.name!r}: timeout: must be at most {max_timeout:g} s "
                "(SMTP_SESSION_MAX_TIMEOUT)"
            )

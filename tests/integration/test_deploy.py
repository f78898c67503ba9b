"""deploy/: the files an operator runs, checked with what these machines have.

Docker, Compose and Kubernetes do not run here, and systemd is not PID 1. What is checked:

* every YAML and JSON file under deploy/ parses; compose.yaml follows the Compose
  specification (its JSON schema, as vendored by check-jsonschema);
* the Kubernetes manifests validate against the Kubernetes schemas, offline and strict
  (kubernetes-validate); Prometheus configs pass ``promtool check config``;
* the systemd units pass ``systemd-analyze verify`` and ``systemd-analyze security``;
* no drift between the image and the tests: every command line in the Dockerfile, compose,
  the manifests and the units is parsed out of those files and run here against the
  installed CLI; the image's own command starts a real worker on a real Redis, and the
  image's HEALTHCHECK and the Kubernetes probes, run as written, find it; beat's command
  starts; the systemd units' command lines, on one machine, pass beat's checks to the
  worker through the embedded broker in their shared state directory;
* every environment variable given to the worker is a setting it knows, with a value it
  accepts; the example targets file loads with the worker's own loader.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, cast

import dockerfile  # type: ignore[import-not-found]  # compiled, ships no type information
import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed marker
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from smtp_session.tasks.secrets import ENV_PREFIX as SECRET_PREFIX
from smtp_session.tasks.secrets import SECRETS_DIR_VARIABLE
from smtp_session.worker.cli import EXIT_INVALID
from smtp_session.worker.settings import DEFAULT_METRICS_PORT, ENV_PREFIX, Settings, load_settings
from smtp_session.worker.targets import load_targets, parse_targets
from tests.integration.conftest import RedisServer, WorkerProcess
from tests.prometheus import JOB, PROMTOOL_BINARY

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
SCRAPE_JOB = KUBERNETES / "prometheus" / "scrape-job.yml"
SYSTEMD = DEPLOY / "systemd"
UNITS = (SYSTEMD / "smtp-session-worker.service", SYSTEMD / "smtp-session-beat.service")
ENV_FILE = SYSTEMD / "smtp-session.env"
TARGETS_EXAMPLE = DEPLOY / "targets.example.toml"
GRAFANA = DEPLOY / "grafana"

BIN = Path(sys.executable).parent
CHECK_JSONSCHEMA = BIN / "check-jsonschema"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
SHELL = "/bin/sh"

#: The oldest Kubernetes the manifests are checked against (kubernetes-validate ships
#: schemas from 1.25 on); they use nothing newer.
KUBERNETES_VERSION = "1.30"
#: Our programs, as the image puts them on PATH and the units name them.
PROGRAMS = frozenset({"smtp-session", "celery"})
#: Where the systemd units expect the virtual environment (their install notes say so).
UNIT_BIN = PurePosixPath("/opt/smtp-session/bin")
#: /tmp inside a container, where the image's Python may write temporary files.
CONTAINER_TMP = PurePosixPath("/tmp")  # noqa: S108 - a path in the container, not here
#: Environment of the image that is Python's or the shell's, not the worker's settings.
RUNTIME_VARIABLES = frozenset({"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"})
#: systemd-analyze security's exposure scale: 0 (locked down) to 10 (unprotected); the
#: units score 1.3 ("OK") with systemd 252. Its --threshold is given in tenths.
MAX_EXPOSURE = 2.0
#: Bound on one command's --help (an import of smtp_session.worker.app included).
HELP_TIMEOUT = 60.0
#: Bound on a worker's or beat's start (imports, broker connection, pool start).
START_TIMEOUT = 60.0
HTTP_TIMEOUT = 5.0

_SETTING_NAMES = frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)
_SECRET_NAME = re.compile(re.escape(SECRET_PREFIX) + r"[A-Z0-9_]+")
_SMTP_SESSION_TOKEN = re.compile(r"\bSMTP_SESSION_[A-Z0-9_]*")


def known_variable(name: str) -> bool:
    """A variable the worker reads: a setting, a secret, the secrets dir."""
    return (
        name in _SETTING_NAMES
        or name == SECRETS_DIR_VARIABLE
        or _SECRET_NAME.fullmatch(name) is not None
    )


def inherited_env() -> dict[str, str]:
    """This process's environment without our settings: what a deploy file's adds to.

    A PROMETHEUS_MULTIPROC_DIR left in the test's shell would switch prometheus_client
    into multiprocess mode in the worker, which nothing under deploy/ does.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


# ----------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Image:
    """The final stage of deploy/Dockerfile, as BuildKit's own parser reads it."""

    froms: tuple[str, ...]
    user: str
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    healthcheck_timeout: float
    copies: list[str]
    exposed: list[str]
    run: list[str]


def _duration(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, f"duration {text!r}: write it in seconds"
    return float(match[1])


def _expand_args(value: str, args: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)


def read_image() -> Image:
    commands = dockerfile.parse_file(str(DOCKERFILE))
    global_args: dict[str, str] = {}
    froms: list[str] = []
    stage: list[Any] = []
    for command in commands:
        if command.cmd == "ARG" and not froms:
            name, _, default = command.value[0].partition("=")
            global_args[name] = default
        if command.cmd == "FROM":
            froms.append(_expand_args(command.value[0], global_args))
            stage = []
        else:
            stage.append(command)

    def last(name: str) -> Any:
        found = [command for command in stage if command.cmd == name]
        assert found, f"the final stage of {DOCKERFILE} has no {name}"
        return found[-1]

    env: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            pairs = command.value
            env.update(zip(pairs[0::2], pairs[1::2], strict=True))
    for name in ("ENTRYPOINT", "CMD"):
        assert last(name).json, f"{name} in shell form would run under /bin/sh -c"
    health = last("HEALTHCHECK")
    assert health.value[0] == "CMD", health.original
    health_argv = list(health.value[1:]) if health.json else [SHELL, "-c", health.value[1]]
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in health.flags)
    return Image(
        froms=tuple(froms),
        user=last("USER").value[0],
        env=env,
        entrypoint=list(last("ENTRYPOINT").value),
        cmd=list(last("CMD").value),
        healthcheck=health_argv,
        healthcheck_timeout=_duration(flags["timeout"]),
        copies=[
            source
            for command in commands
            if command.cmd == "COPY" and not command.flags
            for source in command.value[:-1]
        ],
        exposed=[port for command in stage if command.cmd == "EXPOSE" for port in command.value],
        run=[command.value[0] for command in stage if command.cmd == "RUN"],
    )


@pytest.fixture(scope="module")
def image() -> Image:
    return read_image()


def test_dockerfile_is_multi_stage_on_a_pinned_base(image: Image) -> None:
    assert len(image.froms) >= 2, "multi-stage: the build stage's tools stay out of the image"
    for base in image.froms:
        # An exact release, never a moving tag like 3.11-slim; the digest cannot be looked
        # up offline (the Dockerfile says so).
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base


def test_dockerfile_runs_as_an_unprivileged_numeric_user(image: Image) -> None:
    uid, _, gid = image.user.partition(":")
    assert uid.isdigit() and int(uid) > 0, image.user  # runAsNonRoot can check only a number
    assert gid.isdigit() and int(gid) > 0, image.user


def test_dockerfile_copies_only_what_its_ignore_file_lets_in(image: Image) -> None:
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    copied = {source.rstrip("/") for source in image.copies if not source.startswith("/")}
    assert copied == allowed
    for source in copied:
        assert (REPO / source).exists(), source
    # Everything the distribution packages is copied: smtp_session/ and the folders its
    # links point at.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    packaged = {
        REPO / name.replace(".", "/") for name in pyproject["tool"]["setuptools"]["packages"]
    }
    folders = {path.resolve().relative_to(REPO).as_posix() for path in packaged}
    assert folders | {"smtp_session"} <= copied, folders


def test_dockerfile_serves_metrics_and_creates_its_data_dir(image: Image) -> None:
    assert image.exposed == [str(DEFAULT_METRICS_PORT)]
    assert any(image.env[ENV_PREFIX + "DATA_DIR"] in run for run in image.run), image.run


# ----------------------------------------------------------------------------- compose


def load_compose() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def compose_argv(service: Mapping[str, Any], image: Image) -> list[str]:
    """What Docker runs: an entrypoint set by the service drops the image's CMD too."""
    if "entrypoint" in service:
        return list(service["entrypoint"]) + list(service.get("command", []))
    return image.entrypoint + list(service.get("command", image.cmd))


def _tmpfs_targets(service: Mapping[str, Any]) -> set[PurePosixPath]:
    return {PurePosixPath(entry.split(":", 1)[0]) for entry in service.get("tmpfs", [])}


def _mounts(service: Mapping[str, Any]) -> dict[PurePosixPath, str]:
    """Container path -> source, for the short volume syntax used in compose.yaml."""
    mounts: dict[PurePosixPath, str] = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        mounts[PurePosixPath(target)] = source
    return mounts


def test_every_yaml_and_json_file_under_deploy_parses() -> None:
    files = sorted(
        path
        for pattern in ("*.yaml", "*.yml", "*.json")
        for path in DEPLOY.rglob(pattern)
        if "__pycache__" not in path.parts
    )
    assert COMPOSE in files and SCRAPE_JOB in files
    for path in files:
        text = path.read_text(encoding="utf-8")
        documents = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        assert any(document for document in documents), f"{path} is empty"


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=HELP_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_redis_scalable_workers_one_beat_prometheus_and_grafana(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "worker", "beat", "prometheus", "grafana"}
    worker, beat = services["worker"], services["beat"]
    # `--scale worker=N` needs neither a fixed name nor a fixed host port.
    assert "container_name" not in worker and "ports" not in worker
    assert "deploy" not in beat and "container_name" not in beat
    for service in (worker, beat):
        assert service["environment"][ENV_PREFIX + "BROKER_URL"].startswith("redis://redis:")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["read_only"] is True
    # The worker keeps the image's HEALTHCHECK; beat, not a worker node, turns it off.
    assert "healthcheck" not in worker
    assert beat["healthcheck"] == {"disable": True}


def test_compose_gives_secrets_as_files_in_the_secrets_dir(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    # Compose mounts a service's secrets at /run/secrets/<name>.
    assert worker["environment"][SECRETS_DIR_VARIABLE] == "/run/secrets"
    assert not any(_SECRET_NAME.fullmatch(name) for name in worker["environment"])
    declared = compose["secrets"]
    for name in worker["secrets"]:
        assert declared[name]["file"] == f"./secrets/{name}"
    references = {
        target.request.credentials
        for target in load_targets(TARGETS_EXAMPLE)
        if target.request.credentials
    }
    assert references and references <= set(worker["secrets"])
    grafana = compose["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        f"/run/secrets/{grafana['secrets'][0]}"
    )


def test_compose_puts_writable_paths_on_tmpfs_or_volumes(compose: dict[str, Any]) -> None:
    worker, beat = compose["services"]["worker"], compose["services"]["beat"]
    for service in (worker, beat):
        assert CONTAINER_TMP in _tmpfs_targets(service), service
    data_dir = PurePosixPath(worker["environment"][ENV_PREFIX + "DATA_DIR"])
    assert data_dir in _tmpfs_targets(worker)
    # Beat's schedule lives on in a named volume.
    (schedule,) = [arg for arg in beat["entrypoint"] if arg.startswith("--schedule=")]
    assert PurePosixPath(schedule.split("=", 1)[1]).parent == data_dir
    assert _mounts(beat)[data_dir] in compose["volumes"]
    for service in (worker, beat):
        (config,) = service["configs"]
        assert config["target"] == service["environment"][ENV_PREFIX + "TARGETS"]
        assert compose["configs"][config["source"]]["file"] == "./targets.toml"


def test_compose_prometheus_scrapes_the_worker_and_grafana_reads_prometheus(
    compose: dict[str, Any], image: Image
) -> None:
    services = compose["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text("utf-8"))
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    (discovery,) = job["dns_sd_configs"]  # every replica of the worker service
    (host,) = discovery["names"]
    port = str(discovery["port"])
    assert host == "worker" and host in services
    metrics_port = services["worker"]["environment"].get(
        ENV_PREFIX + "METRICS_PORT", DEFAULT_METRICS_PORT
    )
    assert int(port) == int(metrics_port)
    assert services["worker"]["expose"] == [port] == image.exposed

    grafana = services["grafana"]
    mounts = _mounts(grafana)
    assert mounts[PurePosixPath("/etc/grafana/provisioning")] == "./grafana/provisioning"
    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "smtp-session.yaml").read_text("utf-8")
    )["providers"]
    dashboards = mounts[PurePosixPath(provider["options"]["path"])]
    assert (DEPLOY / dashboards / "smtp-session.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert PurePosixPath(home).parent == PurePosixPath(provider["options"]["path"])
    (source,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text("utf-8")
    )["datasources"]
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in services


def test_promtool_checks_the_prometheus_config_as_compose_mounts_it(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    prometheus = compose["services"]["prometheus"]
    (flag,) = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    config = PurePosixPath(flag.split("=", 1)[1])
    source = _mounts(prometheus)[config.parent]
    host_config = DEPLOY / source / config.name
    result = subprocess.run(
        [PROMTOOL_BINARY, "check", "config", str(host_config)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=HELP_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout  # rules.yml, beside it in the same mount


# ----------------------------------------------------------------------------- Kubernetes


def load_manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, document)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if document
    ]


@pytest.fixture(scope="module")
def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return load_manifests()


def find(manifests: Sequence[tuple[Path, dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [
        document
        for _, document in manifests
        if document["kind"] == kind and document["metadata"]["name"] == name
    ]
    return found


def pod_container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return cast(dict[str, Any], container)


def kubernetes_argv(container: Mapping[str, Any], image: Image) -> list[str]:
    """Kubernetes' rule: `command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD."""
    if "command" in container:
        return list(container["command"]) + list(container.get("args", []))
    return image.entrypoint + list(container.get("args", image.cmd))


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in binary units (`384Mi`) as bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert match, f"memory {quantity!r}: write it in Ki, Mi or Gi"
    return int(match[1]) << (10 * ("KMG".index(match[2][0]) + 1))


def kubernetes_env(
    container: Mapping[str, Any], manifests: Sequence[tuple[Path, dict[str, Any]]]
) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= find(manifests, "ConfigMap", source["configMapRef"]["name"])["data"]
    env |= {variable["name"]: variable["value"] for variable in container.get("env", [])}
    return env


def mounted_volumes(deployment: Mapping[str, Any]) -> dict[PurePosixPath, dict[str, Any]]:
    """Container mount path -> the pod volume mounted there."""
    spec = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    return {
        PurePosixPath(mount["mountPath"]): volumes[mount["name"]]
        for mount in pod_container(deployment)["volumeMounts"]
    }


def test_kubernetes_manifests_validate_offline_and_strict(
    manifests: list[tuple[Path, dict[str, Any]]],
) -> None:
    # Built-in kinds only (no CRDs such as ServiceMonitor), so every one has a schema.
    assert len(manifests) >= 10
    for path, document in manifests:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{path.name}: {document['kind']}: {where}: {error.message}")


def test_kubernetes_worker_deployment(
    manifests: list[tuple[Path, dict[str, Any]]], image: Image
) -> None:
    worker = find(manifests, "Deployment", "smtp-session-worker")
    pod = worker["spec"]["template"]["spec"]
    container = pod_container(worker)
    env = kubernetes_env(container, manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == (
        image.user
    )
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    memory = {kind: quantity_bytes(resources[kind]["memory"]) for kind in resources}
    assert memory["requests"] <= memory["limits"], resources
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container
    # Every path the worker writes is a volume of its own.
    volumes = mounted_volumes(worker)
    assert "emptyDir" in volumes[PurePosixPath(env[ENV_PREFIX + "DATA_DIR"])]
    assert "emptyDir" in volumes[CONTAINER_TMP]
    # Credentials as files, from the Secret; the targets file from its ConfigMap.
    secret_volume = volumes[PurePosixPath(env[SECRETS_DIR_VARIABLE])]
    secret = find(manifests, "Secret", secret_volume["secret"]["secretName"])
    references = {
        target.request.credentials
        for target in load_targets(TARGETS_EXAMPLE)
        if target.request.credentials
    }
    assert references and references <= set(secret["stringData"])
    targets = PurePosixPath(env[ENV_PREFIX + "TARGETS"])
    config_map = find(manifests, "ConfigMap", volumes[targets.parent]["configMap"]["name"])
    assert targets.name in config_map["data"]


def test_kubernetes_targets_config_map_is_the_example_file(
    manifests: list[tuple[Path, dict[str, Any]]],
) -> None:
    text = find(manifests, "ConfigMap", "smtp-session-targets")["data"]["targets.toml"]
    example = tomllib.loads(TARGETS_EXAMPLE.read_text(encoding="utf-8"))
    assert tomllib.loads(text) == example
    assert parse_targets(tomllib.loads(text)) == load_targets(TARGETS_EXAMPLE)


def test_kubernetes_metrics_service_probes_and_annotations_agree(
    manifests: list[tuple[Path, dict[str, Any]]],
) -> None:
    worker = find(manifests, "Deployment", "smtp-session-worker")
    container = pod_container(worker)
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    port = int(kubernetes_env(container, manifests)[ENV_PREFIX + "METRICS_PORT"])
    ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
    assert ports == {"metrics": port}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)

    service = find(manifests, "Service", "smtp-session")
    assert service["spec"]["clusterIP"] == "None"  # every pod, not one behind a virtual IP
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port == {"name": "metrics", "port": port, "targetPort": "metrics"}

    budget = find(manifests, "PodDisruptionBudget", "smtp-session-worker")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    beat = find(manifests, "Deployment", "smtp-session-beat")
    beat_labels = beat["spec"]["template"]["metadata"]["labels"]
    # The budget and the Service are about workers only.
    assert not budget["spec"]["selector"]["matchLabels"].items() <= beat_labels.items()
    assert not service["spec"]["selector"].items() <= beat_labels.items()

    # The scrape job for an in-cluster Prometheus: the rules' job name, this Service's DNS
    # name, this port.
    scrape = yaml.safe_load(SCRAPE_JOB.read_text(encoding="utf-8"))
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == JOB
    (dns,) = job["dns_sd_configs"]
    namespace = service["metadata"]["namespace"]
    assert dns["names"] == [f"{service['metadata']['name']}.{namespace}.svc"]
    assert dns["port"] == port


def test_promtool_checks_the_kubernetes_scrape_job(tmp_path: Path) -> None:
    result = subprocess.run(
        [PROMTOOL_BINARY, "check", "config", str(SCRAPE_JOB)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=HELP_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_single_beat_recreated_never_rolled(
    manifests: list[tuple[Path, dict[str, Any]]],
) -> None:
    beat = find(manifests, "Deployment", "smtp-session-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    container = pod_container(beat)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = kubernetes_env(container, manifests)
    volumes = mounted_volumes(beat)
    (schedule,) = [arg for arg in container["command"] if arg.startswith("--schedule=")]
    assert "emptyDir" in volumes[PurePosixPath(schedule.split("=", 1)[1]).parent]
    assert SECRETS_DIR_VARIABLE not in env  # beat never opens a session


# ----------------------------------------------------------------------------- systemd


class Unit:
    """A systemd unit file: sections of (key, value) lines; keys may repeat."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sections: dict[str, list[tuple[str, str]]] = {}
        section: list[tuple[str, str]] = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = self.sections.setdefault(line.strip("[]"), [])
            else:
                key, _, value = line.partition("=")
                section.append((key, value))

    def all(self, key: str, section: str = "Service") -> list[str]:
        return [value for name, value in self.sections[section] if name == key]

    def one(self, key: str, section: str = "Service") -> str:
        (value,) = self.all(key, section)
        return value

    @property
    def environment(self) -> dict[str, str]:
        return dict(value.split("=", 1) for value in self.all("Environment"))

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.one("ExecStart"))


def read_env_file(path: Path, *, commented: bool) -> dict[str, str]:
    """KEY=value lines; with `commented`, also the `#KEY=value` examples one may uncomment."""
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if commented and re.match(r"#[A-Z_]+=", line):
            line = line[1:]
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def _systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        timeout=HELP_TIMEOUT,
    )


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_systemd_unit_verifies(path: Path, tmp_path: Path) -> None:
    unit = Unit(path)
    program = PurePosixPath(unit.argv[0])
    assert program.parent == UNIT_BIN and program.name in PROGRAMS
    # As shipped: verify's one complaint is that the virtual environment of the install
    # notes is not at /opt/smtp-session on this machine. Any other finding fails.
    result = _systemd_analyze("verify", str(path), cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert output == (
        f"{path.name}: Command {program} is not executable: No such file or directory"
    ), output
    # The same unit, the command pointed at the same program installed here: no finding.
    installed = tmp_path / path.name
    installed.write_text(
        path.read_text(encoding="utf-8").replace(f"={program} ", f"={BIN / program.name} "),
        encoding="utf-8",
    )
    result = _systemd_analyze("verify", str(installed), cwd=tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_systemd_unit_is_hardened(path: Path, tmp_path: Path) -> None:
    result = _systemd_analyze(
        "security",
        "--offline=yes",
        f"--threshold={round(MAX_EXPOSURE * 10)}",
        str(path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    unit = Unit(path)
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit.one(key) == value, key


def test_systemd_units_share_a_user_and_state() -> None:
    worker, beat = (Unit(path) for path in UNITS)
    for unit in (worker, beat):
        assert unit.one("EnvironmentFile") == f"/etc/smtp-session/{ENV_FILE.name}"
        # %S: systemd's state directory (/var/lib).
        assert unit.environment[ENV_PREFIX + "DATA_DIR"] == f"%S/{unit.one('StateDirectory')}"
    # Beat and the worker are one dynamic user sharing one state directory: on one
    # machine, the embedded broker's queue in it.
    assert worker.one("User") == beat.one("User")
    assert worker.one("StateDirectory") == beat.one("StateDirectory")
    # %d: the credentials directory (LoadCredential=), readable by the service alone.
    assert worker.environment[SECRETS_DIR_VARIABLE] == "%d"
    (schedule,) = [arg for arg in beat.argv if arg.startswith("--schedule=")]
    assert schedule == f"--schedule=%S/{beat.one('StateDirectory')}/beat-schedule"


def test_worker_unit_does_not_restart_on_a_bad_setting(tmp_path: Path) -> None:
    unit = Unit(UNITS[0])
    (status,) = unit.all("RestartPreventExitStatus")
    argv, env = unit_process(unit, tmp_path, {ENV_PREFIX + "LOG_FORMAT": "yaml"})
    result = subprocess.run(
        argv, capture_output=True, text=True, check=False, env=env, timeout=HELP_TIMEOUT
    )
    assert (result.returncode, status) == (EXIT_INVALID, str(EXIT_INVALID)), result.stderr
    assert ENV_PREFIX + "LOG_FORMAT" in result.stderr


def test_env_file_leaves_the_units_directories_to_the_units() -> None:
    env = read_env_file(ENV_FILE, commented=True)
    units = {name for unit in UNITS for name in Unit(unit).environment}
    assert not set(env) & units


# ----------------------------------------------------------------------------- environment


def environments() -> dict[str, dict[str, str]]:
    """Every environment given to our processes by deploy/, by where it is written."""
    compose = load_compose()["services"]
    manifests = load_manifests()
    image = read_image()
    found = {
        "Dockerfile": {k: v for k, v in image.env.items() if k not in RUNTIME_VARIABLES},
        "compose worker": compose["worker"]["environment"],
        "compose beat": compose["beat"]["environment"],
        "systemd env file": read_env_file(ENV_FILE, commented=True),
    }
    for name in ("smtp-session-worker", "smtp-session-beat"):
        container = pod_container(find(manifests, "Deployment", name))
        found[f"kubernetes {name}"] = kubernetes_env(container, manifests)
    for path in UNITS:
        found[path.name] = Unit(path).environment
    return found


ENVIRONMENT_SOURCES = (
    "Dockerfile",
    "compose worker",
    "compose beat",
    "kubernetes smtp-session-worker",
    "kubernetes smtp-session-beat",
    *(path.name for path in UNITS),
    "systemd env file",
)


def test_environments_are_all_checked() -> None:
    assert set(environments()) == set(ENVIRONMENT_SOURCES)


@pytest.mark.parametrize("where", ENVIRONMENT_SOURCES)
def test_environment_names_are_settings_and_values_are_accepted(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environments()[where]
    unknown = sorted(name for name in env if not known_variable(name))
    assert not unknown, f"{where}: not settings of the worker: {unknown}"
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    load_settings()  # raises InvalidSettings naming the variable


def test_every_smtp_session_variable_named_in_deploy_or_the_readme_exists() -> None:
    files = [path for path in DEPLOY.rglob("*") if path.is_file() and path.suffix != ".pyc"]
    files.append(REPO / "README.md")
    for path in files:
        names = set(_SMTP_SESSION_TOKEN.findall(path.read_text(encoding="utf-8")))
        # A name ending in "_" is a prefix as written in prose: SMTP_SESSION_SECRET_<NAME>.
        unknown = sorted(
            name
            for name in names
            if not (known_variable(name) or name in {ENV_PREFIX, SECRET_PREFIX})
        )
        assert not unknown, f"{path.relative_to(REPO)}: {unknown}"


def test_example_targets_file_loads() -> None:
    targets = load_targets(TARGETS_EXAMPLE)
    assert [target.name for target in targets] == ["submission", "submissions", "example-mx"]
    hosts = {target.domain or target.request.host for target in targets}
    assert all(host == "example.com" or host.endswith(".example.com") for host in hosts)


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Invocation:
    """A command line from a deploy file, as our CLI would receive it."""

    where: str
    argv: list[str]

    @property
    def local(self) -> list[str]:
        """The same command line with the program from this virtual environment."""
        program = PurePosixPath(self.argv[0])
        assert program.name in PROGRAMS, f"{self.where}: {self.argv}"
        assert program.parent in {PurePosixPath("."), UNIT_BIN}, f"{self.where}: {program}"
        return [str(BIN / program.name), *self.argv[1:]]


def _shell_command(argv: Sequence[str]) -> list[str]:
    """`/bin/sh -c "celery ..."` -> the command the shell runs (its variables unexpanded)."""
    if list(argv[:2]) == [SHELL, "-c"]:
        return shlex.split(argv[2])
    return list(argv)


def invocations() -> list[Invocation]:
    image = read_image()
    compose = load_compose()["services"]
    manifests = load_manifests()
    found = [
        Invocation("Dockerfile ENTRYPOINT + CMD", image.entrypoint + image.cmd),
        Invocation("Dockerfile HEALTHCHECK", _shell_command(image.healthcheck)),
        Invocation("compose worker", compose_argv(compose["worker"], image)),
        Invocation("compose beat", compose_argv(compose["beat"], image)),
    ]
    for name in ("smtp-session-worker", "smtp-session-beat"):
        container = pod_container(find(manifests, "Deployment", name))
        found.append(Invocation(f"kubernetes {name}", kubernetes_argv(container, image)))
        if "livenessProbe" in container:
            command = container["livenessProbe"]["exec"]["command"]
            found.append(Invocation(f"kubernetes {name} liveness", _shell_command(command)))
    found += [Invocation(path.name, Unit(path).argv) for path in UNITS]
    return found


def _options(argv: Sequence[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("-")]


def _help_env(tmp_path: Path) -> dict[str, str]:
    return inherited_env() | {ENV_PREFIX + "DATA_DIR": str(tmp_path / "data")}


def _help(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*argv, "--help"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(env),
        timeout=HELP_TIMEOUT,
    )


def _celery_split(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """`celery [global options] COMMAND [SUBCOMMAND] [options]` -> (globals, command, rest)."""
    index = 1
    while argv[index].startswith("-"):
        index += 2 if argv[index] in {"-A", "--app"} else 1
    # inspect and control take the remote command as an argument: `inspect ping`.
    end = index + 2 if argv[index] in {"inspect", "control"} else index + 1
    return list(argv[1:index]), list(argv[index:end]), list(argv[end:])


def test_every_command_line_in_deploy_exists_in_our_cli(tmp_path: Path) -> None:
    """Each command and each option the image, compose, Kubernetes and systemd use."""
    # command -> (where, option) pairs to find in its --help; each command runs once.
    wanted: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for invocation in invocations():
        argv = invocation.local
        if PurePosixPath(argv[0]).name == "celery":
            global_options, command, rest = _celery_split(argv)
            # The app is always ours; celery's own options are checked against its help.
            assert global_options[-2:] == ["-A", "smtp_session.worker.app"], invocation
            checks = [
                ((argv[0],), global_options),
                ((argv[0], "-A", "smtp_session.worker.app", *command), rest),
            ]
        else:
            checks = [(tuple(argv[:2]), argv[2:])]
        for command_line, options in checks:
            found = wanted.setdefault(command_line, [])
            found += [(invocation.where, option) for option in _options(options)]
    env = _help_env(tmp_path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(wanted, pool.map(lambda c: _help(list(c), env), wanted), strict=True))
    for command_line, expected in wanted.items():
        result = results[command_line]
        assert result.returncode == 0, f"{command_line}: {result.stderr}"
        for where, option in expected:
            assert re.search(rf"(^|[\s,]){re.escape(option)}\b", result.stdout), (
                f"{where}: {option} is not an option of {command_line}"
            )
    assert len(wanted) >= 4  # smtp-session worker, celery, celery beat, celery inspect ping


# ----------------------------------------------------------------------------- a real run


@pytest.fixture
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def container_env(
    declared: Mapping[str, str], tmp_path: Path, redis: RedisServer
) -> dict[str, str]:
    """The image's ENV under a service's environment, with host paths for container paths.

    What is replaced, and only that: the broker (the test's Redis), the directories (this
    test's), the targets file (the example), /metrics on a free loopback port.
    """
    image = read_image()
    env = inherited_env()
    env |= {name: value for name, value in image.env.items() if name != "PATH"}
    env |= dict(declared)
    (tmp_path / "secrets").mkdir(exist_ok=True)
    replaced = {
        ENV_PREFIX + "BROKER_URL": redis.url,
        ENV_PREFIX + "DATA_DIR": str(tmp_path / "data"),
        SECRETS_DIR_VARIABLE: str(tmp_path / "secrets"),
        ENV_PREFIX + "TARGETS": str(TARGETS_EXAMPLE),
        ENV_PREFIX + "METRICS_LISTEN": "127.0.0.1:0",
    }
    assert set(replaced) - {ENV_PREFIX + "METRICS_LISTEN"} <= set(env), sorted(env)
    env |= replaced
    # The image puts its virtual environment first on PATH: so does this test.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def scrape(url: str, prefix: str) -> list[Sample]:
    """The samples of /metrics at `url` whose names start with `prefix`."""
    assert url.startswith("http://127.0.0.1:"), url
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:  # noqa: S310 - checked
        text = response.read().decode("utf-8")
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(prefix)
    ]


def session_samples(url: str) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    """The smtp_session_* samples of /metrics at `url`, in a comparable order."""
    return sorted(
        (sample.name, tuple(sorted(sample.labels.items())), sample.value)
        for sample in scrape(url, "smtp_session_")
    )


def _run_concurrently(
    commands: Sequence[tuple[list[str], Mapping[str, str]]], timeout: float
) -> list[subprocess.CompletedProcess[str]]:
    def run(command: tuple[list[str], Mapping[str, str]]) -> subprocess.CompletedProcess[str]:
        argv, env = command
        return subprocess.run(
            argv, capture_output=True, text=True, check=False, env=dict(env), timeout=timeout
        )

    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(run, commands))


def test_the_image_command_runs_a_worker_that_the_healthcheck_and_probes_find(
    redis: RedisServer,
    manifests: list[tuple[Path, dict[str, Any]]],
    compose: dict[str, Any],
    image: Image,
    tmp_path: Path,
) -> None:
    """compose's worker command on the image's entrypoint, then the checks, as written."""
    service = compose["services"]["worker"]
    env = container_env(service["environment"], tmp_path, redis)
    argv = Invocation("compose worker", compose_argv(service, image)).local
    worker = WorkerProcess(argv, env, tmp_path / "worker.log")
    try:
        line = worker.wait_for_line(r'"event":"metrics.listening"', timeout=START_TIMEOUT)
        port = json.loads(line)["port"]

        # Kubernetes' startup and readiness probes: an HTTP GET of their path, answered.
        container = pod_container(find(manifests, "Deployment", "smtp-session-worker"))
        path = container["readinessProbe"]["httpGet"]["path"]
        url = f"http://127.0.0.1:{port}{path}"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            assert response.status == 200

        # Docker and Kubernetes set HOSTNAME to the container's host name, which Celery's
        # node name is made of; here the node is named after this machine.
        here = env | {"HOSTNAME": socket.gethostname()}
        elsewhere = env | {"HOSTNAME": f"not-{socket.gethostname()}"}
        liveness = container["livenessProbe"]["exec"]["command"]
        samples_before = session_samples(url)
        # The configured targets' zeros at least (declared at start): something to compare.
        assert samples_before, url
        # Another node's name waits out the whole --timeout for an answer that never comes:
        # a later --timeout (the last one counts) keeps that wait short.
        shell, flag, command = image.healthcheck
        assert (shell, flag) == (SHELL, "-c")
        other_healthcheck = [SHELL, "-c", f"{command} --timeout 1"]
        healthy, alive, other_node = _run_concurrently(
            [(image.healthcheck, here), (liveness, here), (other_healthcheck, elsewhere)],
            timeout=image.healthcheck_timeout + START_TIMEOUT,
        )
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert "pong" in healthy.stdout
        assert alive.returncode == 0, alive.stdout + alive.stderr
        # Another node's name gets no answer: the check is about this container's worker.
        assert other_node.returncode != 0, other_node.stdout
        # The checks ask the worker's node, which answers them without recording anything
        # into its session metrics.
        assert session_samples(url) == samples_before
        # One process with its sessions' threads, idle, fits the pod's memory limit.
        limit = quantity_bytes(container["resources"]["limits"]["memory"])
        (rss,) = scrape(url, "process_resident_memory_bytes")
        assert 0 < rss.value < limit, (rss.value, limit)
        assert worker.running
    finally:
        worker.stop()


def test_the_beat_command_starts_and_writes_json_only(
    redis: RedisServer, compose: dict[str, Any], image: Image, tmp_path: Path
) -> None:
    """compose's beat command, with its schedule in this test's data directory."""
    service = compose["services"]["beat"]
    env = container_env(service["environment"], tmp_path, redis)
    data_dir = service["environment"][ENV_PREFIX + "DATA_DIR"]
    argv = [
        arg.replace(f"={data_dir}/", f"={env[ENV_PREFIX + 'DATA_DIR']}/")
        for arg in Invocation("compose beat", compose_argv(service, image)).local
    ]
    assert argv != Invocation("compose beat", compose_argv(service, image)).local
    beat = WorkerProcess(argv, env, tmp_path / "beat.log")
    try:
        beat.wait_for_line(r'"event":"beat: Starting', timeout=START_TIMEOUT)
        assert beat.running
        # No banner (--quiet): a log pipeline meets only JSON from beat too.
        for line in beat.output().splitlines():
            assert isinstance(json.loads(line), dict), line
    finally:
        beat.stop()


def unit_process(
    unit: Unit, tmp_path: Path, extra: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """A unit's command line and environment, outside systemd: its directories in tmp_path.

    %S (the state directory, /var/lib) becomes a folder of the test; the env file's active
    lines apply, then `extra`.
    """
    specifiers = {"%S": str(tmp_path / "state")}

    def expand(value: str) -> str:
        for specifier, folder in specifiers.items():
            value = value.replace(specifier, folder)
        return value

    # What StateDirectory= has systemd create before the start.
    (tmp_path / "state" / unit.one("StateDirectory")).mkdir(parents=True, exist_ok=True)
    argv = [expand(arg) for arg in Invocation(unit.path.name, unit.argv).local]
    env = inherited_env()
    env |= read_env_file(ENV_FILE, commented=False)
    env |= {name: expand(value) for name, value in unit.environment.items()}
    env |= dict(extra)
    return argv, env


def test_the_worker_and_beat_units_share_the_embedded_broker_on_one_machine(
    tmp_path: Path, refused_port: tuple[str, int]
) -> None:
    """The units' command lines and settings, the env file's broker line left commented:
    beat's schedule reaches the worker through the queue in their shared state directory."""
    targets = tmp_path / "targets.toml"
    host, port = refused_port
    targets.write_text(
        "[[targets]]\n"
        f'name = "loopback"\nhost = "{host}"\nport = {port}\n'
        'security = "plain"\nretries = 0\ninterval = 1\n',
        encoding="utf-8",
    )
    extra = {
        ENV_PREFIX + "TARGETS": str(targets),
        ENV_PREFIX + "METRICS_LISTEN": "127.0.0.1:0",
        # %d, the credentials directory, exists only under systemd.
        SECRETS_DIR_VARIABLE: str(tmp_path / "credentials"),
    }
    worker_unit, beat_unit = (Unit(path) for path in UNITS)
    assert ENV_PREFIX + "BROKER_URL" not in read_env_file(ENV_FILE, commented=False)
    worker = WorkerProcess(*unit_process(worker_unit, tmp_path, extra), tmp_path / "worker.log")
    beat = WorkerProcess(*unit_process(beat_unit, tmp_path, extra), tmp_path / "beat.log")
    try:
        line = worker.wait_for_line(r'"event":"session\.result"', timeout=START_TIMEOUT)
        result = json.loads(line)
        assert (result["target"], result["error"]) == ("loopback", "refused"), line
        assert beat.running
    finally:
        beat.stop()
        worker.stop()

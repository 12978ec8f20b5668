"""The one-call GPU session kit stays in step with the project it benchmarks."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_lock import read_lock

ROOT = Path(__file__).resolve().parents[2]
# The lent GPU machine: CPython 3.12 on Linux x86-64 (the Makefile's GPU_PYTHON_VERSION).
GPU_MACHINE = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
}


def carried_pins() -> dict[str, str]:
    lines = (ROOT / "bench/gpu_requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    pins = {}
    for req in requirements:
        (spec,) = req.specifier  # exactly one ==: the wheels are downloaded, not resolved
        assert spec.operator == "==", req
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in ("api", "worker", "datagen"):
        declared += project["optional-dependencies"][extra]
    return [Requirement(r) for r in declared]


def test_carried_versions_satisfy_the_project():
    pins = carried_pins()
    checked = set()
    for req in declared_requirements():
        name = req.name.lower()
        if name in pins:
            assert pins[name] in req.specifier, f"{name}=={pins[name]} is not {req}"
            checked.add(name)
    assert {"diffusers", "pydantic", "pydantic-settings", "redis"} <= checked


def test_carried_versions_are_the_locked_ones():
    """The benchmark runs what the GPU image would install: requirements/worker-gpu.txt."""
    locked = {
        name: str(pin.version)
        for name, entries in read_lock("worker-gpu.txt").items()
        for pin in entries
        if pin.marker is None or pin.marker.evaluate(GPU_MACHINE)
    }
    for name, version in carried_pins().items():
        assert locked.get(name) == version, f"{name}=={version}, locked {locked.get(name)}"


def test_session_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench/gpu_session.sh")], check=True)


# -- the kit's script: budget, order, and rows that survive a failing or slow part --------

SCRIPT = ROOT / "bench/gpu_session.sh"
# The device call's limit, and what the kit leaves of it for setup (pip, device.txt).
DEVICE_CALL_S = 590
SETUP_ALLOWANCE_S = 40
PART_ORDER = [
    "preflight",
    "stock-eager",
    "compiled",
    "sync-debug",
    "schedulers",
    "full-res",
    "edit-wall",
    "datagen",
]
ENGINE_PARTS = ["stock-eager", "compiled", "sync-debug", "schedulers"]


def script_limits() -> dict[str, int]:
    text = SCRIPT.read_text()
    return {
        name: int(default)
        for name, default in re.findall(r"^(\w+_S)=\$\{\1:-(\d+)\}(?:\s+#.*)?$", text, re.MULTILINE)
    }


def test_the_parts_fit_one_device_call():
    limits = script_limits()
    part_limits = {k: v for k, v in limits.items() if k.endswith("_TIMEOUT_S")}
    part_limits.pop("SETUP_TIMEOUT_S")
    assert len(part_limits) == len(PART_ORDER)
    assert sum(part_limits.values()) + SETUP_ALLOWANCE_S <= 560, part_limits
    # Even a setup that takes all of its own limit leaves the call's end untouched, and
    # the deadline for the whole script is inside the call.
    assert limits["SETUP_TIMEOUT_S"] + sum(part_limits.values()) <= DEVICE_CALL_S - 10
    assert limits["KIT_BUDGET_S"] <= DEVICE_CALL_S - 10
    # Each limit is used by exactly one part.
    text = SCRIPT.read_text()
    for name in part_limits:
        assert len(re.findall(rf'run_part [\w-]+ "\${name}"', text)) == 1, name


def test_importlib_metadata_is_not_needed():
    """diffusers imports the importlib_metadata backport only on Python < 3.8; the kit does
    not carry it. Here it cannot be imported at all, and the kit's imports still work."""
    code = (
        "import sys; sys.modules['importlib_metadata'] = None\n"
        "import diffusers, services.gpu_worker.engine, bench.full_size\n"
        "from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert "importlib-metadata" not in carried_pins()


STUB_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python in the kit: one JSON line on stdout, and one in --jsonl's file.
[[ $1 == -m || $1 == --version ]] && exit 0
part=$(basename "$1" .py)
prev=
jsonl=
for arg in "$@"; do
    [[ $prev == --part ]] && part=$arg
    [[ $prev == --jsonl ]] && jsonl=$arg
    prev=$arg
done
echo "{\"stub\": \"$part\"}"
echo "not a row: a log line"
[[ -n $jsonl ]] && echo "{\"part\": \"$part\"}" >>"$jsonl"
[[ ${STUB_FAIL:-} == "$part" ]] && exit 3
[[ ${STUB_SLEEP:-} == "$part" ]] && sleep 30
exit 0
"""


def run_kit(tmp_path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    out = tmp_path / "out"
    # No carried wheels: a developer's .whl/ from `make gpu-wheels` must not be installed.
    wheels = tmp_path / "no-wheels"
    wheels.mkdir()
    environment = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": str(stub),
        "WHEELS": str(wheels),
        **env,
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=120
    )
    return done, out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def part_status(out: Path) -> dict[str, str]:
    return {row["part"]: row["status"] for row in jsonl(out / "kit.jsonl") if "status" in row}


def test_every_part_runs_in_order_and_writes_json_lines(tmp_path):
    done, out = run_kit(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [row for row in jsonl(out / "kit.jsonl") if "status" in row]
    assert [row["part"] for row in steps] == PART_ORDER
    assert all(row["status"] == "ok" and row["rows"] >= 1 for row in steps), steps
    assert [row["part"] for row in jsonl(out / "engine.jsonl")] == ENGINE_PARTS
    for name in ("full_resolution", "edit_wall_time", "datagen"):
        rows = jsonl(out / f"{name}.jsonl")  # only the JSON lines of the part's output
        assert rows, name
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what a device call brings back
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert "== compiled" in (out / "kit.log").read_text()


def test_a_failed_preflight_stops_the_kit_at_once(tmp_path):
    done, out = run_kit(tmp_path, STUB_FAIL="gpu_preflight")
    assert done.returncode == 1
    assert "PRE-FLIGHT FAILED" in done.stdout
    assert part_status(out) == {"preflight": "failed"}
    assert not (out / "engine.jsonl").exists()


def test_a_failing_or_slow_part_keeps_its_rows_and_the_others_run(tmp_path):
    done, out = run_kit(
        tmp_path, STUB_FAIL="stock-eager", STUB_SLEEP="compiled", COMPILED_TIMEOUT_S="1"
    )
    assert done.returncode == 1
    status = part_status(out)
    assert status["stock-eager"] == "failed"
    assert status["compiled"] == "timeout"
    assert [status[p] for p in PART_ORDER[3:]] == ["ok"] * 5
    # The rows written before the kill are there.
    assert [row["part"] for row in jsonl(out / "engine.jsonl")] == ENGINE_PARTS

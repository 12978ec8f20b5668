"""The one-call GPU session kit stays in step with the project it benchmarks."""

import subprocess
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

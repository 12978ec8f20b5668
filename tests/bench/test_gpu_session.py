"""The one-call GPU session kit stays in step with the project it benchmarks."""

import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def carried_pins() -> dict[str, str]:
    lines = (ROOT / "bench/gpu_requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    pins = {}
    for req in requirements:
        (spec,) = req.specifier  # exactly one ==: the wheels are downloaded, not resolved
        assert spec.operator == "==", req
        pins[req.name.lower()] = spec.version
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


def test_session_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench/gpu_session.sh")], check=True)

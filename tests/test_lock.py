"""The lock files in requirements/ agree with pyproject.toml, the Dockerfiles and each other.

Offline and fast: the files are parsed, nothing is resolved or downloaded. `make lock`
rewrites the locks; these tests fail when pyproject.toml changed without it, when a pin
leaves the range pyproject.toml allows, or when the torch / xformers pins drift apart.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
WORKER_DOCKERFILES = [ROOT / "docker/gpu_worker.Dockerfile", ROOT / "docker/datagen.Dockerfile"]

# Each lock file and the pyproject extras it is compiled from (`make lock`).
PROJECT_LOCKS = {
    "dev.txt": ["dev"],
    "api.txt": ["api"],
    "worker.txt": ["worker"],
    "worker-gpu.txt": ["worker", "gpu"],
    "datagen.txt": ["datagen"],
    "datagen-gpu.txt": ["datagen", "gpu"],
}
ALL_LOCKS = [*PROJECT_LOCKS, "bake.txt", "torch-cpu.txt"]
UPPER_BOUND_OPERATORS = {"<", "<=", "==", "===", "~="}


@dataclass
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: list[str] = field(default_factory=list)


def read_lock(name: str) -> dict[str, list[Pin]]:
    """{canonical name: [Pin, ...]} (a universal lock may pin one name per Python range)."""
    pins: dict[str, list[Pin]] = {}
    current: Pin | None = None
    for raw in (REQUIREMENTS / name).read_text().splitlines():
        line = raw.strip().removesuffix("\\").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            assert current is not None, f"{name}: a hash before any requirement"
            current.hashes.append(line.removeprefix("--hash="))
            continue
        assert not line.startswith("-"), f"{name}: unexpected option line {line!r}"
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{name}: {line} is not a pin"
        current = Pin(canonicalize_name(req.name), Version(spec.version), req.marker)
        pins.setdefault(current.name, []).append(current)
    return pins


def extra_requirements(extras: list[str]) -> list[Requirement]:
    """The base dependencies and those of `extras`, self-references (`instructedit[x]`)
    expanded."""
    todo, seen, out = list(extras), set(), [Requirement(d) for d in PROJECT["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for dep in PROJECT["optional-dependencies"][extra]:
            req = Requirement(dep)
            if canonicalize_name(req.name) == "instructedit":
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def all_direct_requirements() -> list[Requirement]:
    declared = list(PROJECT["dependencies"])
    for deps in PROJECT["optional-dependencies"].values():
        declared += deps
    reqs = [Requirement(d) for d in declared]
    return [r for r in reqs if canonicalize_name(r.name) != "instructedit"]


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.MULTILINE))


def pinned_version(req_text: str, name: str) -> str:
    req = Requirement(req_text)
    (spec,) = req.specifier
    assert spec.operator == "==", f"{name} must be pinned with ==, not {req}"
    return spec.version


def torch_pins() -> set[str]:
    return {
        pinned_version(dep, "torch")
        for deps in PROJECT["optional-dependencies"].values()
        for dep in deps
        if canonicalize_name(Requirement(dep).name) == "torch"
    }


def xformers_pin() -> str:
    (dep,) = [
        d for d in PROJECT["optional-dependencies"]["gpu"] if Requirement(d).name == "xformers"
    ]
    return pinned_version(dep, "xformers")


# --------------------------------------------------------------------------- pyproject.toml


@pytest.mark.parametrize("req", all_direct_requirements(), ids=str)
def test_every_direct_dependency_is_bounded_below_the_next_major(req):
    """`>=L,<M+1` (`<1` for 0.x) or an exact pin: one major version, never open-ended."""
    operators = {spec.operator for spec in req.specifier}
    assert operators & UPPER_BOUND_OPERATORS, f"{req} has no upper bound"
    lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
    upper = [Version(s.version) for s in req.specifier if s.operator == "<"]
    for low in lower:
        for high in upper:
            assert high.release == (low.major + 1,), f"{req}: the range spans more than a major"


def test_build_requirements_are_locked_inputs():
    build_in = [
        Requirement(line)
        for line in (REQUIREMENTS / "build.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    names = {canonicalize_name(r.name): r for r in build_in}
    assert "pip" in names
    for dep in PYPROJECT["build-system"]["requires"]:
        req = Requirement(dep)
        assert names.get(canonicalize_name(req.name)) == req, f"build.in lacks {req}"


# --------------------------------------------------------------------------- lock files


@pytest.mark.parametrize("lock", ALL_LOCKS)
def test_lock_files_pin_every_package_with_hashes(lock):
    text = (REQUIREMENTS / lock).read_text()
    pins = read_lock(lock)
    assert pins, lock
    for entries in pins.values():
        for pin in entries:
            assert pin.hashes, f"{lock}: {pin.name}=={pin.version} has no hash"
            for digest in pin.hashes:
                assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{lock}: {digest}"
    # Nothing that only exists on one machine: no local paths, indexes or find-links.
    for needle in ("file:", "/tmp/", "/opt/", "/home/", "--find-links", "--index-url", "-e "):
        assert needle not in text, f"{lock} contains {needle!r}"


@pytest.mark.parametrize("lock", [*PROJECT_LOCKS, "bake.txt"])
def test_lock_files_are_written_by_make_lock(lock):
    header = (REQUIREMENTS / lock).read_text().splitlines()[:2]
    assert header[1].strip("# ") == "make lock", f"{lock}: refresh it with `make lock`"


@pytest.mark.parametrize(("lock", "extras"), PROJECT_LOCKS.items())
def test_locked_pins_satisfy_pyproject(lock, extras):
    pins = read_lock(lock)
    for req in extra_requirements(extras):
        name = canonicalize_name(req.name)
        if name == "torch":  # requirements/torch-cpu.txt and the CUDA build in the images
            assert name not in pins, f"{lock} must not pin torch"
            continue
        assert name in pins, f"{lock} lacks {req} (run `make lock`)"
        for pin in pins[name]:
            assert req.specifier.contains(pin.version, prereleases=True), (
                f"{lock}: {name}=={pin.version} is not {req} (run `make lock`)"
            )


@pytest.mark.parametrize("lock", PROJECT_LOCKS)
def test_locks_hold_the_build_requirements(lock):
    pins = read_lock(lock)
    assert "pip" in pins, lock
    for dep in PYPROJECT["build-system"]["requires"]:
        req = Requirement(dep)
        for pin in pins[canonicalize_name(req.name)]:
            assert req.specifier.contains(pin.version), f"{lock}: {pin.name}=={pin.version}"


# Packages of the `gpu` extra only: xformers needs a CUDA torch, bitsandbytes' 8-bit
# optimizers a CUDA device (the fine-tuning falls back to AdamW without it).
GPU_ONLY = {"xformers", "bitsandbytes"}


@pytest.mark.parametrize("lock", [*(lk for lk in PROJECT_LOCKS if lk != "dev.txt"), "bake.txt"])
def test_image_locks_pin_what_the_tests_run_with(lock):
    """Each image lock is compiled against dev.txt: the same version of every package."""
    dev = read_lock("dev.txt")
    for name, entries in read_lock(lock).items():
        if name in GPU_ONLY:  # the `gpu` extra, not in dev.txt (CUDA builds)
            continue
        assert name in dev, f"{lock}: {name} is not in dev.txt"
        dev_versions = {p.version for p in dev[name]}  # markers may differ: fewer deps
        for pin in entries:
            assert pin.version in dev_versions, (
                f"{lock}: {name}=={pin.version} differs from dev.txt (run `make lock`)"
            )


def test_bake_lock_pins_huggingface_hub():
    assert "huggingface-hub" in read_lock("bake.txt")


# --------------------------------------------------------------------------- torch / xformers


def test_torch_pins_agree():
    (version,) = torch_pins()  # the torch-cpu and gpu extras pin the same release
    (torch,) = read_lock("torch-cpu.txt")["torch"]
    assert torch.version == Version(f"{version}+cpu")
    assert torch.marker is None
    assert len(torch.hashes) >= 2  # x86-64 and aarch64 wheels at least
    for dockerfile in WORKER_DOCKERFILES:
        assert dockerfile_args(dockerfile)["TORCH_VERSION"] == version, dockerfile.name
    for lock in (*PROJECT_LOCKS, "bake.txt"):
        assert "torch" not in read_lock(lock), f"{lock}: torch is pinned in torch-cpu.txt only"


def test_xformers_pins_agree():
    version = xformers_pin()
    for lock, extras in PROJECT_LOCKS.items():
        pins = read_lock(lock)
        if "gpu" in extras:
            assert [str(p.version) for p in pins["xformers"]] == [version], lock
        else:
            assert "xformers" not in pins, f"{lock}: xformers belongs to the gpu images only"
    for dockerfile in WORKER_DOCKERFILES:
        assert dockerfile_args(dockerfile)["XFORMERS_VERSION"] == version, dockerfile.name


# --------------------------------------------------------------------------- this environment


def test_this_environment_is_the_lock():
    """`make install` builds the virtualenv from requirements/dev.txt and torch-cpu.txt."""
    wrong = []
    for lock in ("dev.txt", "torch-cpu.txt"):
        for name, entries in read_lock(lock).items():
            for pin in entries:
                if pin.marker is not None and not pin.marker.evaluate():
                    continue
                try:
                    installed = Version(metadata.version(name))
                except metadata.PackageNotFoundError:
                    installed = None
                if installed != pin.version:
                    wrong.append(f"{name}: {installed} installed, {pin.version} locked")
    assert not wrong, "the virtualenv is not the lock (`make install`): " + "; ".join(wrong)

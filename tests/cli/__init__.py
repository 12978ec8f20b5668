"""Running the installed `instructedit` console script as a shell user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The console script installed next to the interpreter running the tests (.venv/bin).
CLI = Path(sys.executable).parent / "instructedit"


def cli_env(url: str | None = None, key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSTRUCTEDIT_")}
    # Wide, plain output: tables are not wrapped, no colour codes.
    env.update({"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    if url is not None:
        env["INSTRUCTEDIT_URL"] = url
    if key is not None:
        env["INSTRUCTEDIT_API_KEY"] = key
    return env


def run_cli(
    *args: str | Path,
    url: str | None = None,
    key: str | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    assert CLI.exists(), f"{CLI} missing: pip install -e . (the console script)"
    return subprocess.run(
        [str(CLI), *map(str, args)],
        env=cli_env(url, key),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popen_cli(*args: str | Path, url: str, key: str, **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(CLI), *map(str, args)],
        env=cli_env(url, key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )

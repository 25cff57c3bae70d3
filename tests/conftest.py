"""Shared fixtures: a tiny trained run and bundle (built once per session), and emulator processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from calibration.demo import Emulated

ROOT = Path(__file__).resolve().parent.parent
TINY_OVERRIDES = [
    "mlsh.num_task_groups=1",
    "mlsh.warmup_iterations=1",
    "mlsh.joint_iterations=1",
    "mlsh.steps_per_iteration=512",
    "env.episode_seconds=2.0",
]


def metactl(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process."""
    result = subprocess.run(
        [sys.executable, "-m", "calibration.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"metactl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture
def emulator() -> Iterator[type[Emulated]]:
    """Factory: `emulator("--lockstep")` -> the launcher `metactl demo` uses; all are stopped after the test."""
    started: list[Emulated] = []

    def start(*args: str) -> Emulated:
        started.append(Emulated(*args))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory trained for a few seconds with `metactl train`."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    overrides = [item for pair in (("--set", value) for value in TINY_OVERRIDES) for item in pair]
    metactl("train", "configs/a1_quick.yaml", "--run-dir", str(run_dir), "--quiet", *overrides)
    return run_dir


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported with `metactl export` (treat as read-only; copy before adapting)."""
    bundle = tmp_path_factory.mktemp("bundle") / "tiny"
    metactl("export", str(tiny_run), "-o", str(bundle))
    return bundle

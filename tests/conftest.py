"""Shared fixtures: a tiny trained run and bundle (built once per session), and emulator processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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


class EmulatorProcess:
    """`metactl emulate ...` in a child process; `.port` is its pty path."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "calibration.cli", "emulate", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(20):
            line = self.process.stdout.readline()
            if line.startswith("PORT "):
                self.port = line.split()[1]
                return
            if not line:
                break
        self.stop()
        raise RuntimeError(f"emulator did not start: {self.process.stderr.read()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def emulator() -> Iterator[type[EmulatorProcess]]:
    """Factory: `emulator("--lockstep")`; every emulator started is stopped after the test."""
    started: list[EmulatorProcess] = []

    def start(*args: str) -> EmulatorProcess:
        started.append(EmulatorProcess(*args))
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

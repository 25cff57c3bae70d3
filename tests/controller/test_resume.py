"""A training process killed mid-run resumes from its last checkpoint and reproduces the metrics of
an uninterrupted run with the same seed."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

OVERRIDES = [
    "mlsh.num_task_groups=4",
    "mlsh.warmup_iterations=1",
    "mlsh.joint_iterations=1",
    "mlsh.steps_per_iteration=256",
    "env.episode_seconds=1.0",
]
TIMING_COLUMNS = {"steps_per_second"}


def train_command(run_dir: Path) -> list[str]:
    args = [sys.executable, "-m", "calibration.cli", "train", "configs/a1_quick.yaml", "--run-dir", str(run_dir)]
    for override in OVERRIDES:
        args += ["--set", override]
    return [*args, "--quiet"]


def metrics(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [
            {key: float(value) for key, value in row.items() if key not in TIMING_COLUMNS and value}
            for row in csv.DictReader(handle)
        ]


def test_killed_run_resumes_and_matches_uninterrupted(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    subprocess.run(train_command(whole), check=True, cwd=ROOT, capture_output=True, timeout=300)

    broken = tmp_path / "broken"
    process = subprocess.Popen(train_command(broken), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = broken / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-run: after the first task group's checkpoint
    process.wait()
    partial = metrics(broken)
    assert 2 <= len(partial) < 8, "the kill should land between the first checkpoint and the end"

    subprocess.run(train_command(broken), check=True, cwd=ROOT, capture_output=True, timeout=300)
    resumed, expected = metrics(broken), metrics(whole)
    assert len(resumed) == len(expected) == 8
    for got, want in zip(resumed, expected):
        assert got.keys() == want.keys()
        for key in want:
            assert abs(got[key] - want[key]) <= 1e-6 * max(1.0, abs(want[key])), key

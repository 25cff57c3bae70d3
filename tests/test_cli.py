"""End-to-end through the real CLI: train -> export -> emulate -> deploy -> adapt -> rollback,
over a real pseudo-terminal, plus the failure paths a user meets first."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from controller.robot import ROBOTS_DIR
from deploy.link import Link
from deploy.messages import Mode, State
from tests.conftest import ROOT, metactl

HELDOUT = str(ROOT / "configs" / "tasks" / "a1_heldout_slippery.yaml")


def digest(directory: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in ("manifest.yaml", "policy.onnx", "master.pt")
    }


def test_train_writes_run_directory(tiny_run: Path) -> None:
    assert (tiny_run / "checkpoints" / "latest.pt").exists()
    assert (tiny_run / "config.yaml").exists()
    assert (tiny_run / "learning_curve.png").exists()
    assert list((tiny_run / "tensorboard").iterdir())
    header = (tiny_run / "metrics.csv").read_text().splitlines()[0]
    assert "episode_return" in header and "sub/policy_loss" in header


def test_export_manifest_records_the_run(tiny_bundle: Path) -> None:
    manifest = yaml.safe_load((tiny_bundle / "manifest.yaml").read_text())
    assert manifest["robot"] == "a1"
    assert manifest["version"] == "v0"
    assert manifest["training"]["command"].startswith("metactl train configs/a1_quick.yaml")
    assert len(manifest["joint_names"]) == 12


def test_chain_deploy_adapt_rollback(tiny_bundle: Path, tmp_path: Path, emulator) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    robot = emulator("--lockstep", "--task", HELDOUT)

    deployed = metactl("deploy", str(bundle), "--port", robot.port, "--episodes", "2", "--seconds", "2")
    lines = [line for line in deployed.stdout.splitlines() if line.startswith("episode")]
    assert len(lines) == 2 and "return" in lines[0]

    v0 = digest(bundle)
    adapted = metactl("adapt", str(bundle), "--port", robot.port, "-k", "2", "--seconds", "2")
    assert "return before:" in adapted.stdout and "return after:" in adapted.stdout
    assert (bundle / "versions" / "v1" / "adaptation.png").exists()
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    if "kept" in adapted.stdout:
        assert manifest["version"] == "v1" and digest(bundle) != v0
        metactl("adapt", str(bundle), "--rollback")
        assert digest(bundle) == v0  # the exact previous bytes
    else:
        assert manifest["version"] == "v0" and digest(bundle) == v0  # a worse candidate never lands


def test_rollback_without_history_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    result = metactl("adapt", str(bundle), "--rollback", check=False)
    assert result.returncode == 2 and "nothing to roll back" in result.stderr


def test_bundle_for_another_robot_is_refused(tiny_bundle: Path, tmp_path: Path, emulator) -> None:
    spec = yaml.safe_load((ROBOTS_DIR / "a1.yaml").read_text())
    spec["name"] = "a1_mirror"
    other = tmp_path / "a1_mirror.yaml"
    other.write_text(yaml.safe_dump(spec))
    robot = emulator("--lockstep", "--robot", str(other))
    result = metactl("deploy", str(tiny_bundle), "--port", robot.port, "--seconds", "1", check=False)
    assert result.returncode == 2
    assert "is for robot 'a1', but the robot says it is 'a1_mirror'" in result.stderr


def test_unknown_config_key_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("robot: a1\nmlsh:\n  warmup_iterations: 1\n  warmup_iters: 2\n")
    result = metactl("train", str(config), "--run-dir", str(tmp_path / "run"), check=False)
    assert result.returncode == 2
    assert "unknown config key 'mlsh.warmup_iters'" in result.stderr and "warmup_iterations" in result.stderr


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("robot: a1\nmlsh: {warmup_iterations: 1\n")
    result = metactl("train", str(config), "--run-dir", str(tmp_path / "run"), check=False)
    assert result.returncode == 2 and "malformed YAML" in result.stderr and "line" in result.stderr


def test_host_death_leaves_robot_damping_within_100_ms(tiny_bundle: Path, emulator) -> None:
    robot = emulator()  # real time, with its 50 ms watchdog
    host = subprocess.Popen(
        [sys.executable, "-m", "calibration.cli", "deploy", str(tiny_bundle), "--port", robot.port, "--seconds", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        time.sleep(4.0)  # connected and walking
        assert host.poll() is None, host.stderr.read()
        os.kill(host.pid, signal.SIGKILL)  # no finally, no damping command: only the robot's watchdog
        killed_at = time.monotonic()
        host.wait()
    finally:
        if host.poll() is None:
            host.kill()
    # The emulator's State frames carry its CLOCK_MONOTONIC time, comparable with ours on one machine.
    states: list[State] = []
    with Link(robot.port) as link:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not any(s.mode == Mode.DAMPING and s.time > killed_at for s in states):
            state = link.latest_state(timeout=0.2)
            if state is not None:
                states.append(state)
    after_kill = [s for s in states if s.time > killed_at]
    assert after_kill, "no State frames after the host died"
    damping = [s for s in after_kill if s.mode == Mode.DAMPING]
    assert damping, f"modes after the kill: {[s.mode for s in after_kill]}"
    assert damping[0].time - killed_at < 0.1


def test_calibrate_offsets_recovers_injected_errors(tmp_path: Path, emulator) -> None:
    offsets = np.array([0.03, -0.02, 0.01, 0.0, 0.05, -0.04, 0.02, 0.0, -0.01, 0.015, -0.025, 0.035])
    bias = np.array([0.05, -0.04, 0.03])
    tilt = np.array([0.03, -0.02])
    robot = emulator(
        "--joint-offsets=" + ",".join(map(str, offsets)),
        "--gyro-bias=" + ",".join(map(str, bias)),
        "--imu-tilt=" + ",".join(map(str, tilt)),
    )
    out = tmp_path / "calibration.yaml"
    metactl("calibrate", "offsets", "--port", robot.port, "-o", str(out))
    calibration = yaml.safe_load(out.read_text())
    assert np.max(np.abs(np.array(calibration["joint_offsets"]) - offsets)) < 0.005
    assert np.all(np.abs(np.array(calibration["gyro_bias"]) - bias) < 0.1 * np.abs(bias))
    assert np.max(np.abs(np.array(calibration["imu_tilt"]) - tilt)) < 0.005


def test_deploy_applies_calibration(tiny_bundle: Path, tmp_path: Path, emulator) -> None:
    """With injected offsets, deploying with the measured calibration matches the offset-free robot."""
    offsets = "0.05,0,0,-0.05,0,0,0.05,0,0,-0.05,0,0"
    returns = {}
    for name, args in (("clean", ["--lockstep"]), ("offset", ["--lockstep", f"--joint-offsets={offsets}"])):
        robot = emulator(*args)
        result = metactl("deploy", str(tiny_bundle), "--port", robot.port, "--seconds", "2")
        returns[name] = float(result.stdout.split("return ")[1].split()[0])
        robot.stop()
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text(yaml.safe_dump({"robot": "a1", "joint_offsets": [float(v) for v in offsets.split(",")]}))
    robot = emulator("--lockstep", f"--joint-offsets={offsets}")
    result = metactl(
        "deploy", str(tiny_bundle), "--port", robot.port, "--seconds", "2", "--calibration", str(calibration)
    )
    corrected = float(result.stdout.split("return ")[1].split()[0])
    # Sensor noise differs run to run; the corrected robot is within noise of the clean one.
    assert abs(corrected - returns["clean"]) <= abs(returns["offset"] - returns["clean"]) + 1.0


def test_demo_quick_json(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    result = metactl("demo", "--quick", "--json", "--seconds", "3", "--plot", str(plot), timeout=300)
    assert plot.exists()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"return_before", "return_after", "episodes", "kept"} <= set(summary)
    assert summary["episodes"] == 3
    assert "| before adaptation (v0) |" in result.stdout


def test_eval_writes_table_json_and_plot(tiny_run: Path, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks:\n  - {friction: 0.3, added_mass: 4.5}\n  - {friction: 1.0, motor_strength: 0.75}\n")
    result = metactl(
        "eval",
        str(tiny_run),
        "--tasks",
        str(tasks),
        "-k",
        "0,1",
        "--baseline",
        str(tiny_run),
        "--oracle",
        str(tiny_run),
        "--seconds",
        "1",
        "--episodes",
        "1",
        "--out",
        str(tmp_path / "eval"),
        "--json",
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {"mlsh (adapt master)", "domain-randomized PPO", "fine-tune all", "random", "oracle"}
    assert set(summary["mlsh (adapt master)"]) == {"0", "1"}
    assert "normalized" in summary["fine-tune all"]["1"]
    for name in ("eval.md", "eval.json", "eval.png"):
        assert (tmp_path / "eval" / name).exists()
    shares = json.loads((tmp_path / "eval" / "eval.json").read_text())["option_share"]["mlsh (adapt master)"]
    assert set(shares) == {"0", "1"} and all(len(per_task) == 2 for per_task in shares.values())
    assert all(abs(sum(task_shares) - 1.0) < 1e-9 for per_task in shares.values() for task_shares in per_task)
    assert "master's choices per sub-policy" in (tmp_path / "eval" / "eval.md").read_text()


def test_eval_suite_point_runs_every_method(tmp_path: Path) -> None:
    from sim.fast_suite_setup import BUDGETS

    assert "quick" in BUDGETS
    result = metactl(
        "eval", "--suite", "point", "-k", "0,1", "--out", str(tmp_path), "--json", check=False, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "oracle (true task in obs)" in summary and "random actions" in summary and len(summary) >= 8
    assert (tmp_path / "eval.md").exists() and (tmp_path / "eval.png").exists()

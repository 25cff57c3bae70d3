"""System identification against an emulator whose dynamics the host is not told."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import metactl


def test_sysid_recovers_hidden_mass_motor_strength_and_latency(tmp_path: Path, emulator) -> None:
    hidden = {"friction": 0.6, "added_mass": 2.0, "motor_strength": 0.85, "latency": 0.02}
    task = tmp_path / "hidden.yaml"
    task.write_text(yaml.safe_dump(hidden))
    robot = emulator("--lockstep", "--task", str(task))
    out = tmp_path / "calibration.yaml"
    result = metactl("calibrate", "sysid", "--port", robot.port, "-o", str(out), timeout=300)
    assert "added_mass" in result.stdout
    calibration = yaml.safe_load(out.read_text())
    identified = calibration["identified"]
    assert abs(identified["added_mass"] - hidden["added_mass"]) <= 0.1 * hidden["added_mass"]
    assert abs(identified["motor_strength"] - hidden["motor_strength"]) <= 0.1 * hidden["motor_strength"]
    assert abs(identified["latency"] - hidden["latency"]) <= 1.0 / 50  # within one control step
    assert set(calibration["uncertainty"]) == set(identified)


def test_train_recentres_on_calibration(tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text(yaml.safe_dump({"robot": "a1", "identified": {"added_mass": 3.0, "motor_strength": 0.9}}))
    run_dir = tmp_path / "run"
    metactl(
        "train",
        "configs/a1_quick.yaml",
        "--run-dir",
        str(run_dir),
        "--calibration",
        str(calibration),
        "--quiet",
        "--set",
        "mlsh.num_task_groups=1",
        "--set",
        "mlsh.joint_iterations=0",
        "--set",
        "mlsh.steps_per_iteration=128",
    )
    tasks = yaml.safe_load((run_dir / "config.yaml").read_text())["tasks"]
    assert tasks["added_mass"] == {"low": 1.0, "high": 5.0}  # width 4 kept, centred on 3.0
    assert abs(tasks["motor_strength"]["low"] - 0.7) < 1e-9 and abs(tasks["motor_strength"]["high"] - 1.1) < 1e-9


def test_corrupt_calibration_is_refused(tmp_path: Path, tiny_bundle: Path, emulator) -> None:
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text("robot: a1\njoint_offsets: [0.1, 0.2\n")
    robot = emulator("--lockstep")
    result = metactl("deploy", str(tiny_bundle), "--port", robot.port, "--calibration", str(calibration), check=False)
    assert result.returncode == 2 and "malformed YAML" in result.stderr

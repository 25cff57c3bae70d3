"""Calibration YAML: what was measured on the robot, read by deploy (offsets) and train (identified dynamics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from controller.config import build, load_yaml
from controller.errors import ConfigError
from controller.rundir import atomic_write_bytes
from deploy.robot_states import Calibration


@dataclass
class CalibrationFile:
    """One robot's calibration."""

    robot: str
    """Robot name; deploy refuses a calibration for another robot."""
    joint_offsets: list[float] | None = None
    """Encoder zero offsets (rad): reading = true angle + offset."""
    gyro_bias: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Gyro bias (rad/s): reading = true rate + bias."""
    imu_tilt: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """IMU mounting roll and pitch (rad)."""
    identified: dict[str, float] = field(default_factory=dict)
    """Task parameters identified by system identification (re-centre training ranges on them)."""
    uncertainty: dict[str, float] = field(default_factory=dict)
    """One standard deviation of each identified value."""
    recording: dict[str, Any] = field(default_factory=dict)
    """How the calibration was recorded (samples, seconds, port, date)."""

    def __post_init__(self) -> None:
        if self.joint_offsets is not None and not all(np.isfinite(self.joint_offsets)):
            raise ConfigError("calibration 'joint_offsets' must be finite numbers")
        if len(self.gyro_bias) != 3 or not all(np.isfinite(self.gyro_bias)):
            raise ConfigError("calibration 'gyro_bias' must be 3 finite numbers")
        if len(self.imu_tilt) != 2 or not all(np.isfinite(self.imu_tilt)):
            raise ConfigError("calibration 'imu_tilt' must be 2 finite numbers (roll, pitch)")

    def for_deploy(self) -> Calibration:
        return Calibration(
            joint_offsets=None if self.joint_offsets is None else np.asarray(self.joint_offsets, dtype=np.float64),
            gyro_bias=np.asarray(self.gyro_bias, dtype=np.float64),
            imu_tilt=np.asarray(self.imu_tilt, dtype=np.float64),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {key: value for key, value in self.__dict__.items() if value not in (None, {}, [])}
        atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())
        return path


def load_calibration(path: str | Path) -> CalibrationFile:
    """Read a calibration file; malformed or truncated files raise ConfigError naming the problem."""
    data = load_yaml(path)
    if "robot" not in data:
        raise ConfigError(f"{path}: calibration needs a 'robot' key")
    return build(CalibrationFile, data, "calibration")

"""Robot spec: the one description of a robot that sim, export, deploy and the emulator all read.

numpy + yaml only: the robot's computer loads this without torch or PyBullet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controller.config import build, load_yaml, to_dict
from controller.errors import ConfigError

ROBOTS_DIR = Path(__file__).resolve().parent.parent / "configs" / "robots"


@dataclass
class GaitSpec:
    """Open-loop trotting pattern the policy's actions are added to (a trajectory generator).

    Per joint j on leg l with phase phi_l = 2 pi f t + offset_l:
    target_j += swing_j * cos(phi_l) - lift_j * max(0, sin(phi_l)).
    """

    frequency_hz: float = 0.0
    """Stepping frequency; 0 disables the generator (targets are default pose + action)."""
    leg_phase_offsets: list[float] = field(default_factory=list)
    """Phase offset of each leg in radians (trot: diagonal pairs share a phase)."""
    joint_leg: list[int] = field(default_factory=list)
    """Leg index of each joint, in joint order."""
    swing: list[float] = field(default_factory=list)
    """Per-joint amplitude (rad) of the fore-aft swing term."""
    lift: list[float] = field(default_factory=list)
    """Per-joint amplitude (rad) of the foot-lift term during swing."""


@dataclass
class RobotSpec:
    """Everything that differs between robots, in joint order."""

    name: str
    """Robot identity; the serial handshake and the bundle manifest must carry the same name."""
    urdf: str
    """URDF path, relative to pybullet_data or absolute."""
    joint_names: list[str]
    """Actuated joints in the order used by observations, actions and the serial protocol."""
    default_pose: list[float]
    """Standing joint angles (rad); actions are offsets from it."""
    joint_lower: list[float]
    """Lower joint limits (rad)."""
    joint_upper: list[float]
    """Upper joint limits (rad)."""
    torque_limit: list[float]
    """Per-joint torque limit (N m)."""
    kp: float = 40.0
    """PD position gain (N m / rad)."""
    kd: float = 1.0
    """PD velocity gain (N m s / rad)."""
    damping_kd: float = 2.0
    """Velocity gain used in DAMPING mode (targets ignored)."""
    action_scale: float = 0.2
    """Joint target offset (rad) per unit of action; actions are clipped to [-1, 1]."""
    control_rate_hz: float = 50.0
    """Policy rate."""
    sim_timestep: float = 0.005
    """Physics step; control_rate_hz * sim_timestep * decimation == 1."""
    base_height: float = 0.3
    """Spawn height of the base (m)."""
    base_orientation_rpy: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Fixed rotation (roll, pitch, yaw; rad) from the trunk frame (x forward, y left, z up) to the URDF's base
    frame: the sim spawns the base so rotated and reads the IMU in the trunk frame. Non-zero only for URDFs not
    modelled x-forward, z-up (laikago)."""
    min_upright: float = 0.5
    """Fall when the body z-axis' world-z component drops below this (cos of the tilt)."""
    gait: GaitSpec = field(default_factory=GaitSpec)
    """Trajectory generator the actions modulate."""

    def __post_init__(self) -> None:
        n = len(self.joint_names)
        if n == 0:
            raise ConfigError(f"robot '{self.name}': joint_names is empty")
        for key in ("default_pose", "joint_lower", "joint_upper", "torque_limit"):
            if len(getattr(self, key)) != n:
                raise ConfigError(f"robot '{self.name}': '{key}' has {len(getattr(self, key))} values, expected {n}")
        if np.any(np.asarray(self.joint_lower) > np.asarray(self.joint_upper)):
            raise ConfigError(f"robot '{self.name}': joint_lower exceeds joint_upper")
        if np.any(np.asarray(self.torque_limit) <= 0):
            raise ConfigError(f"robot '{self.name}': 'torque_limit' must be positive")
        if self.kp < 0 or self.kd < 0 or self.damping_kd < 0:
            raise ConfigError(f"robot '{self.name}': gains must be >= 0")
        if self.control_rate_hz <= 0 or self.sim_timestep <= 0:
            raise ConfigError(f"robot '{self.name}': control_rate_hz and sim_timestep must be > 0")
        ratio = 1.0 / (self.control_rate_hz * self.sim_timestep)
        if abs(ratio - round(ratio)) > 1e-6:
            raise ConfigError(
                f"robot '{self.name}': 1 / (control_rate_hz * sim_timestep) = {ratio:g} must be an integer"
            )
        if len(self.base_orientation_rpy) != 3:
            raise ConfigError(f"robot '{self.name}': 'base_orientation_rpy' needs 3 angles (roll, pitch, yaw)")
        gait = self.gait
        if gait.frequency_hz > 0:
            for key in ("joint_leg", "swing", "lift"):
                if len(getattr(gait, key)) != n:
                    raise ConfigError(f"robot '{self.name}': 'gait.{key}' must have {n} values")
            if max(gait.joint_leg) >= len(gait.leg_phase_offsets):
                raise ConfigError(f"robot '{self.name}': 'gait.joint_leg' names a leg without a phase offset")

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def decimation(self) -> int:
        """Physics steps per control step."""
        return int(round(1.0 / (self.control_rate_hz * self.sim_timestep)))

    def array(self, key: str) -> np.ndarray:
        """A per-joint list field as float64 array."""
        return np.asarray(getattr(self, key), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def fingerprint(self) -> str:
        """Hash of the fields a policy depends on; a bundle trained for another robot differs."""
        data = to_dict(self)
        if not any(self.base_orientation_rpy):  # specs written before the field existed keep their hash
            data.pop("base_orientation_rpy")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> RobotSpec:
        return dataclasses.replace(self, **changes)


def robot_spec_from_dict(data: dict[str, Any], where: str = "robot") -> RobotSpec:
    return build(RobotSpec, data, where)


def load_robot_spec(name_or_path: str | Path) -> RobotSpec:
    """Load a robot spec by name (configs/robots/NAME.yaml) or by path.

    Raises:
        ConfigError: for an unknown robot name (naming the known ones) or a malformed file.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = ROBOTS_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in ROBOTS_DIR.glob("*.yaml"))
            raise ConfigError(f"unknown robot '{name_or_path}'; known robots: {', '.join(known)}")
    return robot_spec_from_dict(load_yaml(path), where=f"robot '{path.stem}'")

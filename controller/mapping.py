"""Observation and action mapping, written once.

The sim env, the deploy runtime, the emulator's host and the adapter all turn a `RobotState` into
the observation vector and an action into PD joint targets through `ObservationMapping`, so the
policy sees the same numbers in simulation and on the robot. numpy only.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from controller.robot import RobotSpec

_DOWN = (0.0, 0.0, -1.0)
GAIT_CACHE_STEPS = 4096
"""Control steps whose gait terms `ObservationMapping` keeps (~80 s at 50 Hz); later steps compute them afresh."""

# (name, size-or-None for num_joints, scale); the order is the observation layout.
OBSERVATION_LAYOUT: tuple[tuple[str, int | None, float], ...] = (
    ("gravity", 3, 1.0),
    ("gyro", 3, 0.25),
    ("joint_pos", None, 1.0),
    ("joint_vel", None, 0.05),
    ("last_action", None, 1.0),
    ("command", 3, 1.0),
    ("gait_phase", 2, 1.0),
)


@dataclass
class RobotState:
    """One reading of the robot, in the spec's joint order; vectors are float arrays.

    base_vel is in the body frame and only the simulator or a state estimator knows it (NaN otherwise).
    """

    joint_pos: np.ndarray
    joint_vel: np.ndarray
    quat: np.ndarray
    """Body orientation in the world, (x, y, z, w)."""
    gyro: np.ndarray
    """Body angular velocity in the body frame (rad/s)."""
    accel: np.ndarray = field(default_factory=lambda: np.zeros(3))
    base_vel: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))
    joint_torque: np.ndarray | None = None
    command: np.ndarray = field(default_factory=lambda: np.zeros(3))
    """Velocity command (vx m/s, vy m/s, yaw rate rad/s)."""
    tick: int = 0
    time: float = 0.0
    fallen: bool = False


def _floats(values) -> list[float]:
    """A short vector as Python floats (ndarray.tolist is the fast path; numpy scalars are slow in arithmetic)."""
    return values.tolist() if isinstance(values, np.ndarray) else [float(value) for value in values]


def rotate_to_body(quat: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Express a world-frame vector in the body frame: R(q)^T v, with q = (x, y, z, w).

    v' = v + w t + u x t with u = -(x, y, z) (the conjugate) and t = 2 u x v; written out in
    scalars because np.cross on 3-vectors costs more than the rest of the observation.
    """
    x, y, z, w = _floats(quat)
    vx, vy, vz = _floats(vector)
    ux, uy, uz = -x, -y, -z
    tx, ty, tz = 2.0 * (uy * vz - uz * vy), 2.0 * (uz * vx - ux * vz), 2.0 * (ux * vy - uy * vx)
    return np.array(
        [vx + w * tx + (uy * tz - uz * ty), vy + w * ty + (uz * tx - ux * tz), vz + w * tz + (ux * ty - uy * tx)]
    )


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b of (x, y, z, w) quaternions (apply b, then a)."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def quat_conjugate(quat: np.ndarray) -> np.ndarray:
    x, y, z, w = quat
    return np.array([-x, -y, -z, w])


def quat_from_roll_pitch(roll: float, pitch: float) -> np.ndarray:
    """Rotation by `pitch` about y after `roll` about x (yaw 0), as (x, y, z, w)."""
    cr, sr, cp, sp = np.cos(roll / 2), np.sin(roll / 2), np.cos(pitch / 2), np.sin(pitch / 2)
    return np.array([sr * cp, cr * sp, -sr * sp, cr * cp])


def roll_pitch(quat: np.ndarray) -> tuple[float, float]:
    """Roll and pitch (ZYX Euler angles) of an (x, y, z, w) quaternion."""
    x, y, z, w = quat
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
    return float(roll), float(pitch)


def upright(quat: np.ndarray) -> float:
    """World-z component of the body z-axis: 1 standing, 0 on its side, -1 upside down."""
    x, y, _, _ = _floats(quat)
    return 1.0 - 2.0 * (x * x + y * y)


class ObservationMapping:
    """Stateful per episode: the last action and the gait phase live here.

    Call `reset()` at episode start, then each control tick `observe(state)` and `targets(action)`.
    """

    def __init__(self, spec: RobotSpec) -> None:
        self.spec = spec
        self.num_joints = spec.num_joints
        self._default = spec.array("default_pose")
        self._lower = spec.array("joint_lower")
        self._upper = spec.array("joint_upper")
        gait = spec.gait
        self._gait_on = gait.frequency_hz > 0
        if self._gait_on:
            self._joint_phase = np.asarray(gait.leg_phase_offsets)[np.asarray(gait.joint_leg)]
            self._swing = np.asarray(gait.swing, dtype=np.float64)
            self._lift = np.asarray(gait.lift, dtype=np.float64)
        self._sizes = [
            (name, self.num_joints if size is None else size, scale) for name, size, scale in OBSERVATION_LAYOUT
        ]
        self._names = [name for name, _, _ in self._sizes]
        self.obs_dim = sum(size for _, size, _ in self._sizes)
        self._scales = np.concatenate([np.full(size, scale) for _, size, scale in self._sizes])
        self.act_dim = self.num_joints
        self._action_scale = spec.action_scale
        self._phase_rate = 2.0 * np.pi * spec.gait.frequency_hz  # phase = 2 pi f k / rate, in that order
        self._rate = spec.control_rate_hz
        self.nonfinite_actions = 0
        # Per control step k: (default pose + gait offsets, (sin, cos) of the gait phase), filled as steps are
        # first reached. The gait depends on k alone, so a cached entry is exactly what a fresh one would be.
        self._gait_cache: list[tuple[np.ndarray, tuple[float, float]]] = []
        self.reset()

    @property
    def layout(self) -> list[dict]:
        """Names, slices and scales of the observation vector (stored in the bundle manifest)."""
        start, rows = 0, []
        for name, size, scale in self._sizes:
            rows.append({"name": name, "start": start, "size": size, "scale": scale})
            start += size
        return rows

    @property
    def layout_hash(self) -> str:
        """Changes whenever the meaning of any observation entry changes."""
        data = {
            "layout": self.layout,
            "joints": self.spec.joint_names,
            "default": self.spec.default_pose,
            "gait": self.spec.to_dict()["gait"],
            "rate": self.spec.control_rate_hz,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def reset(self) -> None:
        self.step_count = 0
        self.last_action = np.zeros(self.num_joints)

    def phase(self) -> float:
        return self._phase_rate * self.step_count / self._rate

    def _gait_terms(self) -> tuple[np.ndarray, tuple[float, float]]:
        """(default pose + gait offsets (num_joints,), (sin, cos) of the phase) at the current step."""
        step, cache = self.step_count, self._gait_cache
        if step < len(cache):
            return cache[step]
        phase = self.phase()
        terms = (
            self._default + self.gait_offsets(),
            (float(np.sin(phase)), float(np.cos(phase))) if self._gait_on else (0.0, 0.0),
        )
        if step == len(cache) and step < GAIT_CACHE_STEPS:
            cache.append(terms)
        return terms

    def observe(self, state: RobotState) -> np.ndarray:
        """RobotState -> observation vector, float32 (obs_dim,)."""
        parts = {
            "gravity": rotate_to_body(state.quat, _DOWN),
            "gyro": state.gyro,
            "joint_pos": np.asarray(state.joint_pos) - self._default,
            "joint_vel": state.joint_vel,
            "last_action": self.last_action,
            "command": state.command,
            "gait_phase": self._gait_terms()[1],
        }
        obs = np.concatenate([parts[name] for name in self._names], dtype=np.float64)
        obs *= self._scales
        # A NaN sensor reading must not reach the policy; zero is the normalizer's centre. A finite dot product
        # means every entry is finite (one reduction instead of isfinite + all on the common path).
        if not math.isfinite(obs @ obs):
            obs[~np.isfinite(obs)] = 0.0
        return obs.astype(np.float32)

    def gait_offsets(self) -> np.ndarray:
        if not self._gait_on:
            return np.zeros(self.num_joints)
        phi = self.phase() + self._joint_phase
        # target += swing * cos(phi) - lift * max(0, sin(phi))
        return self._swing * np.cos(phi) - self._lift * np.maximum(0.0, np.sin(phi))

    def targets(self, action: np.ndarray) -> np.ndarray:
        """Action in [-1, 1]^n -> joint targets (rad) within the joint limits; advances the gait phase.

        A non-finite action is replaced by zeros (counted in `nonfinite_actions`) so NaN never
        reaches a motor.
        """
        action = np.asarray(action, dtype=np.float64).reshape(self.num_joints)
        if not math.isfinite(action @ action) and not np.isfinite(action).all():  # the dot overflows on huge ones
            self.nonfinite_actions += 1
            action = np.zeros(self.num_joints)
        # clip(x, lo, hi) as minimum(maximum(x, lo), hi): the same values, a third of np.clip's call overhead.
        action = np.minimum(np.maximum(action, -1.0), 1.0)
        targets = self._gait_terms()[0] + self._action_scale * action  # default + gait + scale * action
        self.last_action = action
        self.step_count += 1
        return np.minimum(np.maximum(targets, self._lower), self._upper)

    def is_fallen(self, state: RobotState) -> bool:
        return bool(state.fallen) or upright(np.asarray(state.quat)) < self.spec.min_upright


@dataclass
class LocomotionReward:
    """Velocity-command tracking with small regularizers; computed from a RobotState alone.

    r = w_lin exp(-|v_xy - c_xy|^2 / sigma) + w_yaw exp(-(w_z - c_yaw)^2 / sigma)
        - w_vz v_z^2 - w_tilt |w_xy|^2 - w_rate |a - a_prev|^2 - w_torque |tau|^2
    """

    lin_vel: float = 1.0
    yaw_rate: float = 0.5
    sigma: float = 0.25
    vertical_vel: float = 0.5
    angular_xy: float = 0.02
    action_rate: float = 0.02
    torque: float = 1e-4

    def __call__(self, state: RobotState, action: np.ndarray, previous_action: np.ndarray) -> float:
        # Python floats for the scalar terms (numpy scalars cost ~10x more per operation); np.exp, not math.exp,
        # so the values stay exactly those of earlier versions.
        vx, vy, vz = _floats(state.base_vel)
        cx, cy, cyaw = _floats(state.command)
        gx, gy, gz = _floats(state.gyro)
        lin_err = (vx - cx) ** 2 + (vy - cy) ** 2
        reward = self.lin_vel * np.exp(-lin_err / self.sigma) + self.yaw_rate * np.exp(-((gz - cyaw) ** 2) / self.sigma)
        reward -= self.vertical_vel * vz**2 + self.angular_xy * (gx**2 + gy**2)
        # np.add.reduce(x * x) is np.sum(x ** 2) without the wrapper's dispatch: the same pairwise sum.
        change = np.asarray(action) - np.asarray(previous_action)
        reward -= self.action_rate * float(np.add.reduce(change * change, axis=None))
        if state.joint_torque is not None:
            torque = np.asarray(state.joint_torque)
            reward -= self.torque * float(np.add.reduce(torque * torque, axis=None))
        return float(reward)

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


def _sum_of_squares(values: list[float]) -> float:
    """sum(v * v) in numpy's float64 summation order (its pairwise sum: eight running sums over blocks of up to 128
    values, combined as a tree, then the remainder), so it equals np.add.reduce(x * x) exactly, on Python floats."""
    n = len(values)
    if n > 128:
        half = n // 2
        half -= half % 8
        return _sum_of_squares(values[:half]) + _sum_of_squares(values[half:])
    if n < 8:
        total = -0.0
        for value in values:
            total += value * value
        return total
    sums = [value * value for value in values[:8]]
    i, end = 8, n - n % 8
    while i < end:
        for j in range(8):
            sums[j] += values[i + j] * values[i + j]
        i += 8
    total = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]))
    for value in values[end:]:
        total += value * value
    return total


def _rotate_to_body(x: float, y: float, z: float, w: float, vx: float, vy: float, vz: float) -> tuple:
    """`rotate_to_body` on Python floats: v' = v + w t + u x t with u = -(x, y, z) and t = 2 u x v."""
    ux, uy, uz = -x, -y, -z
    tx, ty, tz = 2.0 * (uy * vz - uz * vy), 2.0 * (uz * vx - ux * vz), 2.0 * (ux * vy - uy * vx)
    return vx + w * tx + (uy * tz - uz * ty), vy + w * ty + (uz * tx - ux * tz), vz + w * tz + (ux * ty - uy * tx)


def rotate_to_body(quat: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Express a world-frame vector in the body frame: R(q)^T v, with q = (x, y, z, w).

    Written out in scalars (`_rotate_to_body`) because np.cross on 3-vectors costs more than the rest of the
    observation.
    """
    return np.array(_rotate_to_body(*_floats(quat), *_floats(vector)))


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
        self.obs_dim = sum(size for _, size, _ in self._sizes)
        self._part_scales = [(name, float(scale)) for name, _, scale in self._sizes]
        self._default_list = self._default.tolist()
        self.act_dim = self.num_joints
        self._action_scale = spec.action_scale
        self._lower_list, self._upper_list = self._lower.tolist(), self._upper.tolist()
        self._phase_rate = 2.0 * np.pi * spec.gait.frequency_hz  # phase = 2 pi f k / rate, in that order
        self._rate = spec.control_rate_hz
        self.nonfinite_actions = 0
        # Per control step k: (default pose + gait offsets, (sin, cos) of the gait phase, the first as a list),
        # filled as steps are first reached. The gait depends on k alone, so a cached entry is exactly what a fresh
        # one would be.
        self._gait_cache: list[tuple[np.ndarray, tuple[float, float], list[float]]] = []
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

    def _gait_terms(self) -> tuple[np.ndarray, tuple[float, float], list[float]]:
        """(default pose + gait offsets (num_joints,), (sin, cos) of the phase, the first as a list) at this step."""
        step, cache = self.step_count, self._gait_cache
        if step < len(cache):
            return cache[step]
        phase = self.phase()
        base = self._default + self.gait_offsets()
        terms = (base, (float(np.sin(phase)), float(np.cos(phase))) if self._gait_on else (0.0, 0.0), base.tolist())
        if step == len(cache) and step < GAIT_CACHE_STEPS:
            cache.append(terms)
        return terms

    def observe(self, state: RobotState) -> np.ndarray:
        """RobotState -> observation vector, float32 (obs_dim,)."""
        # Python floats: (part - offset) * scale per entry is what the numpy expression computed, element by
        # element, and a dozen numpy calls on short vectors cost more than the arithmetic (x * 1.0 == x).
        default = self._default_list
        parts = {
            "gravity": _rotate_to_body(*_floats(state.quat), *_DOWN),
            "gyro": _floats(state.gyro),
            "joint_pos": [q - d for q, d in zip(_floats(state.joint_pos), default, strict=True)],
            "joint_vel": _floats(state.joint_vel),
            "last_action": self.last_action.tolist(),
            "command": _floats(state.command),
            "gait_phase": self._gait_terms()[1],
        }
        values = []
        for name, scale in self._part_scales:
            part = parts[name]
            values += part if scale == 1.0 else [value * scale for value in part]
        if len(values) != self.obs_dim:
            raise ValueError(f"observation parts have {len(values)} entries, layout {self.layout} has {self.obs_dim}")
        # A NaN sensor reading must not reach the policy; zero is the normalizer's centre. A finite sum means every
        # entry is finite (it overflows on huge ones, hence the second test).
        if not math.isfinite(sum(values)) and not all(map(math.isfinite, values)):
            values = [value if math.isfinite(value) else 0.0 for value in values]
        return np.array(values, dtype=np.float32)

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
        if type(action) is not np.ndarray or action.dtype.kind != "f":
            action = np.asarray(action, dtype=np.float64)
        # Python floats for the elementwise work: a dozen numpy calls on 12-vectors cost more than the arithmetic,
        # and float math gives exactly the values of the numpy expressions it replaces.
        values = action.reshape(self.num_joints).tolist()
        # A finite sum means every entry is finite; it overflows on huge ones, hence the second test.
        if not math.isfinite(sum(values)) and not all(map(math.isfinite, values)):
            self.nonfinite_actions += 1
            values = [0.0] * self.num_joints
        # a = clip(action, -1, 1); q* = clip(default + gait + scale * a, lower, upper)
        clipped, targets, scale = [], [], self._action_scale
        for value, base, lower, upper in zip(values, self._gait_terms()[2], self._lower_list, self._upper_list):
            value = -1.0 if value < -1.0 else value
            value = 1.0 if value > 1.0 else value
            clipped.append(value)
            target = base + scale * value
            target = lower if target < lower else target
            targets.append(upper if target > upper else target)
        self.last_action = np.array(clipped)  # a new array every step: callers may keep the previous one
        self.step_count += 1
        return np.array(targets)

    def is_fallen(self, state: RobotState) -> bool:
        return bool(state.fallen) or upright(state.quat) < self.spec.min_upright


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
        # so the values stay exactly those of earlier versions (taken as a float at once: the same double).
        vx, vy, vz = _floats(state.base_vel)
        cx, cy, cyaw = _floats(state.command)
        gx, gy, gz = _floats(state.gyro)
        sigma = self.sigma
        lin_err = (vx - cx) ** 2 + (vy - cy) ** 2
        reward = self.lin_vel * float(np.exp(-lin_err / sigma)) + self.yaw_rate * float(
            np.exp(-((gz - cyaw) ** 2) / sigma)
        )
        reward -= self.vertical_vel * vz**2 + self.angular_xy * (gx**2 + gy**2)
        # |x|^2 as np.sum(x ** 2) adds up, on Python floats (a numpy reduction costs more than the arithmetic).
        change = [a - b for a, b in zip(_floats(action), _floats(previous_action), strict=True)]
        reward -= self.action_rate * _sum_of_squares(change)
        if state.joint_torque is not None:
            reward -= self.torque * _sum_of_squares(_floats(state.joint_torque))
        return float(reward)

"""Fast locomotion task: a planar half-cheetah that must run at a target speed it cannot see.

The model is pybullet_data's `mjcf/half_cheetah.xml` (MuJoCo's half-cheetah: a planar root of x slide, z slide
and pitch hinge, six actuated hinges). Each task sets the target velocity (as in MAML's HalfCheetahVel) and the
dynamics: link masses, ground friction and motor strength. Same interface as `PointNavEnv` and `LocomotionEnv`:
a task dataclass with `to_dict`/`from_dict`, a distribution with `sample_tasks(n, rng)` built from YAML ranges,
`set_task`/`get_task`, an optional privileged observation, the Gymnasium API. A few thousand steps per second:
no Python work per physics step beyond setting the held torque, and one joint-state read per control step.

PyBullet's MJCF importer keeps masses, joint limits and contact geometry but drops the MJCF's joint springs and
dampers; this task does not add them back, so it is its own benchmark, not MuJoCo's numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import pybullet
import pybullet_data

from controller.config import build, to_dict
from controller.errors import ConfigError
from sim.tasks import ParameterRange

CHEETAH_MJCF = "mjcf/half_cheetah.xml"
ROOT_JOINTS = ("ignorex", "ignorez", "ignorey")
"""The planar root: x slide (m), z slide (m, from the spawn height), pitch hinge (rad)."""
ACTUATED_JOINTS = ("bthigh", "bshin", "bfoot", "fthigh", "fshin", "ffoot")
GEARS = (120.0, 90.0, 60.0, 120.0, 60.0, 30.0)
"""The MJCF's motor gears: torque (N m) at action 1 and motor strength 1, in `ACTUATED_JOINTS` order."""

# Physical bounds of each task parameter: (low, high), both included unless named in _OPEN_BELOW.
TASK_BOUNDS: dict[str, tuple[float, float]] = {
    "target_velocity": (-10.0, 10.0),
    "mass_scale": (0.0, 10.0),
    "friction": (0.0, 5.0),
    "motor_strength": (0.0, 5.0),
}
_OPEN_BELOW = ("mass_scale", "motor_strength")
"""Parameters that must be strictly above their lower bound (a massless link or a dead motor is no task)."""

DEFAULT_RANGES: dict[str, dict[str, Any]] = {
    "target_velocity": {"low": 0.0, "high": 2.0},
    "mass_scale": {"low": 0.7, "high": 1.4, "log": True},
    "friction": {"low": 0.4, "high": 1.2},
    "motor_strength": {"low": 0.8, "high": 1.2},
}
"""MAML's HalfCheetahVel speeds (uniform in [0, 2] m/s) plus moderate dynamics randomization."""


def _check_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"'{where}' must be a finite number, got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass
class CheetahTask:
    """One half-cheetah setting: the speed to run at and the dynamics to run with."""

    target_velocity: float = 1.0
    """Forward speed the reward asks for (m/s, +x)."""
    mass_scale: float = 1.0
    """Every link's mass and inertia are the model's times this."""
    friction: float = 0.8
    """Foot-ground lateral friction coefficient (the MJCF's geoms say 0.8)."""
    motor_strength: float = 1.0
    """Every motor's torque is its gear times the action times this."""

    def __post_init__(self) -> None:
        for name, (low, high) in TASK_BOUNDS.items():
            value = _check_number(f"task.{name}", getattr(self, name))
            below = value <= low if name in _OPEN_BELOW else value < low
            if below or value > high:
                interval = f"({low}, {high}]" if name in _OPEN_BELOW else f"[{low}, {high}]"
                raise ConfigError(f"'task.{name}' must be in {interval}, got {value}")
            setattr(self, name, value)

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in dataclasses.asdict(self).items()}

    def vector(self) -> np.ndarray:
        """Every field in field order as float32 (the privileged observation for an oracle)."""
        return np.array([getattr(self, f.name) for f in dataclasses.fields(self)], dtype=np.float32)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CheetahTask:
        return build(cls, data or {}, "task")


@dataclass
class CheetahTaskDistribution:
    """Ranges over `CheetahTask` fields, as in the A1's task YAML; fields not named stay at their default.

    Each range is `{low, high}` (uniform), `{low, high, log: true}` (log-uniform), a list (choices) or a number::

        tasks:
          target_velocity: {low: 0.0, high: 3.0}
          mass_scale: {low: 0.5, high: 2.0, log: true}
          friction: [0.4, 0.8, 1.2]
    """

    ranges: dict[str, ParameterRange] = field(
        default_factory=lambda: {name: ParameterRange(**spec) for name, spec in DEFAULT_RANGES.items()}
    )

    def __post_init__(self) -> None:
        valid = [f.name for f in dataclasses.fields(CheetahTask)]
        for name, spec in self.ranges.items():
            if name not in valid:
                raise ConfigError(f"unknown task parameter 'tasks.{name}'; valid: {', '.join(valid)}")
            spec.check(name, CheetahTask, where=f"tasks.{name}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CheetahTaskDistribution:
        """Build from YAML-style ranges; `None` gives the default ranges, `{}` no randomization at all."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"config section 'tasks' must be a mapping, got {type(data).__name__}")
        ranges = {}
        for name, spec in data.items():
            if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
                spec = {"choices": [spec]}
            elif isinstance(spec, list):
                spec = {"choices": spec}
            ranges[name] = build(ParameterRange, spec, f"tasks.{name}")
        return cls(ranges)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            name: {key: value for key, value in to_dict(spec).items() if value is not None}
            for name, spec in self.ranges.items()
        }

    def sample_tasks(self, num_tasks: int, rng: np.random.Generator) -> list[CheetahTask]:
        """Draw `num_tasks` tasks; per task, the ranged fields are drawn in `CheetahTask` field order."""
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 0:
            raise ValueError(f"num_tasks must be a non-negative int, got {num_tasks!r}")
        names = [f.name for f in dataclasses.fields(CheetahTask) if f.name in self.ranges]
        return [CheetahTask(**{name: self.ranges[name].sample(rng) for name in names}) for _ in range(num_tasks)]


class HalfCheetahVelEnv(gym.Env):
    """Run forward at the task's target velocity.

    Each step holds the torques tau_j = motor_strength * gear_j * clip(a_j, -1, 1) for `frame_skip` physics
    steps of `timestep` seconds. Reward: -|v_x - target_velocity| - control_cost * |a|^2, with v_x the torso's
    mean forward speed over the step. Observation (17,): root z and pitch, the six joint angles, then the
    velocities of the root's x, z, pitch and of the six joints (the root's x position is left out, as in
    MuJoCo's HalfCheetah); with `privileged`, `CheetahTask.vector()` follows (4 more). The cheetah cannot fall
    out of its plane, so episodes never terminate; they are truncated after `max_episode_steps`.

    Resets restore a saved state (no reload) and add uniform noise of `reset_noise` to every root and joint
    position and velocity. restoreState keeps `changeDynamics` edits, so the task's dynamics are set
    explicitly by `set_task` and again at each reset.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: CheetahTask | None = None,
        *,
        max_episode_steps: int = 200,
        frame_skip: int = 5,
        timestep: float = 0.01,
        solver_iterations: int = 10,
        control_cost: float = 0.05,
        reset_noise: float = 0.1,
        privileged: bool = False,
    ) -> None:
        self.max_episode_steps = _check_positive_int("max_episode_steps", max_episode_steps)
        self.frame_skip = _check_positive_int("frame_skip", frame_skip)
        solver_iterations = _check_positive_int("solver_iterations", solver_iterations)
        if not _check_number("timestep", timestep) > 0.0:
            raise ConfigError(f"timestep must be > 0, got {timestep!r}")
        for name, value in (("control_cost", control_cost), ("reset_noise", reset_noise)):
            if not _check_number(name, value) >= 0.0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        self.timestep = float(timestep)
        self.dt = self.timestep * self.frame_skip
        self.control_cost = float(control_cost)
        self.reset_noise = float(reset_noise)
        self.privileged = bool(privileged)
        num_obs = 2 * len(ROOT_JOINTS) + 2 * len(ACTUATED_JOINTS) - 1
        if privileged:
            num_obs += len(dataclasses.fields(CheetahTask))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (num_obs,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (len(ACTUATED_JOINTS),), np.float32)
        self._client = pybullet.connect(pybullet.DIRECT)
        self._pid = os.getpid()
        self._load(solver_iterations)
        self._task = CheetahTask()
        self.set_task(task or CheetahTask())
        self._steps = 0
        self._x = 0.0  # the root's x at the last step (the spawn state until the first reset)

    def _load(self, solver_iterations: int) -> None:
        cid = self._client
        pybullet.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=cid)
        pybullet.setGravity(0, 0, -9.81, physicsClientId=cid)
        pybullet.setTimeStep(self.timestep, physicsClientId=cid)
        # Same contact order after restoreState, so a seeded episode repeats exactly.
        pybullet.setPhysicsEngineParameter(
            numSolverIterations=solver_iterations, deterministicOverlappingPairs=1, physicsClientId=cid
        )
        self._ground = pybullet.loadURDF("plane.urdf", physicsClientId=cid)
        (self._body,) = pybullet.loadMJCF(CHEETAH_MJCF, physicsClientId=cid)
        num_links = pybullet.getNumJoints(self._body, physicsClientId=cid)
        infos = [pybullet.getJointInfo(self._body, j, physicsClientId=cid) for j in range(num_links)]
        index = {info[1].decode(): info[0] for info in infos}
        self._joints = [index[name] for name in ROOT_JOINTS + ACTUATED_JOINTS]
        self._actuated = self._joints[len(ROOT_JOINTS) :]
        # Torque control: switch off PyBullet's default velocity motors on every moving joint, root included.
        moving = [info[0] for info in infos if info[2] != pybullet.JOINT_FIXED]
        pybullet.setJointMotorControlArray(
            self._body, moving, pybullet.VELOCITY_CONTROL, forces=[0.0] * len(moving), physicsClientId=cid
        )
        # Nominal (mass, local inertia diagonal) of every link that has mass; the dummy links of the root stay 0.
        self._nominal = []
        for link in range(-1, num_links):
            mass, _, inertia = pybullet.getDynamicsInfo(self._body, link, physicsClientId=cid)[:3]
            if mass > 0:
                self._nominal.append((link, mass, inertia))
            # With the cheetah's friction at 1 the contact's friction is the ground's (Bullet multiplies them).
            pybullet.changeDynamics(self._body, link, lateralFriction=1.0, physicsClientId=cid)
        self._gears = np.array(GEARS)
        self._initial_state = pybullet.saveState(physicsClientId=cid)

    # -- task ----------------------------------------------------------------------------------

    def set_task(self, task: CheetahTask) -> None:
        """Switch target velocity and dynamics; takes effect now and persists across resets."""
        if not isinstance(task, CheetahTask):
            raise TypeError(f"HalfCheetahVelEnv.set_task expects a CheetahTask, got {type(task).__name__}")
        self._task = task
        self._apply_dynamics()

    def get_task(self) -> CheetahTask:
        return self._task

    def _apply_dynamics(self) -> None:
        """Make masses and ground friction match the task now (the motor strength acts in `step`)."""
        cid, task = self._client, self._task
        for link, mass, inertia in self._nominal:
            pybullet.changeDynamics(
                self._body,
                link,
                mass=mass * task.mass_scale,
                localInertiaDiagonal=[value * task.mass_scale for value in inertia],
                physicsClientId=cid,
            )
        pybullet.changeDynamics(self._ground, -1, lateralFriction=task.friction, physicsClientId=cid)
        self._torque_scale = task.motor_strength * self._gears

    # -- episode -------------------------------------------------------------------------------

    def _read(self) -> tuple[list[float], list[float]]:
        """Positions and velocities of the root and the actuated joints, in that order (9,) each."""
        states = pybullet.getJointStates(self._body, self._joints, self._client)
        return [s[0] for s in states], [s[1] for s in states]

    def _observation(self, q: list[float], dq: list[float]) -> np.ndarray:
        obs = q[1:] + dq  # the root's x position is left out: the task is the same wherever the cheetah is
        if self.privileged:
            obs += self._task.vector().tolist()
        return np.array(obs, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options and "task" in options:
            self.set_task(options["task"])
        cid, body = self._client, self._body
        pybullet.restoreState(self._initial_state, physicsClientId=cid)
        self._apply_dynamics()
        noise = self.reset_noise
        if noise > 0:
            offsets = self.np_random.uniform(-noise, noise, (2, len(self._joints)))
            for joint, position, velocity in zip(self._joints, *offsets):
                pybullet.resetJointState(body, joint, position, velocity, physicsClientId=cid)
        self._steps = 0
        q, dq = self._read()
        self._x = q[0]
        return self._observation(q, dq), {"task": self._task.to_dict()}

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"HalfCheetahVelEnv action must have shape {self.action_space.shape}, got {action.shape}")
        if not np.isfinite(action).all():
            raise ValueError(f"HalfCheetahVelEnv action must be finite, got {action}")
        action = np.minimum(np.maximum(action, -1.0), 1.0)
        cid, body, joints, mode = self._client, self._body, self._actuated, pybullet.TORQUE_CONTROL
        torque = (self._torque_scale * action).tolist()  # tau_j = motor_strength * gear_j * a_j
        for _ in range(self.frame_skip):
            # PyBullet applies a TORQUE_CONTROL torque for one physics step only: set it before each.
            pybullet.setJointMotorControlArray(body, joints, mode, forces=torque, physicsClientId=cid)
            pybullet.stepSimulation(cid)
        q, dq = self._read()
        velocity = (q[0] - self._x) / self.dt  # mean forward speed over the step
        self._x = q[0]
        self._steps += 1
        # r = -|v_x - v*| - c |a|^2
        reward = -abs(velocity - self._task.target_velocity) - self.control_cost * float(action @ action)
        truncated = self._steps >= self.max_episode_steps
        info = {"velocity": velocity, "x": q[0]}
        return self._observation(q, dq), reward, False, truncated, info

    def close(self) -> None:
        if getattr(self, "_client", None) is not None and self._pid == os.getpid():
            pybullet.disconnect(physicsClientId=self._client)
        self._client = None

    def __del__(self) -> None:
        # Envs made per task and dropped must not leak PyBullet clients (as BulletClient does for LocomotionEnv);
        # a forked copy leaves its parent's client alone.
        with contextlib.suppress(pybullet.error):
            self.close()

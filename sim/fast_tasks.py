"""Fast tasks for developing and testing meta-learning algorithms in seconds.

`PointNavEnv` is a 2-D point robot that must reach a goal it cannot see, on ground whose friction
(a velocity-damping coefficient) it does not know. It offers the locomotion env's task interface
(`set_task`, `get_task`, a task dataclass with `to_dict`/`from_dict`, a distribution with
`sample_tasks(n, rng)`) and the Gymnasium API, in pure numpy: thousands of steps per second.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from controller.config import build, to_dict
from controller.errors import ConfigError


def _check_finite(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"'{where}' must be a finite number, got {value!r}")
    return float(value)


@dataclass
class PointNavTask:
    """One point-navigation setting: where the goal is and how much the ground damps motion."""

    goal_x: float = 1.0
    """Goal x position (m)."""
    goal_y: float = 0.0
    """Goal y position (m)."""
    damping: float = 1.0
    """Ground friction as a velocity-damping rate (1/s): dv/dt = gain * action - damping * v."""

    def __post_init__(self) -> None:
        for name in ("goal_x", "goal_y", "damping"):
            setattr(self, name, _check_finite(f"task.{name}", getattr(self, name)))
        if self.damping < 0.0:
            raise ConfigError(f"'task.damping' must be >= 0, got {self.damping}")

    def to_dict(self) -> dict[str, float]:
        return {key: float(value) for key, value in dataclasses.asdict(self).items()}

    def vector(self) -> np.ndarray:
        """[goal_x, goal_y, damping] as float32 (the privileged observation for an oracle)."""
        return np.array([self.goal_x, self.goal_y, self.damping], dtype=np.float32)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PointNavTask:
        return build(cls, data or {}, "task")


@dataclass
class PointNavTaskDistribution:
    """Goals on an arc of a ring around the start, damping drawn log-uniformly.

    Angles are in radians measured from the +x axis; the default is the upper half circle, so a
    policy that ignores the task heads for the middle of the arc and adaptation has room to help.
    With `num_angles` > 0 the goal angle is one of that many evenly spaced angles from `angle_low`
    to `angle_high` (both included): a few discrete goal directions, MLSH's "movement bandits",
    where distinct tasks need distinct skills.
    """

    radius_low: float = 1.0
    """Smallest goal distance from the origin (m)."""
    radius_high: float = 1.0
    """Largest goal distance from the origin (m)."""
    angle_low: float = 0.0
    """Start of the goal arc (rad)."""
    angle_high: float = math.pi
    """End of the goal arc (rad)."""
    damping_low: float = 0.5
    """Smallest damping rate (1/s)."""
    damping_high: float = 4.0
    """Largest damping rate (1/s); drawn log-uniformly between the two."""
    num_angles: int = 0
    """0: the goal angle is uniform on the arc; n > 0: one of n evenly spaced angles on it, ends
    included (n = 1: `angle_low`)."""

    def __post_init__(self) -> None:
        if isinstance(self.num_angles, bool) or not isinstance(self.num_angles, int) or self.num_angles < 0:
            raise ConfigError(f"'tasks.num_angles' must be an int >= 0, got {self.num_angles!r}")
        for field in dataclasses.fields(self):
            if field.name != "num_angles":
                setattr(self, field.name, _check_finite(f"tasks.{field.name}", getattr(self, field.name)))
        for low, high in (("radius_low", "radius_high"), ("angle_low", "angle_high"), ("damping_low", "damping_high")):
            if getattr(self, low) > getattr(self, high):
                raise ConfigError(f"'tasks.{low}' = {getattr(self, low)} > 'tasks.{high}' = {getattr(self, high)}")
        if self.radius_low < 0.0:
            raise ConfigError(f"'tasks.radius_low' must be >= 0, got {self.radius_low}")
        if self.damping_low <= 0.0:
            raise ConfigError(f"'tasks.damping_low' must be > 0 (log-uniform), got {self.damping_low}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PointNavTaskDistribution:
        return build(cls, data or {}, "tasks")

    def to_dict(self) -> dict[str, float | int]:
        return to_dict(self)

    def angles(self) -> np.ndarray:
        """[num_angles] the discrete goal angles (rad); empty when the angle is continuous."""
        if self.num_angles == 1:
            return np.array([self.angle_low])
        return np.linspace(self.angle_low, self.angle_high, self.num_angles)

    def sample_tasks(self, num_tasks: int, rng: np.random.Generator) -> list[PointNavTask]:
        """Draw `num_tasks` tasks; radius, angle (or angle index) and damping are drawn in that order per task."""
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 0:
            raise ValueError(f"num_tasks must be a non-negative int, got {num_tasks!r}")
        tasks, angles = [], self.angles()
        for _ in range(num_tasks):
            radius = rng.uniform(self.radius_low, self.radius_high)
            angle = angles[rng.integers(len(angles))] if len(angles) else rng.uniform(self.angle_low, self.angle_high)
            damping = math.exp(rng.uniform(math.log(self.damping_low), math.log(self.damping_high)))
            tasks.append(PointNavTask(radius * math.cos(angle), radius * math.sin(angle), damping))
        return tasks


class PointNavEnv(gym.Env):
    """A point mass pushed by a 2-D force toward a goal it cannot see.

    Dynamics per step (semi-implicit Euler, dt seconds):
        v <- v + dt * (force_gain * clip(action, -1, 1) - damping * v)
        p <- p + dt * v
    Reward: -||p - goal|| - action_cost * ||action||^2. Observation: [p_x, p_y, v_x, v_y], plus the
    task vector [goal_x, goal_y, damping] when `privileged`. The episode never terminates; it is
    truncated after `max_episode_steps`. The start position is jittered by `start_noise` (uniform).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: PointNavTask | None = None,
        *,
        max_episode_steps: int = 20,
        dt: float = 0.1,
        force_gain: float = 4.0,
        action_cost: float = 0.01,
        start_noise: float = 0.05,
        privileged: bool = False,
    ) -> None:
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ConfigError(f"max_episode_steps must be a positive int, got {max_episode_steps!r}")
        for name, value in (("dt", dt), ("force_gain", force_gain)):
            if not _check_finite(name, value) > 0.0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        for name, value in (("action_cost", action_cost), ("start_noise", start_noise)):
            if not _check_finite(name, value) >= 0.0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        self.max_episode_steps = max_episode_steps
        self.dt = float(dt)
        self.force_gain = float(force_gain)
        self.action_cost = float(action_cost)
        self.start_noise = float(start_noise)
        self.privileged = bool(privileged)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (7 if privileged else 4,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._task = PointNavTask()
        self.set_task(task or PointNavTask())
        # State as Python floats: for two dimensions, scalar arithmetic beats numpy's per-call overhead.
        self._x = self._y = self._vx = self._vy = 0.0
        self._steps = 0

    def set_task(self, task: PointNavTask) -> None:
        """Switch goal and damping; takes effect now and persists across resets."""
        if not isinstance(task, PointNavTask):
            raise TypeError(f"PointNavEnv.set_task expects a PointNavTask, got {type(task).__name__}")
        self._task = task

    def get_task(self) -> PointNavTask:
        return self._task

    def _observation(self) -> np.ndarray:
        state = [self._x, self._y, self._vx, self._vy]
        if self.privileged:
            state += [self._task.goal_x, self._task.goal_y, self._task.damping]
        return np.array(state, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options and "task" in options:
            self.set_task(options["task"])
        self._x, self._y = (float(v) for v in self.np_random.uniform(-self.start_noise, self.start_noise, size=2))
        self._vx = self._vy = 0.0
        self._steps = 0
        return self._observation(), {"task": self._task.to_dict()}

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"PointNavEnv action must have shape (2,), got {action.shape}")
        ax, ay = (min(max(float(a), -1.0), 1.0) for a in action)
        dt, gain, damping = self.dt, self.force_gain, self._task.damping
        self._vx += dt * (gain * ax - damping * self._vx)
        self._vy += dt * (gain * ay - damping * self._vy)
        self._x += dt * self._vx
        self._y += dt * self._vy
        self._steps += 1
        distance = math.hypot(self._x - self._task.goal_x, self._y - self._task.goal_y)
        reward = -distance - self.action_cost * (ax * ax + ay * ay)
        truncated = self._steps >= self.max_episode_steps
        return self._observation(), reward, False, truncated, {"distance": distance}

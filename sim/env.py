"""Gymnasium locomotion env: PD joint-target actions on a PyBullet robot, velocity tracking reward."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from controller.mapping import LocomotionReward, ObservationMapping, RobotState
from controller.robot import RobotSpec, load_robot_spec
from sim.pybullet_robot import SimRobot
from sim.tasks import Task


class LocomotionEnv(gym.Env):
    """Walk at the task's commanded velocity.

    Observations and targets come from `ObservationMapping`, the reward from `LocomotionReward`,
    both computed from a `RobotState` exactly as on the robot. Termination: the trunk touches the
    ground or the body tilts past the spec's limit. Truncation: `episode_seconds` elapsed.

    Everything a `Task` randomizes (dynamics, terrain, delays, sensor errors, pushes) acts inside
    `SimRobot`; a seeded `reset` fixes the episode's random draws. With `privileged=True` the
    observation ends with `Task.vector()` (every task field but the seed, in field order).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        robot: RobotSpec | str = "a1",
        task: Task | None = None,
        *,
        episode_seconds: float = 20.0,
        joint_noise: float = 0.05,
        reward: LocomotionReward | None = None,
        privileged: bool = False,
    ) -> None:
        self.spec_robot = robot if isinstance(robot, RobotSpec) else load_robot_spec(robot)
        self.mapping = ObservationMapping(self.spec_robot)
        self.reward_fn = reward or LocomotionReward()
        self.sim = SimRobot(self.spec_robot)
        self.sim.apply_task(task or Task())
        self.max_steps = int(round(episode_seconds * self.spec_robot.control_rate_hz))
        self.joint_noise = joint_noise
        self.privileged = privileged
        obs_dim = self.mapping.obs_dim + (len(Task().vector()) if privileged else 0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.mapping.act_dim,), np.float32)
        self._kp = self.spec_robot.kp
        self._kd = self.spec_robot.kd
        self._dt = 1.0 / self.spec_robot.control_rate_hz
        self._steps = 0
        self._state: RobotState | None = None
        self._command_of: tuple[float, np.ndarray] = (math.nan, np.zeros(3))  # (command_vx, the command vector)

    def set_task(self, task: Task) -> None:
        """Switch the live world to another task; takes effect now and persists across resets."""
        self.sim.apply_task(task)

    def get_task(self) -> Task:
        return self.sim.task

    def _command(self) -> np.ndarray:
        command_vx = self.sim.task.command_vx
        if command_vx != self._command_of[0]:
            self._command_of = (command_vx, np.array([command_vx, 0.0, 0.0]))
        return self._command_of[1].copy()

    def _observation(self, state: RobotState) -> np.ndarray:
        obs = self.mapping.observe(state)
        if self.privileged:
            obs = np.concatenate([obs, self.sim.task.vector()])
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options and "task" in options:
            self.set_task(options["task"])
        self.sim.reset(self.np_random, self.joint_noise)
        self.mapping.reset()
        self._steps = 0
        self._state = self.sim.read_state(self._command(), self._dt)
        return self._observation(self._state), {"task": self.sim.task.to_dict()}

    def step(self, action: np.ndarray):
        mapping, sim = self.mapping, self.sim
        previous = mapping.last_action  # targets() binds a new array
        sim.step(mapping.targets(action), self._kp, self._kd)
        self._steps += 1
        self._state = state = sim.read_state(self._command(), self._dt)
        reward = self.reward_fn(state, mapping.last_action, previous)
        terminated = mapping.is_fallen(state)
        truncated = self._steps >= self.max_steps and not terminated
        info = {"base_vel": state.base_vel}
        return self._observation(state), float(reward), bool(terminated), truncated, info

    @property
    def state(self) -> RobotState | None:
        return self._state

    def close(self) -> None:
        self.sim.close()

"""The robot behind a serial link, with the sim env's reset/step interface.

Composed with a policy runtime by the control loop; it shares the observation/action mapping and
the reward with the simulator (controller.mapping), so nothing is indexed by hand twice.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from controller.mapping import LocomotionReward, ObservationMapping, RobotState
from controller.robot import RobotSpec
from deploy.errors import LinkError
from deploy.link import Link, handshake
from deploy.protocol import Capabilities, Capability, Command, Mode, ModeRequest, Reset, State, StateFlag

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Sensor corrections the host applies: reading - offset, target + offset."""

    joint_offsets: np.ndarray | None = None
    gyro_bias: np.ndarray = field(default_factory=lambda: np.zeros(3))


class RobotEnv:
    """A real (or emulated) robot as an episodic env: `reset()` -> obs, `step(action)` -> 5-tuple.

    The robot paces the loop: each step answers the latest State with a Command and waits for the
    next State. A State whose tick does not follow the previous one is a gap; the episode is then
    marked incomplete (`info["gaps"]`) so learning can exclude it.
    """

    def __init__(
        self,
        url: str,
        spec: RobotSpec,
        *,
        command: tuple[float, float, float] = (0.5, 0.0, 0.0),
        episode_seconds: float = 10.0,
        calibration: Calibration | None = None,
        reset_wait: float | None = None,
        state_timeout: float = 0.5,
        host_name: str = "metactl",
    ) -> None:
        self.url = url
        self.spec = spec
        self.mapping = ObservationMapping(spec)
        self.reward_fn = LocomotionReward()
        self.command = np.asarray(command, dtype=np.float64)
        self.max_steps = int(round(episode_seconds * spec.control_rate_hz))
        self.calibration = calibration or Calibration()
        self.offsets = (
            np.zeros(spec.num_joints)
            if self.calibration.joint_offsets is None
            else np.asarray(self.calibration.joint_offsets, dtype=np.float64)
        )
        self.reset_wait = reset_wait
        self.state_timeout = state_timeout
        self.host_name = host_name
        self.link = Link(url)
        self.capabilities: Capabilities | None = None
        self._kp = np.full(spec.num_joints, spec.kp)
        self._kd = np.full(spec.num_joints, spec.kd)
        self._last: State | None = None
        self._steps = 0
        self.gaps = 0

    def connect(self, timeout: float = 5.0) -> Capabilities:
        self.link.open()
        self.link.reset_input()
        self.capabilities = handshake(self.link, self.host_name, timeout=timeout)
        return self.capabilities

    def robot_state(self, message: State) -> RobotState:
        """Protocol State -> RobotState in the spec's frame (calibration applied)."""
        return RobotState(
            joint_pos=message.joint_pos.astype(np.float64) - self.offsets,
            joint_vel=message.joint_vel.astype(np.float64),
            quat=message.quat.astype(np.float64),
            gyro=message.gyro.astype(np.float64) - self.calibration.gyro_bias,
            accel=message.accel.astype(np.float64),
            base_vel=message.base_vel.astype(np.float64),
            joint_torque=message.joint_torque.astype(np.float64),
            command=self.command.copy(),
            tick=message.tick,
            time=message.time,
            fallen=bool(message.flags & StateFlag.FALLEN),
        )

    def wait_state(self, timeout: float | None = None) -> State:
        message = self.link.latest_state(timeout=self.state_timeout if timeout is None else timeout)
        if message is None:
            raise LinkError(f"no State from the robot on {self.url} within {self.state_timeout:.2f} s")
        return message

    def _request_reset(self) -> None:
        can_reset = self.capabilities is not None and self.capabilities.flags & Capability.RESET_SUPPORTED
        if can_reset:
            self.link.send(Reset(Reset.REQUEST))
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                reply = self.link.recv(timeout=deadline - time.monotonic())
                if isinstance(reply, Reset):
                    if reply.status == Reset.DONE:
                        return
                    break
        # The robot cannot reset itself: the operator puts it back.
        self.damp()
        if self.reset_wait is not None:
            logger.warning("robot refused reset; waiting %.1f s for the operator", self.reset_wait)
            time.sleep(self.reset_wait)
        elif sys.stdin is not None and sys.stdin.isatty():
            input("Put the robot back in its start pose, then press Enter ")
        else:
            raise LinkError("the robot refused to reset and no operator is attached; pass --reset-wait SECONDS")

    def reset(self) -> tuple[np.ndarray, dict]:
        self._request_reset()
        self.mapping.reset()
        self._steps = 0
        self.gaps = 0
        self._last = self.wait_state()
        state = self.robot_state(self._last)
        return self.mapping.observe(state), {"state": state}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        previous = self.mapping.last_action.copy()
        targets = self.mapping.targets(action) + self.offsets
        self.link.send(Command(self._last.tick, targets, self._kp, self._kd))
        message = self.wait_state()
        gap = message.tick != (self._last.tick + 1) % 2**32
        if gap:
            self.gaps += 1
        self._last = message
        self._steps += 1
        state = self.robot_state(message)
        reward = self.reward_fn(state, self.mapping.last_action, previous)
        terminated = self.mapping.is_fallen(state)
        truncated = self._steps >= self.max_steps and not terminated
        info = {"state": state, "gap": gap, "mode": message.mode}
        return self.mapping.observe(state), reward, terminated, truncated, info

    def damp(self) -> None:
        """Command damping; best effort (the robot's own watchdog is the backstop)."""
        if self.link.is_open:
            try:
                self.link.send(ModeRequest(Mode.DAMPING))
            except LinkError as error:
                logger.warning("could not command damping: %s", error)

    def close(self) -> None:
        try:
            self.damp()
        finally:
            self.link.close()

"""The robot behind a serial link, with the sim env's reset/step interface.

Composed with a policy runtime by the control loop; it shares the observation/action mapping and
the reward with the simulator (controller.mapping), so nothing is indexed by hand twice.

Safety phases are explicit methods: `soft_start` (ramp from the measured pose to the default pose
before the policy takes over), `safe_targets` (finite, rate-limited, inside the joint limits: what
every Command carries), a fall ends the episode and damps at once, `stop` (damping, confirmed by
the robot's State) and `emergency_stop` (EStop, latched on the robot until a Reset).

Link faults: the link counts corrupt frames and sequence gaps (`link.stats`), the receiving side
drops a State that is not newer than the last one used (deploy/robot_states.py), and a lost port is
reopened with backoff (deploy/reconnect.py). An episode that saw a gap, a reconnect, a watchdog trip
or a non-finite reading counts it in `gaps`, which marks the episode incomplete so learning leaves it out.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from controller.errors import ConfigError
from controller.mapping import LocomotionReward, ObservationMapping, RobotState, quat_from_roll_pitch
from controller.robot import RobotSpec
from deploy.errors import DeployError, LinkError
from deploy.link import Link, handshake
from deploy.messages import Capabilities, Capability, Command, EStop, Mode, ModeRequest, State
from deploy.reconnect import Backoff, reconnect
from deploy.robot_states import (
    TICK_MODULO,
    Calibration,
    RobotHealth,
    StateReceiver,
    calibrated_state,
    finite_reading,
)
from deploy.target_limits import TargetLimits

logger = logging.getLogger(__name__)


class RobotEnv:
    """A real (or emulated) robot as an episodic env: `reset()` -> obs, `step(action)` -> 5-tuple.

    The robot paces the loop: each step answers the latest State with a Command and waits for the
    next State. A State whose tick does not follow the previous one is a gap; the episode is then
    marked incomplete (`gaps`, `info["gap"]`) so learning can exclude it.

    Args:
        max_target_step: Largest change of any joint target per control tick (rad); None: 2 x the
            spec's action_scale (0.4 rad for the A1, 20 rad/s at 50 Hz, about its joints' top
            speed). A flip across the whole action range in one tick is the most a policy can ask
            for by itself; bigger jumps (the first command far from the measured pose, a command
            after a reconnect, a policy swap) are spread over several ticks.
        soft_start_seconds: Ramp from the measured pose to the default pose over this long before the
            policy takes over, unless the robot already stands there (0: never).
        soft_start_tolerance: The robot "stands in the default pose" when every joint is this close (rad).
        reconnect_timeout: Give up reconnecting after this many seconds (LinkError naming the url).
        backoff: Waits between reconnection attempts (default 0.05 s doubling to 0.5 s).
        resend_interval: Lockstep only: resend the last Command after this many seconds without a State.
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
        max_target_step: float | None = None,
        soft_start_seconds: float = 1.0,
        soft_start_tolerance: float = 0.1,
        reconnect_timeout: float = 3.0,
        backoff: Backoff | None = None,
        resend_interval: float = 0.25,
    ) -> None:
        self.url = url
        self.spec = spec
        self.mapping = ObservationMapping(spec)
        self.reward_fn = LocomotionReward()
        self.command = np.asarray(command, dtype=np.float64)
        self.max_steps = int(round(episode_seconds * spec.control_rate_hz))
        self.calibration = calibration or Calibration()
        self._mount = quat_from_roll_pitch(*np.asarray(self.calibration.imu_tilt, dtype=np.float64))
        self.offsets = (
            np.zeros(spec.num_joints)
            if self.calibration.joint_offsets is None
            else np.asarray(self.calibration.joint_offsets, dtype=np.float64)
        )
        if self.offsets.shape != (spec.num_joints,) or not np.all(np.isfinite(self.offsets)):
            raise ConfigError(f"calibration joint_offsets must be {spec.num_joints} finite values, got {self.offsets}")
        self.max_target_step = 2.0 * spec.action_scale if max_target_step is None else float(max_target_step)
        for name, value in (
            ("max_target_step", self.max_target_step),
            ("state_timeout", state_timeout),
            ("reconnect_timeout", reconnect_timeout),
            ("resend_interval", resend_interval),
        ):
            if not value > 0:
                raise ConfigError(f"{name}={value} must be positive")
        if soft_start_seconds < 0 or soft_start_tolerance < 0:
            raise ConfigError(f"soft_start_seconds={soft_start_seconds}, tolerance={soft_start_tolerance} must be >= 0")
        self.soft_start_seconds = soft_start_seconds
        self.soft_start_tolerance = soft_start_tolerance
        self.reconnect_timeout = reconnect_timeout
        self.backoff = backoff or Backoff()
        self.reset_wait = reset_wait
        self.host_name = host_name
        self.link = Link(url)
        self.capabilities: Capabilities | None = None
        self.health = RobotHealth()
        self.receiver = StateReceiver(
            self.link,
            self.health,
            state_timeout=state_timeout,
            resend_interval=resend_interval,
            control_rate_hz=spec.control_rate_hz,
        )
        self._limits = TargetLimits(spec, self.offsets, self.max_target_step, self.health)
        self._kp = np.full(spec.num_joints, spec.kp)
        self._kd = np.full(spec.num_joints, spec.kd)
        self._default = spec.array("default_pose")
        self._targets = self._default + self.offsets  # the last targets sent (rate-limit reference), always finite
        self._last: State | None = None
        self._engaged = False  # the robot reported POSITION since the last reset or reconnect
        self._estopped = False
        self._damped = False  # DAMPING requested since the last Command
        self._steps = 0
        self.gaps = 0
        self.reconnects = 0
        self.ticks: list[int] = []
        self.last_command: Command | None = None
        self.last_command_time: float | None = None
        self.stopped_state: State | None = None

    # -- connection -------------------------------------------------------------------------------

    @property
    def lockstep(self) -> bool:
        return self.capabilities is not None and bool(self.capabilities.flags & Capability.LOCKSTEP)

    def connect(self, timeout: float = 5.0) -> Capabilities:
        self.link.open()
        self.link.reset_input()
        self.capabilities = handshake(self.link, self.host_name, timeout=timeout)
        return self.capabilities

    def _reconnect(self, error: LinkError) -> None:
        logger.warning("lost the robot on %s (%s); reconnecting", self.url, error)
        start = time.monotonic()
        self.capabilities, attempts = reconnect(
            self.link, self.host_name, timeout=self.reconnect_timeout, backoff=self.backoff, expected=self.capabilities
        )
        took = time.monotonic() - start
        self.health.reconnects += 1
        self.health.reconnect_seconds.append(took)
        self.reconnects += 1
        self._engaged = False
        logger.warning("reconnected to %s after %.2f s (%d attempts)", self.url, took, attempts)

    # -- messages and States ------------------------------------------------------------------------

    def robot_state(self, message: State) -> RobotState:
        """Protocol State -> RobotState in the spec's frame (calibration applied)."""
        return calibrated_state(message, self.offsets, self._mount, self.calibration.gyro_bias, self.command)

    def wait_state(self, timeout: float | None = None) -> State:
        """The newest State not returned before, as received (no tick check)."""
        return self.receiver.wait_state(timeout)

    # -- safety -----------------------------------------------------------------------------------

    def safe_targets(self, targets: np.ndarray) -> np.ndarray:
        """Joint targets (n,) in the robot's encoder frame -> what may go to the motors (n,) (`TargetLimits.clamp`).

        The previous target is the last one sent, or the measured pose after a reset or reconnect.
        """
        return self._limits.clamp(targets, self._targets, self._last)

    def _hold_measured(self, message: State) -> None:
        """Rate-limit reference := the measured pose (finite entries; the default pose elsewhere)."""
        self._targets = self._limits.hold_measured(message)

    def _send_command(self, targets: np.ndarray) -> None:
        if self._last.mode == Mode.ESTOP or self._estopped:
            raise DeployError(f"the robot on {self.url} is in ESTOP; reset() before commanding it")
        if not self._engaged:
            self._hold_measured(self._last)  # start from where the robot is, not from the last target sent
        targets = self.safe_targets(targets)
        if self._last.mode != Mode.POSITION:
            self.link.send(ModeRequest(Mode.POSITION))
        command = Command(self._last.tick, targets, self._kp, self._kd)
        self.link.send(command)
        self.last_command, self.last_command_time = command, time.monotonic()
        self._damped = False
        self._targets = targets

    def _exchange(self, targets: np.ndarray) -> tuple[State, bool]:
        """Send one Command, get the next State; reconnect if the robot is lost.

        Returns:
            (state, irregular): irregular when the State does not follow the last one cleanly
            (tick gap, reconnect, lockstep resend, watchdog trip, non-finite reading).
        """
        resends = self.health.command_resends
        reconnected = False
        try:
            self._send_command(targets)
            message = self.receiver.next_state(self._last, self.lockstep, self.last_command)
        except LinkError as error:
            if not self.receiver.robot_lost(error):
                raise
            self._reconnect(error)
            reconnected = True
            message = self.receiver.next_state(self._last, self.lockstep, self.last_command)
        irregular = reconnected or self.health.command_resends != resends
        irregular |= message.tick != (self._last.tick + 1) % TICK_MODULO
        if message.mode == Mode.POSITION:
            self._engaged = True
        elif self._engaged:  # left POSITION without being asked: the robot's watchdog fired
            self._engaged = False
            self.health.watchdog_trips += 1
            irregular = True
        base_velocity = self.capabilities is not None and bool(self.capabilities.flags & Capability.BASE_VELOCITY)
        if not finite_reading(message, base_velocity):
            self.health.nonfinite_states += 1
            irregular = True
        self._last = message
        self.receiver.drain()
        return message, irregular

    def soft_start(self) -> int:
        """Ramp the targets from the measured pose q0 to the default pose q* before the policy takes over.

        target_k = q0 + (q* - q0) k / N for k = 1..N, N = soft_start_seconds x control rate. Skipped
        when the robot already stands within `soft_start_tolerance` of q* (as after a Reset into its
        start fixture: the emulator and lockstep runs).

        Returns:
            N, the control ticks the ramp took (0 when skipped).
        """
        measured = self._last.joint_pos.astype(np.float64) - self.offsets
        if self.soft_start_seconds <= 0 or np.max(np.abs(measured - self._default)) <= self.soft_start_tolerance:
            return 0
        num_ticks = max(1, int(round(self.soft_start_seconds * self.spec.control_rate_hz)))
        self._hold_measured(self._last)
        start, goal = self._targets.copy(), self._default + self.offsets
        logger.info(
            "soft start: %.2f rad from the default pose, ramping over %d ticks", np.max(np.abs(goal - start)), num_ticks
        )
        for k in range(1, num_ticks + 1):
            message, _ = self._exchange(start + (goal - start) * k / num_ticks)
            if message.mode == Mode.ESTOP or self.receiver.robot_estop:
                break
        return num_ticks

    def damp(self, confirm_timeout: float = 0.0) -> State | None:
        """Command damping; best effort (the robot's own watchdog is the backstop).

        Args:
            confirm_timeout: When > 0, wait up to this long for a State reporting the robot damping.

        Returns:
            That State (also kept in `stopped_state`), or None.
        """
        if not self.link.is_open or self._estopped:  # in ESTOP the robot already damps, latched
            return None
        try:
            self.link.send(ModeRequest(Mode.DAMPING))
            self._damped = True
            message = self.receiver.state_out_of_position(self._last, confirm_timeout)
            if message is not None:
                self.stopped_state = message
                return message
        except LinkError as error:
            logger.warning("could not command damping: %s", error)
        return None

    def stop(self) -> State | None:
        """End of an episode: damping, confirmed by a State when the robot streams them (not in lockstep)."""
        return self.damp(confirm_timeout=0.0 if self.lockstep else 0.1)

    def emergency_stop(self, reason: int = 0) -> None:
        """Send EStop: the robot damps, latched until the next Reset. Best effort, never raises."""
        if self._estopped:
            return
        self._estopped = True
        if self.link.is_open:
            try:
                self.link.send(EStop(reason))
            except LinkError as error:
                logger.warning("could not send EStop: %s", error)

    # -- episodes ---------------------------------------------------------------------------------

    def _request_reset(self) -> None:
        can_reset = self.capabilities is not None and self.capabilities.flags & Capability.RESET_SUPPORTED
        if can_reset and self.receiver.reset_handshake():
            self._estopped = False
            return
        # The robot cannot reset itself: the operator puts it back.
        self.damp()
        if self.reset_wait is not None:
            logger.warning("robot refused reset; waiting %.1f s for the operator", self.reset_wait)
            time.sleep(self.reset_wait)
        elif sys.stdin is not None and sys.stdin.isatty():
            input("Put the robot back in its start pose, then press Enter ")
        else:
            raise LinkError("the robot refused to reset and no operator is attached; pass --reset-wait SECONDS")

    def restart(self) -> State:
        """Ask the robot (or the operator) for a new episode; returns its first State.

        States sent before the reset may still be queued: the one flagged EPISODE_START wins.
        """
        self._request_reset()
        self._last = None
        self._last = self.receiver.first_state()
        return self._last

    def reset(self) -> tuple[np.ndarray, dict]:
        for attempt in range(2):
            try:
                self.restart()
                break
            except LinkError as error:
                if attempt or not self.receiver.robot_lost(error):
                    raise
                self._reconnect(error)
        self._engaged = self._last.mode == Mode.POSITION
        self._hold_measured(self._last)
        soft_start_ticks = self.soft_start()
        self.mapping.reset()
        self._steps = 0
        self.gaps = self.reconnects = 0
        self.ticks = [self._last.tick]
        base_velocity = self.capabilities is not None and bool(self.capabilities.flags & Capability.BASE_VELOCITY)
        if not finite_reading(self._last, base_velocity):
            self.health.nonfinite_states += 1
            self.gaps += 1
        state = self.robot_state(self._last)
        return self._observe(state), {"state": state, "soft_start_ticks": soft_start_ticks}

    def _observe(self, state: RobotState) -> np.ndarray:
        obs = self.mapping.observe(state)
        # mapping.observe already zeroes non-finite entries; the policy must never see one, whatever changes there.
        return obs if np.all(np.isfinite(obs)) else np.nan_to_num(obs, nan=0.0, posinf=0.0, neginf=0.0)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._last is None:
            raise DeployError("call reset() before step()")
        previous = self.mapping.last_action.copy()
        reconnects = self.reconnects
        message, gap = self._exchange(self.mapping.targets(action) + self.offsets)
        if gap:
            self.gaps += 1
            self.health.gaps += 1
        self._steps += 1
        self.ticks.append(message.tick)
        state = self.robot_state(message)
        reward = self.reward_fn(state, self.mapping.last_action, previous)
        fallen = self.mapping.is_fallen(state)
        estopped = message.mode == Mode.ESTOP or self.receiver.robot_estop
        safety_stop = "fallen" if fallen else "estop" if estopped else None
        if fallen:  # tilted past the spec's limit: stop commanding at once
            self.health.falls += 1
            self.damp()
        elif estopped:
            self.gaps += 1  # cut short from outside: not a sample of the task
        terminated = fallen
        truncated = not terminated and (self._steps >= self.max_steps or estopped)
        info = {
            "state": state,
            "gap": gap,
            "mode": message.mode,
            "reconnected": self.reconnects != reconnects,
            "safety_stop": safety_stop,
        }
        return self._observe(state), reward, terminated, truncated, info

    def close(self) -> None:
        """Damping (confirmed, unless already requested since the last Command), then close the link."""
        try:
            if self._damped:
                self.damp()  # once more, no need to wait
            else:
                self.stop()
        finally:
            self.link.close()

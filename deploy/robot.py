"""The robot behind a serial link, with the sim env's reset/step interface.

Composed with a policy runtime by the control loop; it shares the observation/action mapping and
the reward with the simulator (controller.mapping), so nothing is indexed by hand twice.

Safety phases are explicit methods: `soft_start` (ramp from the measured pose to the default pose
before the policy takes over), `safe_targets` (finite, rate-limited, inside the joint limits: what
every Command carries), a fall ends the episode and damps at once, `stop` (damping, confirmed by
the robot's State) and `emergency_stop` (EStop, latched on the robot until a Reset).

Link faults: the link counts corrupt frames and sequence gaps (`link.stats`); here a State that is
not newer than the last one used (duplicated, late, reordered) is dropped, never fed to the policy
as a new step, and a lost port is reopened with backoff (deploy/reconnect.py). An episode that saw
a gap, a reconnect, a watchdog trip or a non-finite reading counts it in `gaps`, which marks the
episode incomplete so learning leaves it out.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from controller.errors import ConfigError
from controller.mapping import (
    LocomotionReward,
    ObservationMapping,
    RobotState,
    quat_conjugate,
    quat_from_roll_pitch,
    quat_multiply,
    rotate_to_body,
)
from controller.robot import RobotSpec
from deploy.errors import DeployError, LinkError, ProtocolError
from deploy.link import Link, handshake
from deploy.messages import (
    Capabilities,
    Capability,
    Command,
    EStop,
    Fault,
    FaultCode,
    Mode,
    ModeRequest,
    Reset,
    State,
    StateFlag,
)
from deploy.reconnect import Backoff, reconnect

logger = logging.getLogger(__name__)

TICK_MODULO = 1 << 32  # State.tick is a u32


def tick_newer(tick: int, than: int) -> bool:
    """Wrap-aware u32 comparison: is `tick` after `than`? (2**32 - 1 -> 0 is one tick forward)."""
    return 0 < (tick - than) % TICK_MODULO < TICK_MODULO // 2


@dataclass
class Calibration:
    """Sensor corrections the host applies: reading - offset, target + offset."""

    joint_offsets: np.ndarray | None = None
    gyro_bias: np.ndarray = field(default_factory=lambda: np.zeros(3))
    imu_tilt: np.ndarray = field(default_factory=lambda: np.zeros(2))
    """IMU mounting roll and pitch (rad), undone on every reading."""


@dataclass
class RobotHealth:
    """What went wrong, counted since the RobotEnv was created.

    The link's frame counters (CRC errors, sequence gaps, duplicates) are in `RobotEnv.link.stats`.
    """

    gaps: int = 0
    """Irregular steps: the State did not follow the previous tick, or a reconnect, resend, watchdog trip
    or non-finite reading happened on the way."""
    stale_states: int = 0
    """States not newer than the last one used (duplicated, late, reordered): dropped."""
    reconnects: int = 0
    """Times the port was lost and reopened."""
    reconnect_seconds: list[float] = field(default_factory=list)
    """How long each reconnection took, from noticing the loss to the robot's Capabilities."""
    watchdog_trips: int = 0
    """Times the robot left POSITION by itself (its watchdog) while the host was commanding it."""
    command_resends: int = 0
    """Lockstep only: a Command sent again because the State it should produce never came."""
    reset_resends: int = 0
    """Reset requests sent again because no reply came."""
    rate_limited: int = 0
    """Commands whose targets the rate limit changed."""
    nonfinite_targets: int = 0
    """Target vectors with a non-finite entry (held at the previous target instead)."""
    nonfinite_states: int = 0
    """States with a non-finite joint or IMU reading."""
    falls: int = 0
    """Episodes stopped by the fall detection."""
    faults: dict[str, int] = field(default_factory=dict)
    """Fault messages from the robot, by code name."""


class _NoState(LinkError):
    """No usable State within the state timeout: the robot went silent."""


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
        self.resend_interval = resend_interval
        self.reset_wait = reset_wait
        self.state_timeout = state_timeout
        self.host_name = host_name
        self.link = Link(url)
        self.capabilities: Capabilities | None = None
        self.health = RobotHealth()
        self._kp = np.full(spec.num_joints, spec.kp)
        # Furthest a target may sit from the measured angle before kp alone exceeds the torque limit.
        self._torque_reach = spec.array("torque_limit") / max(spec.kp, 1e-9)
        self._kd = np.full(spec.num_joints, spec.kd)
        self._default = spec.array("default_pose")
        # Joint limits in the robot's encoder frame, where targets travel.
        self._lower = spec.array("joint_lower") + self.offsets
        self._upper = spec.array("joint_upper") + self.offsets
        self._targets = self._default + self.offsets  # the last targets sent (rate-limit reference), always finite
        self._last: State | None = None
        self._engaged = False  # the robot reported POSITION since the last reset or reconnect
        self._estopped = False
        self._robot_estop = False
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

    def _lost(self, error: LinkError) -> bool:
        """Is `error` a lost robot (port gone, robot silent) rather than a refusal or a bug?"""
        return not isinstance(error, ProtocolError) and (isinstance(error, _NoState) or not self.link.is_open)

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
        # IMU frame -> body frame: q_body = q_imu * q_mount^-1, w_body = R_mount (w_imu - bias).
        unmount = quat_conjugate(self._mount)
        return RobotState(
            joint_pos=message.joint_pos.astype(np.float64) - self.offsets,
            joint_vel=message.joint_vel.astype(np.float64),
            quat=quat_multiply(message.quat.astype(np.float64), unmount),
            gyro=rotate_to_body(unmount, message.gyro.astype(np.float64) - self.calibration.gyro_bias),
            accel=rotate_to_body(unmount, message.accel.astype(np.float64)),
            base_vel=message.base_vel.astype(np.float64),
            joint_torque=message.joint_torque.astype(np.float64),
            command=self.command.copy(),
            tick=message.tick,
            time=message.time,
            fallen=bool(message.flags & StateFlag.FALLEN),
        )

    def wait_state(self, timeout: float | None = None) -> State:
        """The newest State not returned before, as received (no tick check)."""
        timeout = self.state_timeout if timeout is None else timeout
        message = self.link.latest_state(timeout=timeout)
        if message is None:
            raise _NoState(f"no State from the robot on {self.url} within {timeout:.2f} s")
        return message

    def _next_state(self) -> State:
        """The next State newer than the last one used; older or repeated ones are counted and dropped."""
        now = time.monotonic()
        deadline = now + self.state_timeout
        resend_at = now + self.resend_interval if self.lockstep else float("inf")
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise _NoState(f"no new State from the robot on {self.url} within {self.state_timeout:.2f} s")
            message = self.link.latest_state(timeout=min(deadline, resend_at) - now)
            if message is None:
                if time.monotonic() >= resend_at and self.last_command is not None:
                    # Lockstep: the robot steps only on a Command; if its State was lost, nothing else comes.
                    self.link.send(self.last_command)
                    self.health.command_resends += 1
                    resend_at = time.monotonic() + self.resend_interval
                continue
            if self._last is not None and not tick_newer(message.tick, self._last.tick):
                self.health.stale_states += 1
                continue
            return message

    def _note(self, message: object) -> None:
        """Account for a non-State message from the robot."""
        if isinstance(message, Fault):
            try:
                name = FaultCode(message.code).name
            except ValueError:  # a robot's own code (0x100 and up)
                name = f"code {message.code:#x}"
            self.health.faults[name] = self.health.faults.get(name, 0) + 1
            logger.info("robot fault %s: %s", name, message.message)
        elif isinstance(message, EStop):
            self._robot_estop = True
            logger.warning("the robot sent EStop (reason %d)", message.reason)

    def _drain(self) -> None:
        while (message := self.link.recv(timeout=0)) is not None:
            self._note(message)

    @staticmethod
    def _finite_reading(message: State, base_velocity: bool) -> bool:
        arrays = [message.joint_pos, message.joint_vel, message.quat, message.gyro, message.accel]
        if base_velocity:
            arrays.append(message.base_vel)
        return all(np.all(np.isfinite(array)) for array in arrays)

    # -- safety -----------------------------------------------------------------------------------

    def safe_targets(self, targets: np.ndarray) -> np.ndarray:
        """Joint targets (n,) in the robot's encoder frame -> what may go to the motors (n,).

        1. a non-finite entry holds the previous target (NaN or inf never reaches a motor);
        2. |target - previous| <= max_target_step per joint (rate limit);
        3. |target - measured| <= torque_limit / kp (the PD's position term cannot ask for more than
           the motor's torque limit; the robot clamps torque too);
        4. lower + offset <= target <= upper + offset (joint limits, encoder frame).
        The previous target is the last one sent, or the measured pose after a reset or reconnect.
        """
        targets = np.array(targets, dtype=np.float64).reshape(self.spec.num_joints)
        previous = self._targets
        bad = ~np.isfinite(targets)
        if bad.any():
            self.health.nonfinite_targets += 1
            targets[bad] = previous[bad]
        limited = np.clip(targets, previous - self.max_target_step, previous + self.max_target_step)
        if np.any(limited != targets):
            self.health.rate_limited += 1
        if self._last is not None:
            measured = self._last.joint_pos.astype(np.float64)
            reach = self._torque_reach
            ok = np.isfinite(measured)
            limited[ok] = np.clip(limited[ok], measured[ok] - reach[ok], measured[ok] + reach[ok])
        return np.clip(limited, self._lower, self._upper)

    def _hold_measured(self, message: State) -> None:
        """Rate-limit reference := the measured pose (finite entries; the default pose elsewhere)."""
        measured = message.joint_pos.astype(np.float64)
        fallback = self._default + self.offsets
        self._targets = np.clip(np.where(np.isfinite(measured), measured, fallback), self._lower, self._upper)

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
            message = self._next_state()
        except LinkError as error:
            if not self._lost(error):
                raise
            self._reconnect(error)
            reconnected = True
            message = self._next_state()
        irregular = reconnected or self.health.command_resends != resends
        irregular |= message.tick != (self._last.tick + 1) % TICK_MODULO
        if message.mode == Mode.POSITION:
            self._engaged = True
        elif self._engaged:  # left POSITION without being asked: the robot's watchdog fired
            self._engaged = False
            self.health.watchdog_trips += 1
            irregular = True
        base_velocity = self.capabilities is not None and bool(self.capabilities.flags & Capability.BASE_VELOCITY)
        if not self._finite_reading(message, base_velocity):
            self.health.nonfinite_states += 1
            irregular = True
        self._last = message
        self._drain()
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
            if message.mode == Mode.ESTOP or self._robot_estop:
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
            deadline = time.monotonic() + confirm_timeout
            while (remaining := deadline - time.monotonic()) > 0:
                message = self.link.latest_state(timeout=remaining)
                if message is None or (self._last is not None and not tick_newer(message.tick, self._last.tick)):
                    continue
                if message.mode != Mode.POSITION:
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
        if can_reset:
            self._drain()  # earlier replies and faults
            deadline = time.monotonic() + 2.0
            next_request = time.monotonic()
            requests = 0
            while (now := time.monotonic()) < deadline:
                if now >= next_request:  # a lost request or reply is sent again
                    self.health.reset_resends += requests > 0
                    requests += 1
                    self.link.send(Reset(Reset.REQUEST))
                    next_request = now + 0.25
                reply = self.link.recv(timeout=max(0.0, min(deadline, next_request) - time.monotonic()))
                if isinstance(reply, Reset):
                    if reply.status == Reset.DONE:
                        self._estopped = self._robot_estop = False
                        return
                    break
                if reply is not None:
                    self._note(reply)
        # The robot cannot reset itself: the operator puts it back.
        self.damp()
        if self.reset_wait is not None:
            logger.warning("robot refused reset; waiting %.1f s for the operator", self.reset_wait)
            time.sleep(self.reset_wait)
        elif sys.stdin is not None and sys.stdin.isatty():
            input("Put the robot back in its start pose, then press Enter ")
        else:
            raise LinkError("the robot refused to reset and no operator is attached; pass --reset-wait SECONDS")

    def _first_state(self) -> State:
        """The episode's first State: the one flagged EPISODE_START if it comes soon, else the next one."""
        deadline = time.monotonic() + self.state_timeout
        window = time.monotonic() + 5.0 / self.spec.control_rate_hz
        newest: State | None = None
        while (now := time.monotonic()) < deadline:
            message = self.link.latest_state(timeout=max(0.0, min(deadline, window if newest else deadline) - now))
            if message is not None:
                if message.flags & StateFlag.EPISODE_START:
                    return message
                if newest is None or tick_newer(message.tick, newest.tick):
                    newest = message
            if newest is not None and time.monotonic() >= window:
                return newest
        raise _NoState(f"no State from the robot on {self.url} within {self.state_timeout:.2f} s after the reset")

    def restart(self) -> State:
        """Ask the robot (or the operator) for a new episode; returns its first State.

        States sent before the reset may still be queued: the one flagged EPISODE_START wins.
        """
        self._request_reset()
        self._last = None
        self._last = self._first_state()
        return self._last

    def reset(self) -> tuple[np.ndarray, dict]:
        for attempt in range(2):
            try:
                self.restart()
                break
            except LinkError as error:
                if attempt or not self._lost(error):
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
        if not self._finite_reading(self._last, base_velocity):
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
        estopped = message.mode == Mode.ESTOP or self._robot_estop
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

"""What the host receives from the robot: States in tick order, and every other message accounted for.

The link's reader thread keeps the newest State and queues the rest (deploy/link.py). `StateReceiver`
reads them for the RobotEnv: a State that is not newer than the last one used (duplicated, late,
reordered) is dropped and counted, never handed on as a new step; the robot's Faults and EStops are
counted in `RobotHealth`; an episode starts at the State flagged EPISODE_START. It sends only what a
reply waits on: a lockstep Command again when its State never came, and the Reset request.
`calibrated_state` turns a State into a RobotState in the spec's frame, undoing the `Calibration`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from controller.mapping import RobotState, quat_conjugate, quat_multiply, rotate_to_body
from deploy.errors import LinkError, ProtocolError
from deploy.link import Link
from deploy.messages import Command, EStop, Fault, FaultCode, Mode, Reset, State, StateFlag

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


def calibrated_state(
    message: State, offsets: np.ndarray, mount: np.ndarray, gyro_bias: np.ndarray, command: np.ndarray
) -> RobotState:
    """Protocol State -> RobotState in the spec's frame.

    Args:
        message: The State as received, in the robot's encoder and IMU frames.
        offsets: Joint offsets (n,), subtracted from the measured angles.
        mount: The IMU's mounting rotation as a quaternion (4,) (`Calibration.imu_tilt`), undone.
        gyro_bias: Gyro bias (3,) in the IMU frame, subtracted before the rotation.
        command: The velocity command (3,) the RobotState carries (copied).
    """
    # IMU frame -> body frame: q_body = q_imu * q_mount^-1, w_body = R_mount (w_imu - bias).
    unmount = quat_conjugate(mount)
    return RobotState(
        joint_pos=message.joint_pos.astype(np.float64) - offsets,
        joint_vel=message.joint_vel.astype(np.float64),
        quat=quat_multiply(message.quat.astype(np.float64), unmount),
        gyro=rotate_to_body(unmount, message.gyro.astype(np.float64) - gyro_bias),
        accel=rotate_to_body(unmount, message.accel.astype(np.float64)),
        base_vel=message.base_vel.astype(np.float64),
        joint_torque=message.joint_torque.astype(np.float64),
        command=command.copy(),
        tick=message.tick,
        time=message.time,
        fallen=bool(message.flags & StateFlag.FALLEN),
    )


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


class NoStateError(LinkError):
    """No usable State within the state timeout: the robot went silent."""


def finite_reading(message: State, base_velocity: bool) -> bool:
    """Are the State's joint and IMU readings (and its base velocity, when the robot measures one) finite?"""
    arrays = [message.joint_pos, message.joint_vel, message.quat, message.gyro, message.accel]
    if base_velocity:
        arrays.append(message.base_vel)
    return all(np.all(np.isfinite(array)) for array in arrays)


class StateReceiver:
    """The receiving side of one robot's link, counting what went wrong in a shared `RobotHealth`.

    Args:
        link: The robot's link (its reader thread owns the port).
        health: The RobotEnv's counters: stale States, command and reset resends, faults.
        state_timeout: Seconds to wait for a usable State before raising NoStateError.
        resend_interval: Lockstep only: resend the last Command after this many seconds without a State.
        control_rate_hz: The robot's control rate (how long a reset's first State may take to show up).
    """

    def __init__(
        self, link: Link, health: RobotHealth, *, state_timeout: float, resend_interval: float, control_rate_hz: float
    ) -> None:
        self.link = link
        self.health = health
        self.state_timeout = state_timeout
        self.resend_interval = resend_interval
        self.control_rate_hz = control_rate_hz
        self.robot_estop = False  # the robot sent EStop (latched on it until a Reset)

    def robot_lost(self, error: LinkError) -> bool:
        """Is `error` a lost robot (port gone, robot silent) rather than a refusal or a bug?"""
        return not isinstance(error, ProtocolError) and (isinstance(error, NoStateError) or not self.link.is_open)

    def wait_state(self, timeout: float | None = None) -> State:
        """The newest State not returned before, as received (no tick check)."""
        timeout = self.state_timeout if timeout is None else timeout
        message = self.link.latest_state(timeout=timeout)
        if message is None:
            raise NoStateError(f"no State from the robot on {self.link.url} within {timeout:.2f} s")
        return message

    def next_state(self, last: State | None, lockstep: bool, last_command: Command | None) -> State:
        """The next State newer than `last`; older or repeated ones are counted and dropped.

        In lockstep the robot steps only on a Command: `last_command` is sent again every
        `resend_interval` seconds until its State comes.
        """
        now = time.monotonic()
        deadline = now + self.state_timeout
        resend_at = now + self.resend_interval if lockstep else float("inf")
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise NoStateError(f"no new State from the robot on {self.link.url} within {self.state_timeout:.2f} s")
            message = self.link.latest_state(timeout=min(deadline, resend_at) - now)
            if message is None:
                if time.monotonic() >= resend_at and last_command is not None:
                    # Lockstep: the robot steps only on a Command; if its State was lost, nothing else comes.
                    self.link.send(last_command)
                    self.health.command_resends += 1
                    resend_at = time.monotonic() + self.resend_interval
                continue
            if last is not None and not tick_newer(message.tick, last.tick):
                self.health.stale_states += 1
                continue
            return message

    def state_out_of_position(self, last: State | None, timeout: float) -> State | None:
        """The first State newer than `last` that reports the robot out of POSITION, or None after `timeout` s."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.link.latest_state(timeout=remaining)
            if message is None or (last is not None and not tick_newer(message.tick, last.tick)):
                continue
            if message.mode != Mode.POSITION:
                return message
        return None

    def first_state(self) -> State:
        """The episode's first State: the one flagged EPISODE_START if it comes soon, else the next one."""
        deadline = time.monotonic() + self.state_timeout
        window = time.monotonic() + 5.0 / self.control_rate_hz
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
        raise NoStateError(
            f"no State from the robot on {self.link.url} within {self.state_timeout:.2f} s after the reset"
        )

    def reset_handshake(self) -> bool:
        """Ask the robot to reset itself, resending a lost request or reply; True once it reports DONE."""
        self.drain()  # earlier replies and faults
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
                    self.robot_estop = False
                    return True
                break
            if reply is not None:
                self.note(reply)
        return False

    def note(self, message: object) -> None:
        """Account for a non-State message from the robot."""
        if isinstance(message, Fault):
            try:
                name = FaultCode(message.code).name
            except ValueError:  # a robot's own code (0x100 and up)
                name = f"code {message.code:#x}"
            self.health.faults[name] = self.health.faults.get(name, 0) + 1
            logger.info("robot fault %s: %s", name, message.message)
        elif isinstance(message, EStop):
            self.robot_estop = True
            logger.warning("the robot sent EStop (reason %d)", message.reason)

    def drain(self) -> None:
        """Account for every non-State message queued so far."""
        while (message := self.link.recv(timeout=0)) is not None:
            self.note(message)

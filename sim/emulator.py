"""`metactl emulate`: a simulated robot behind the serial protocol, on a pseudo-terminal.

It plays the microcontroller's part: answers the handshake, streams State frames, applies
Commands with PD at the physics rate, clamps targets to the joint limits, and drops to damping
when Commands stop (watchdog). Its dynamics (a Task) and sensor errors (joint zero offsets, gyro
bias) are its own: the host is never told them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import time
import tty
from dataclasses import dataclass, field

import numpy as np

from controller.robot import RobotSpec
from deploy.protocol import (
    Capabilities,
    Capability,
    Command,
    EStop,
    Fault,
    FaultCode,
    FrameDecoder,
    FrameEncoder,
    Heartbeat,
    Hello,
    Mode,
    ModeRequest,
    Reset,
    State,
    StateFlag,
)
from sim.pybullet_robot import SimRobot
from sim.tasks import Task

logger = logging.getLogger(__name__)

WATCHDOG_S = 0.05


@dataclass
class SensorErrors:
    """What calibration measures: encoder zero offsets and gyro bias (added to the readings)."""

    joint_offsets: np.ndarray | None = None
    gyro_bias: np.ndarray = field(default_factory=lambda: np.zeros(3))
    encoder_noise: float = 0.0005
    """Standard deviation of each joint angle reading (rad)."""
    gyro_noise: float = 0.005
    """Standard deviation of each gyro reading (rad/s)."""


class PtyPort:
    """The robot's end of a pseudo-terminal; the host opens `path` like a serial device."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line discipline: bytes pass unchanged
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self.dropped_writes = 0

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if not ready:
            return b""
        try:
            return os.read(self.master, 65536)
        except BlockingIOError:
            return b""
        except OSError as error:
            if error.errno == errno.EIO:  # no host has the port open
                return b""
            raise

    def write(self, data: bytes) -> None:
        try:
            os.write(self.master, data)
        except (BlockingIOError, OSError):
            # No reader draining the port: drop the frame rather than stall the robot.
            self.dropped_writes += 1

    def close(self) -> None:
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class Emulator:
    """One simulated robot speaking protocol v1 over a PtyPort."""

    def __init__(
        self,
        spec: RobotSpec,
        task: Task | None = None,
        *,
        lockstep: bool = False,
        errors: SensorErrors | None = None,
        watchdog_s: float = WATCHDOG_S,
        supports_reset: bool = True,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.sim = SimRobot(spec)
        self.sim.apply_task(task or Task())
        self.lockstep = lockstep
        self.errors = errors or SensorErrors()
        self.offsets = (
            np.zeros(spec.num_joints) if self.errors.joint_offsets is None else np.asarray(self.errors.joint_offsets)
        )
        self.watchdog_s = watchdog_s
        self.supports_reset = supports_reset
        self.port = PtyPort()
        self.decoder = FrameDecoder()
        self.encoder = FrameEncoder()
        self.mode = Mode.DAMPING
        self.tick = 0
        self.targets = spec.array("default_pose")
        self.kp = np.full(spec.num_joints, spec.kp)
        self.kd = np.full(spec.num_joints, spec.kd)
        self.last_command_time = time.monotonic()
        self.episode_start = True
        # After power-up or a Reset the robot sits in its start fixture (the spec's default pose) until
        # the first Command takes it over: the static pose calibration records.
        self.held = True
        self.rng = np.random.default_rng(seed)
        self.watchdog_trips = 0
        self.clamped_commands = 0
        self._lower = spec.array("joint_lower")
        self._upper = spec.array("joint_upper")
        self._running = False

    # -- messages ------------------------------------------------------------------------------

    def send(self, message) -> None:
        self.port.write(self.encoder.encode(message))

    def capabilities(self) -> Capabilities:
        flags = Capability.BASE_VELOCITY
        if self.supports_reset:
            flags |= Capability.RESET_SUPPORTED
        if self.lockstep:
            flags |= Capability.LOCKSTEP
        return Capabilities(
            1, self.spec.name, int(round(self.spec.control_rate_hz)), flags, tuple(self.spec.joint_names)
        )

    def handle(self, message) -> bool:
        """Apply one message; returns True when (in lockstep) the simulation should advance."""
        if isinstance(message, Hello):
            self.send(self.capabilities())
            self.send(self.state())
        elif isinstance(message, Command):
            if self.mode == Mode.ESTOP:
                self.send(Fault(FaultCode.ESTOP_LATCHED, "in ESTOP: send Reset first"))
                return False
            targets = np.asarray(message.targets, dtype=np.float64)
            if targets.shape[0] != self.spec.num_joints or not np.all(np.isfinite(targets)):
                self.send(Fault(FaultCode.BAD_COMMAND, f"expected {self.spec.num_joints} finite targets"))
                return False
            clamped = np.clip(targets, self._lower, self._upper)
            if np.any(clamped != targets):
                self.clamped_commands += 1
            self.targets = clamped
            self.kp = np.clip(np.asarray(message.kp, dtype=np.float64), 0.0, 4 * self.spec.kp)
            self.kd = np.clip(
                np.asarray(message.kd, dtype=np.float64), 0.0, 4 * max(self.spec.kd, self.spec.damping_kd)
            )
            self.last_command_time = time.monotonic()
            self.held = False
            if self.mode != Mode.POSITION:
                self.mode = Mode.POSITION
            return True
        elif isinstance(message, ModeRequest):
            if self.mode == Mode.ESTOP and message.mode != Mode.ESTOP:
                self.send(Fault(FaultCode.ESTOP_LATCHED, "in ESTOP: send Reset first"))
            else:
                self.mode = message.mode
                self.last_command_time = time.monotonic()
        elif isinstance(message, Reset):
            if not self.supports_reset:
                self.send(Reset(Reset.REFUSED))
                return False
            self.sim.reset()
            self.held = True
            self.mode = Mode.DAMPING
            self.targets = self.spec.array("default_pose") + self.offsets
            self.episode_start = True
            self.send(Reset(Reset.DONE))
            self.send(self.state())
        elif isinstance(message, Heartbeat):
            self.send(message)
        elif isinstance(message, EStop):
            self.mode = Mode.ESTOP
        return False

    def state(self) -> State:
        reading = self.sim.read_state(np.zeros(3), 1.0 / self.spec.control_rate_hz)
        n = self.spec.num_joints
        flags = StateFlag(0)
        if reading.fallen:
            flags |= StateFlag.FALLEN
        if self.episode_start:
            flags |= StateFlag.EPISODE_START
            self.episode_start = False
        return State(
            tick=self.tick % 2**32,
            time=time.monotonic(),
            mode=self.mode,
            flags=flags,
            joint_pos=reading.joint_pos + self.offsets + self.rng.normal(0.0, self.errors.encoder_noise, n),
            joint_vel=reading.joint_vel,
            joint_torque=reading.joint_torque,
            quat=reading.quat,
            gyro=reading.gyro + self.errors.gyro_bias + self.rng.normal(0.0, self.errors.gyro_noise, 3),
            accel=reading.accel,
            base_vel=reading.base_vel,
        )

    # -- physics -------------------------------------------------------------------------------

    def _check_watchdog(self) -> None:
        # In lockstep nothing moves without a Command, so the watchdog stays off (docs/protocol.md).
        if (
            not self.lockstep
            and self.mode == Mode.POSITION
            and time.monotonic() - self.last_command_time > self.watchdog_s
        ):
            self.mode = Mode.DAMPING
            self.watchdog_trips += 1
            self.send(Fault(FaultCode.WATCHDOG, f"no Command for {self.watchdog_s * 1000:.0f} ms: damping"))

    def advance(self) -> None:
        """One control period of physics in the current mode, then a State frame."""
        n = self.spec.num_joints
        if self.held:
            pass  # still in the fixture: no physics until a Command takes over
        elif self.mode == Mode.POSITION:
            # The motor controller tracks the target in its own (offset) encoder frame.
            self.sim.step(self.targets - self.offsets, self.kp, self.kd)
        elif self.mode in (Mode.DAMPING, Mode.ESTOP):
            self.sim.step(np.zeros(n), np.zeros(n), np.full(n, self.spec.damping_kd))
        else:
            self.sim.step(np.zeros(n), np.zeros(n), np.zeros(n))
        self.tick += 1
        self.send(self.state())

    def serve_once(self, timeout: float) -> bool:
        """Read what arrived and handle it; returns True if a Command asked for a lockstep advance."""
        step = False
        data = self.port.read(timeout)
        if data:
            for _, message in self.decoder.feed(data):
                step = self.handle(message) or step
        return step

    def run(self, duration: float | None = None) -> None:
        """Serve until `stop()` (or `duration` seconds): real time, or one step per Command in lockstep."""
        self._running = True
        period = 1.0 / self.spec.control_rate_hz
        start = time.monotonic()
        next_tick = start + period
        while self._running and (duration is None or time.monotonic() - start < duration):
            if self.lockstep:
                if self.serve_once(0.01):
                    self.advance()
                continue
            while True:
                remaining = next_tick - time.monotonic()
                if remaining <= 0:
                    break
                self.serve_once(remaining)
            self._check_watchdog()
            self.advance()
            next_tick += period
            if next_tick < time.monotonic() - period:  # fell far behind (e.g. paused): do not burst
                next_tick = time.monotonic() + period

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self.port.close()
        self.sim.close()


def serve(
    robot: str,
    task_file: str | None = None,
    *,
    lockstep: bool = False,
    joint_offsets: list[float] | None = None,
    gyro_bias: list[float] | None = None,
    supports_reset: bool = True,
    duration: float | None = None,
    announce=print,
) -> None:
    """`metactl emulate`: print `PORT <path>` once ready, then serve until SIGTERM/SIGINT."""
    import signal

    from controller.robot import load_robot_spec
    from sim.tasks import load_task

    spec = load_robot_spec(robot)
    task = load_task(task_file) if task_file else Task()
    errors = SensorErrors(
        joint_offsets=None if joint_offsets is None else np.asarray(joint_offsets, dtype=np.float64),
        gyro_bias=np.zeros(3) if gyro_bias is None else np.asarray(gyro_bias, dtype=np.float64),
    )
    if errors.joint_offsets is not None and errors.joint_offsets.shape != (spec.num_joints,):
        raise ValueError(f"--joint-offsets needs {spec.num_joints} values for robot '{spec.name}'")
    emulator = Emulator(spec, task, lockstep=lockstep, errors=errors, supports_reset=supports_reset)
    signal.signal(signal.SIGTERM, lambda *_: emulator.stop())
    try:
        announce(f"PORT {emulator.port.path}", flush=True)
        emulator.run(duration)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.close()

"""`metactl emulate`: a simulated robot behind the serial protocol, on a pseudo-terminal.

It plays the microcontroller's part: answers the handshake, streams State frames, applies
Commands with PD at the physics rate, clamps targets to the joint limits, and drops to damping
when Commands stop (watchdog). Its dynamics (a Task) and sensor errors (joint zero offsets, gyro
bias) are its own: the host is never told them.

With `--faults` it also plays a bad cable: the frames it sends are dropped, corrupted, delayed,
duplicated or reordered at random (seeded), and the port can vanish and come back. A host then
reopens the same path: `--link-path` (or, with `disconnect`, a symlink in a temporary directory)
is re-pointed atomically at each new pty; a `socket://host:port` link path serves TCP instead and
listens again on the same port.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from controller.mapping import quat_from_roll_pitch, quat_multiply, rotate_to_body
from controller.robot import RobotSpec
from deploy.messages import (
    Capabilities,
    Capability,
    Command,
    EStop,
    Fault,
    FaultCode,
    Heartbeat,
    Hello,
    Mode,
    ModeRequest,
    Reset,
    State,
    StateFlag,
)
from deploy.protocol import FrameDecoder, FrameEncoder
from sim.emulator_link import FaultInjector, FaultSpec, Port, PtyPort, open_port
from sim.pybullet_robot import SimRobot
from sim.tasks import Task

logger = logging.getLogger(__name__)

WATCHDOG_S = 0.05


@dataclass
class SensorErrors:
    """What calibration measures: encoder zero offsets and gyro bias (added to the readings)."""

    joint_offsets: np.ndarray | None = None
    gyro_bias: np.ndarray = field(default_factory=lambda: np.zeros(3))
    imu_tilt: np.ndarray = field(default_factory=lambda: np.zeros(2))
    """IMU mounting roll and pitch (rad): the IMU frame is the body frame rotated by them."""
    encoder_noise: float = 0.0005
    """Standard deviation of each joint angle reading (rad)."""
    gyro_noise: float = 0.005
    """Standard deviation of each gyro reading (rad/s)."""


# -- the robot ------------------------------------------------------------------------------------


class Emulator:
    """One simulated robot speaking protocol v1 over a PtyPort (or a SocketPort).

    Args:
        port: Where to serve; default a fresh PtyPort.
        faults: Link faults applied to every frame sent (and the disconnect schedule).
    """

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
        port: Port | None = None,
        faults: FaultSpec | None = None,
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
        self.port = port if port is not None else PtyPort()
        self.faults = faults if faults is not None and faults.active else None
        self.injector = (
            None if self.faults is None else FaultInjector(self.faults, 1.0 / spec.control_rate_hz, self._write)
        )
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
        self.disconnects = 0
        self.first_hello_time: float | None = None
        self._down_until: float | None = None
        self._lower = spec.array("joint_lower")
        self._upper = spec.array("joint_upper")
        self._running = False

    # -- messages ------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.port.write(data)

    def send(self, message) -> None:
        frame = self.encoder.encode(message)
        if self.injector is None:
            self._write(frame)
        else:
            self.injector.send(frame, time.monotonic())

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
            if self.first_hello_time is None:
                self.first_hello_time = time.monotonic()
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
        # A tilted IMU reports orientation q_body * q_mount and rates in its own frame.
        mount = quat_from_roll_pitch(*self.errors.imu_tilt)
        return State(
            tick=self.tick % 2**32,
            time=time.monotonic(),
            mode=self.mode,
            flags=flags,
            joint_pos=reading.joint_pos + self.offsets + self.rng.normal(0.0, self.errors.encoder_noise, n),
            joint_vel=reading.joint_vel,
            joint_torque=reading.joint_torque,
            quat=quat_multiply(reading.quat, mount),
            gyro=rotate_to_body(mount, reading.gyro)
            + self.errors.gyro_bias
            + self.rng.normal(0.0, self.errors.gyro_noise, 3),
            accel=rotate_to_body(mount, reading.accel),
            base_vel=reading.base_vel,
        )

    # -- link faults ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """False while the port is pulled (a `disconnect` fault)."""
        return self._down_until is None

    def _service_link(self, now: float) -> None:
        """Release delayed frames; pull the port when the disconnect fault is due, replug after the outage."""
        if self.injector is not None:
            self.injector.release(now)
        faults = self.faults
        if faults is None or faults.disconnect is None:
            return
        if self._down_until is not None:
            if now >= self._down_until:
                self.port.replug()
                # A new connection: each direction counts its seq from 0 again (docs/protocol.md).
                self.decoder, self.encoder = FrameDecoder(), FrameEncoder()
                self._down_until = None
                logger.info("port back at %s", self.port.path)
        elif (
            self.disconnects == 0
            and self.first_hello_time is not None
            and now - self.first_hello_time >= faults.disconnect
        ):
            self.disconnects += 1
            self.port.pull()
            if self.injector is not None:
                self.injector.clear()
            if self.mode != Mode.ESTOP:  # the robot lost its host: damp (lockstep has no watchdog to do it)
                self.mode = Mode.DAMPING
            self._down_until = now + faults.outage
            logger.info("port pulled for %.2f s", faults.outage)

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
        self._service_link(time.monotonic())
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
    imu_tilt: list[float] | None = None,
    supports_reset: bool = True,
    duration: float | None = None,
    faults: FaultSpec | str | None = None,
    link_path: str | None = None,
    announce=print,
) -> None:
    """`metactl emulate`: print `PORT <path>` once ready, then serve until SIGTERM/SIGINT.

    Args:
        faults: A FaultSpec or its `--faults` text (`"drop=0.05,disconnect=1.0"`).
        link_path: The path to announce and serve: a symlink to create (re-pointed at each new pty)
            or `socket://HOST:PORT`. With a `disconnect` fault and no link path, a symlink in a
            temporary directory, so the host can reopen the same path.
    """
    import signal

    from controller.robot import load_robot_spec
    from sim.tasks import load_task

    fault_spec = FaultSpec.parse(faults) if isinstance(faults, str) else faults
    spec = load_robot_spec(robot)
    task = load_task(task_file) if task_file else Task()
    errors = SensorErrors(
        joint_offsets=None if joint_offsets is None else np.asarray(joint_offsets, dtype=np.float64),
        gyro_bias=np.zeros(3) if gyro_bias is None else np.asarray(gyro_bias, dtype=np.float64),
        imu_tilt=np.zeros(2) if imu_tilt is None else np.asarray(imu_tilt, dtype=np.float64),
    )
    if errors.joint_offsets is not None and errors.joint_offsets.shape != (spec.num_joints,):
        raise ValueError(f"--joint-offsets needs {spec.num_joints} values for robot '{spec.name}'")
    temporary_dir = None
    if link_path is None and fault_spec is not None and fault_spec.disconnect is not None:
        temporary_dir = tempfile.mkdtemp(prefix="metactl-emulate-")
        link_path = os.path.join(temporary_dir, "tty")
    try:
        emulator = Emulator(
            spec,
            task,
            lockstep=lockstep,
            errors=errors,
            supports_reset=supports_reset,
            port=open_port(link_path),
            faults=fault_spec,
        )
        signal.signal(signal.SIGTERM, lambda *_: emulator.stop())
        try:
            announce(f"PORT {emulator.port.path}", flush=True)
            emulator.run(duration)
        except KeyboardInterrupt:
            pass
        finally:
            if emulator.injector is not None:
                logger.info("faults injected: %s, disconnects: %d", emulator.injector.counts, emulator.disconnects)
            emulator.close()
    finally:
        if temporary_dir is not None:
            shutil.rmtree(temporary_dir, ignore_errors=True)

"""Typed messages of serial protocol v1: one frozen dataclass per message type with `pack`/`unpack`
of its payload, and the enums they carry. Framing (COBS, header, CRC) is deploy/protocol.py, the payload
field checks and packing deploy/payload.py; the field layouts, with a test vector per message, are in
docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from deploy.payload import FixedLayout, PayloadReader, as_f32, check_str, check_uint, pack_f32, pack_str, payload_error


class Mode(enum.IntEnum):
    """Robot control mode (see docs/protocol.md for the watchdog and e-stop rules)."""

    PASSIVE = 0  # no torque
    DAMPING = 1  # kp = 0, kd > 0 on every joint
    POSITION = 2  # PD to the commanded targets
    ESTOP = 3  # latched damping until a Reset


class MessageType(enum.IntEnum):
    """Message type byte of the frame header."""

    HELLO = 0x01
    CAPABILITIES = 0x02
    STATE = 0x10
    COMMAND = 0x11
    MODE = 0x12
    RESET = 0x13
    HEARTBEAT = 0x20
    ESTOP = 0x30
    FAULT = 0x31


class FaultCode(enum.IntEnum):
    """Standard ``Fault.code`` values; a robot may add its own from 0x100 up."""

    WATCHDOG = 1  # no Command for 50 ms in POSITION: dropped to DAMPING
    LIMIT_CLAMPED = 2  # a target or torque was clamped to the robot's limits
    ESTOP_LATCHED = 3  # a ModeRequest or Command arrived while in ESTOP; send Reset first
    BAD_COMMAND = 4  # Command with the wrong joint count or non-finite values; ignored
    BAD_REQUEST = 5  # a message the robot cannot serve in its current state (the Fault text says why)


class Capability(enum.IntFlag):
    """Bits of ``Capabilities.flags``."""

    RESET_SUPPORTED = 1  # the robot can reset its episode (emulator, gantry)
    LOCKSTEP = 2  # the robot waits for each Command before stepping (emulator)
    BASE_VELOCITY = 4  # State.base_vel is measured, not NaN


class StateFlag(enum.IntFlag):
    """Bits of ``State.flags``."""

    FALLEN = 1
    EPISODE_START = 2


# -- mode check, array equality -------------------------------------------------------------------


def _check_mode(value: int) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        valid = ", ".join(f"{m.name}={m.value}" for m in Mode)
        raise payload_error(f"mode={value!r} is not a Mode; valid: {valid}") from None


class _ArrayEq:
    """Field-wise equality where numpy arrays compare by value (NaN equal to NaN); unhashable."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if isinstance(mine, np.ndarray):
                if not np.array_equal(mine, theirs, equal_nan=True):
                    return False
            elif isinstance(mine, float) and isinstance(theirs, float) and math.isnan(mine) and math.isnan(theirs):
                continue
            elif mine != theirs:
                return False
        return True


# -- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Host -> robot, first message of a session; the robot answers with Capabilities."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    protocol_version: int
    host_name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol_version", check_uint(self.protocol_version, 8, "protocol_version"))
        check_str(self.host_name, "host_name")

    def pack(self) -> bytes:
        return struct.pack("<B", self.protocol_version) + pack_str(self.host_name)

    @classmethod
    def unpack(cls, payload: bytes) -> Hello:
        reader = PayloadReader(payload, cls.__name__)
        (version,) = reader.unpack("B")
        message = cls(version, reader.string())
        reader.finish()
        return message


@dataclass(frozen=True)
class Capabilities:
    """Robot -> host answer to Hello: who the robot is and what it supports."""

    TYPE: ClassVar[MessageType] = MessageType.CAPABILITIES
    protocol_version: int
    robot: str
    control_rate_hz: int
    flags: Capability
    joint_names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol_version", check_uint(self.protocol_version, 8, "protocol_version"))
        check_str(self.robot, "robot")
        object.__setattr__(self, "control_rate_hz", check_uint(self.control_rate_hz, 16, "control_rate_hz"))
        object.__setattr__(self, "flags", Capability(check_uint(self.flags, 16, "flags")))
        names = tuple(self.joint_names)
        check_uint(len(names), 8, "number of joint_names")
        for index, name in enumerate(names):
            check_str(name, f"joint_names[{index}]")
        object.__setattr__(self, "joint_names", names)

    def pack(self) -> bytes:
        head = struct.pack("<B", self.protocol_version) + pack_str(self.robot)
        head += struct.pack("<HHB", self.control_rate_hz, self.flags, len(self.joint_names))
        return head + b"".join(pack_str(name) for name in self.joint_names)

    @classmethod
    def unpack(cls, payload: bytes) -> Capabilities:
        reader = PayloadReader(payload, cls.__name__)
        (version,) = reader.unpack("B")
        robot = reader.string()
        rate, flags, count = reader.unpack("HHB")
        names = tuple(reader.string() for _ in range(count))
        reader.finish()
        return cls(version, robot, rate, flags, names)


def _nan3() -> np.ndarray:
    return np.full(3, np.nan, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class State(_ArrayEq):
    """Robot -> host sensor snapshot, one per control tick. Arrays are float32, shape noted.

    Attributes:
        tick: Robot control tick counter (u32); a Command echoes it.
        time: Robot clock in seconds (float64).
        mode: The mode the robot is in.
        flags: StateFlag bits.
        joint_pos, joint_vel, joint_torque: (n,) in robot joint order (rad, rad/s, N m).
        quat: (4,) base orientation, x y z w.
        gyro: (3,) base angular velocity, rad/s, body frame.
        accel: (3,) base linear acceleration, m/s^2, body frame.
        base_vel: (3,) base linear velocity, m/s, body frame; NaN when the robot cannot measure it.
    """

    TYPE: ClassVar[MessageType] = MessageType.STATE
    tick: int
    time: float
    mode: Mode
    flags: StateFlag
    joint_pos: np.ndarray
    joint_vel: np.ndarray
    joint_torque: np.ndarray
    quat: np.ndarray
    gyro: np.ndarray
    accel: np.ndarray
    base_vel: np.ndarray = field(default_factory=_nan3)

    _HEAD: ClassVar[str] = "IdBBB"  # tick, time, mode, flags, n

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        set_field(self, "tick", check_uint(self.tick, 32, "tick"))
        set_field(self, "time", float(self.time))
        set_field(self, "mode", _check_mode(self.mode))
        set_field(self, "flags", StateFlag(check_uint(self.flags, 8, "flags")))
        joint_pos = as_f32(self.joint_pos, "joint_pos")
        check_uint(joint_pos.shape[0], 8, "number of joints")
        set_field(self, "joint_pos", joint_pos)
        for name in ("joint_vel", "joint_torque"):
            set_field(self, name, as_f32(getattr(self, name), name, joint_pos.shape[0]))
        for name, size in (("quat", 4), ("gyro", 3), ("accel", 3), ("base_vel", 3)):
            set_field(self, name, as_f32(getattr(self, name), name, size))

    @property
    def num_joints(self) -> int:
        return int(self.joint_pos.shape[0])

    def pack(self) -> bytes:
        head = struct.pack("<" + self._HEAD, self.tick, self.time, self.mode, self.flags, self.num_joints)
        arrays = (self.joint_pos, self.joint_vel, self.joint_torque, self.quat, self.gyro, self.accel, self.base_vel)
        return head + pack_f32(*arrays)

    @classmethod
    def unpack(cls, payload: bytes) -> State:
        reader = PayloadReader(payload, cls.__name__)
        tick, time, mode, flags, count = reader.unpack(cls._HEAD)
        joints = [reader.floats(count) for _ in range(3)]
        imu = [reader.floats(size) for size in (4, 3, 3, 3)]
        reader.finish()
        return cls(tick, time, mode, flags, *joints, *imu)


@dataclass(frozen=True, eq=False)
class Command(_ArrayEq):
    """Host -> robot PD command answering the State with the same tick; arrays (n,) float32."""

    TYPE: ClassVar[MessageType] = MessageType.COMMAND
    tick: int
    targets: np.ndarray
    kp: np.ndarray
    kd: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "tick", check_uint(self.tick, 32, "tick"))
        targets = as_f32(self.targets, "targets")
        check_uint(targets.shape[0], 8, "number of joints")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "kp", as_f32(self.kp, "kp", targets.shape[0]))
        object.__setattr__(self, "kd", as_f32(self.kd, "kd", targets.shape[0]))

    def pack(self) -> bytes:
        return struct.pack("<IB", self.tick, self.targets.shape[0]) + pack_f32(self.targets, self.kp, self.kd)

    @classmethod
    def unpack(cls, payload: bytes) -> Command:
        reader = PayloadReader(payload, cls.__name__)
        tick, count = reader.unpack("IB")
        arrays = [reader.floats(count) for _ in range(3)]
        reader.finish()
        return cls(tick, *arrays)


@dataclass(frozen=True)
class ModeRequest(FixedLayout):
    """Host -> robot: switch control mode (leaving ESTOP needs a Reset instead)."""

    TYPE: ClassVar[MessageType] = MessageType.MODE
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<B")
    mode: Mode

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _check_mode(self.mode))


@dataclass(frozen=True)
class Reset(FixedLayout):
    """Host -> robot request (status 0), robot -> host reply (0 done, 1 refused)."""

    TYPE: ClassVar[MessageType] = MessageType.RESET
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<B")
    REQUEST: ClassVar[int] = 0
    DONE: ClassVar[int] = 0
    REFUSED: ClassVar[int] = 1
    status: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", check_uint(self.status, 8, "status"))


@dataclass(frozen=True, eq=False)
class Heartbeat(_ArrayEq, FixedLayout):
    """Host -> robot liveness probe; the robot echoes it unchanged (round-trip time = now - time)."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Id")
    nonce: int
    time: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "nonce", check_uint(self.nonce, 32, "nonce"))
        object.__setattr__(self, "time", float(self.time))


@dataclass(frozen=True)
class EStop(FixedLayout):
    """Either direction: emergency stop, latched on the robot until a Reset; ``reason`` is a free code."""

    TYPE: ClassVar[MessageType] = MessageType.ESTOP
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<B")
    reason: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", check_uint(self.reason, 8, "reason"))


@dataclass(frozen=True)
class Fault:
    """Robot -> host: something went wrong on the robot (limit hit, watchdog, bad command)."""

    TYPE: ClassVar[MessageType] = MessageType.FAULT
    code: int
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", check_uint(self.code, 16, "code"))
        check_str(self.message, "message")

    def pack(self) -> bytes:
        return struct.pack("<H", self.code) + pack_str(self.message)

    @classmethod
    def unpack(cls, payload: bytes) -> Fault:
        reader = PayloadReader(payload, cls.__name__)
        (code,) = reader.unpack("H")
        message = reader.string()
        reader.finish()
        return cls(code, message)


Message = Hello | Capabilities | State | Command | ModeRequest | Reset | Heartbeat | EStop | Fault
MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Capabilities, State, Command, ModeRequest, Reset, Heartbeat, EStop, Fault)
}

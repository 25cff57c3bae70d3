"""Typed messages of serial protocol v1: one frozen dataclass per message type with `pack`/`unpack`
of its payload, and the enums they carry. Framing (COBS, header, CRC) is deploy/protocol.py; the field
layouts, with a test vector per message, are in docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import numpy as np

from deploy.errors import ProtocolError


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


# -- payload helpers ------------------------------------------------------------------------------


def _payload_error(message: str) -> ProtocolError:
    return ProtocolError(message, kind="payload")


def _check_uint(value: int, bits: int, name: str) -> int:
    value = int(value)
    if not 0 <= value < (1 << bits):
        raise _payload_error(f"{name}={value} does not fit u{bits} (0..{(1 << bits) - 1})")
    return value


def _check_mode(value: int) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        valid = ", ".join(f"{m.name}={m.value}" for m in Mode)
        raise _payload_error(f"mode={value!r} is not a Mode; valid: {valid}") from None


def _check_str(value: str, name: str) -> str:
    if len(value.encode("utf-8")) > 255:
        raise _payload_error(f"{name} is {len(value.encode('utf-8'))} bytes in UTF-8; at most 255 fit a u8 length")
    return value


def _as_f32(values: object, name: str, size: int | None = None) -> np.ndarray:
    """Read-only float32 1-D copy of ``values``, so a frozen message really is immutable."""
    try:
        array = np.array(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise _payload_error(f"{name} must be numbers: {error}") from None
    if array.ndim != 1 or (size is not None and array.shape[0] != size):
        expected = f"({size},)" if size is not None else "(n,)"
        raise _payload_error(f"{name} must have shape {expected}, got {array.shape}")
    array.setflags(write=False)
    return array


def _pack_str(value: str) -> bytes:
    data = value.encode("utf-8")
    return bytes([len(data)]) + data


def _pack_f32(*arrays: np.ndarray) -> bytes:
    return np.concatenate(arrays).astype("<f4").tobytes()


class _PayloadReader:
    """Reads fields from a payload in order; every overrun or leftover is a ProtocolError."""

    def __init__(self, payload: bytes, message_name: str) -> None:
        self._payload = bytes(payload)
        self._offset = 0
        self._name = message_name

    def _take(self, size: int) -> bytes:
        if self._offset + size > len(self._payload):
            raise _payload_error(
                f"{self._name} payload too short: needs {self._offset + size} bytes, has {len(self._payload)}"
            )
        chunk = self._payload[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def unpack(self, fmt: str) -> tuple:
        layout = struct.Struct("<" + fmt)
        return layout.unpack(self._take(layout.size))

    def string(self) -> str:
        (length,) = self.unpack("B")
        try:
            return self._take(length).decode("utf-8")
        except UnicodeDecodeError as error:
            raise _payload_error(f"{self._name}: string is not valid UTF-8 ({error})") from None

    def floats(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)

    def finish(self) -> None:
        extra = len(self._payload) - self._offset
        if extra:
            raise _payload_error(f"{self._name} payload has {extra} trailing bytes")


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
        object.__setattr__(self, "protocol_version", _check_uint(self.protocol_version, 8, "protocol_version"))
        _check_str(self.host_name, "host_name")

    def pack(self) -> bytes:
        return struct.pack("<B", self.protocol_version) + _pack_str(self.host_name)

    @classmethod
    def unpack(cls, payload: bytes) -> Hello:
        reader = _PayloadReader(payload, cls.__name__)
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
        object.__setattr__(self, "protocol_version", _check_uint(self.protocol_version, 8, "protocol_version"))
        _check_str(self.robot, "robot")
        object.__setattr__(self, "control_rate_hz", _check_uint(self.control_rate_hz, 16, "control_rate_hz"))
        object.__setattr__(self, "flags", Capability(_check_uint(self.flags, 16, "flags")))
        names = tuple(self.joint_names)
        _check_uint(len(names), 8, "number of joint_names")
        for index, name in enumerate(names):
            _check_str(name, f"joint_names[{index}]")
        object.__setattr__(self, "joint_names", names)

    def pack(self) -> bytes:
        head = struct.pack("<B", self.protocol_version) + _pack_str(self.robot)
        head += struct.pack("<HHB", self.control_rate_hz, self.flags, len(self.joint_names))
        return head + b"".join(_pack_str(name) for name in self.joint_names)

    @classmethod
    def unpack(cls, payload: bytes) -> Capabilities:
        reader = _PayloadReader(payload, cls.__name__)
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
        set_field(self, "tick", _check_uint(self.tick, 32, "tick"))
        set_field(self, "time", float(self.time))
        set_field(self, "mode", _check_mode(self.mode))
        set_field(self, "flags", StateFlag(_check_uint(self.flags, 8, "flags")))
        joint_pos = _as_f32(self.joint_pos, "joint_pos")
        _check_uint(joint_pos.shape[0], 8, "number of joints")
        set_field(self, "joint_pos", joint_pos)
        for name in ("joint_vel", "joint_torque"):
            set_field(self, name, _as_f32(getattr(self, name), name, joint_pos.shape[0]))
        for name, size in (("quat", 4), ("gyro", 3), ("accel", 3), ("base_vel", 3)):
            set_field(self, name, _as_f32(getattr(self, name), name, size))

    @property
    def num_joints(self) -> int:
        return int(self.joint_pos.shape[0])

    def pack(self) -> bytes:
        head = struct.pack("<" + self._HEAD, self.tick, self.time, self.mode, self.flags, self.num_joints)
        arrays = (self.joint_pos, self.joint_vel, self.joint_torque, self.quat, self.gyro, self.accel, self.base_vel)
        return head + _pack_f32(*arrays)

    @classmethod
    def unpack(cls, payload: bytes) -> State:
        reader = _PayloadReader(payload, cls.__name__)
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
        object.__setattr__(self, "tick", _check_uint(self.tick, 32, "tick"))
        targets = _as_f32(self.targets, "targets")
        _check_uint(targets.shape[0], 8, "number of joints")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "kp", _as_f32(self.kp, "kp", targets.shape[0]))
        object.__setattr__(self, "kd", _as_f32(self.kd, "kd", targets.shape[0]))

    def pack(self) -> bytes:
        return struct.pack("<IB", self.tick, self.targets.shape[0]) + _pack_f32(self.targets, self.kp, self.kd)

    @classmethod
    def unpack(cls, payload: bytes) -> Command:
        reader = _PayloadReader(payload, cls.__name__)
        tick, count = reader.unpack("IB")
        arrays = [reader.floats(count) for _ in range(3)]
        reader.finish()
        return cls(tick, *arrays)


_Fixed = TypeVar("_Fixed", bound="_FixedLayout")


class _FixedLayout:
    """Mixin for messages whose payload is one struct of their fields, in declaration order."""

    _LAYOUT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self._LAYOUT.pack(*(getattr(self, item.name) for item in dataclasses.fields(self)))  # type: ignore[arg-type]

    @classmethod
    def unpack(cls: type[_Fixed], payload: bytes) -> _Fixed:
        if len(payload) != cls._LAYOUT.size:
            raise _payload_error(f"{cls.__name__} payload is {len(payload)} bytes, expected {cls._LAYOUT.size}")
        return cls(*cls._LAYOUT.unpack(payload))


@dataclass(frozen=True)
class ModeRequest(_FixedLayout):
    """Host -> robot: switch control mode (leaving ESTOP needs a Reset instead)."""

    TYPE: ClassVar[MessageType] = MessageType.MODE
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<B")
    mode: Mode

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _check_mode(self.mode))


@dataclass(frozen=True)
class Reset(_FixedLayout):
    """Host -> robot request (status 0), robot -> host reply (0 done, 1 refused)."""

    TYPE: ClassVar[MessageType] = MessageType.RESET
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<B")
    REQUEST: ClassVar[int] = 0
    DONE: ClassVar[int] = 0
    REFUSED: ClassVar[int] = 1
    status: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", _check_uint(self.status, 8, "status"))


@dataclass(frozen=True, eq=False)
class Heartbeat(_ArrayEq, _FixedLayout):
    """Host -> robot liveness probe; the robot echoes it unchanged (round-trip time = now - time)."""

    TYPE: ClassVar[MessageType] = MessageType.HEARTBEAT
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Id")
    nonce: int
    time: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "nonce", _check_uint(self.nonce, 32, "nonce"))
        object.__setattr__(self, "time", float(self.time))


@dataclass(frozen=True)
class EStop(_FixedLayout):
    """Either direction: emergency stop, latched on the robot until a Reset; ``reason`` is a free code."""

    TYPE: ClassVar[MessageType] = MessageType.ESTOP
    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<B")
    reason: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", _check_uint(self.reason, 8, "reason"))


@dataclass(frozen=True)
class Fault:
    """Robot -> host: something went wrong on the robot (limit hit, watchdog, bad command)."""

    TYPE: ClassVar[MessageType] = MessageType.FAULT
    code: int
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", _check_uint(self.code, 16, "code"))
        _check_str(self.message, "message")

    def pack(self) -> bytes:
        return struct.pack("<H", self.code) + _pack_str(self.message)

    @classmethod
    def unpack(cls, payload: bytes) -> Fault:
        reader = _PayloadReader(payload, cls.__name__)
        (code,) = reader.unpack("H")
        message = reader.string()
        reader.finish()
        return cls(code, message)


Message = Hello | Capabilities | State | Command | ModeRequest | Reset | Heartbeat | EStop | Fault
MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Capabilities, State, Command, ModeRequest, Reset, Heartbeat, EStop, Fault)
}

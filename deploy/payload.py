"""Payload fields of serial protocol v1 messages: range and shape checks, little-endian packing, a
bounds-checked reader, and the mixin for messages whose payload is one fixed struct.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import ClassVar, TypeVar

import numpy as np

from deploy.errors import ProtocolError


def payload_error(message: str) -> ProtocolError:
    """The ProtocolError (kind "payload") of a field that breaks its layout."""
    return ProtocolError(message, kind="payload")


def check_uint(value: int, bits: int, name: str) -> int:
    """``value`` as an int, if it fits an unsigned ``bits``-bit field."""
    value = int(value)
    if not 0 <= value < (1 << bits):
        raise payload_error(f"{name}={value} does not fit u{bits} (0..{(1 << bits) - 1})")
    return value


def check_str(value: str, name: str) -> str:
    """``value``, if its UTF-8 fits a u8 length prefix (255 bytes)."""
    if len(value.encode("utf-8")) > 255:
        raise payload_error(f"{name} is {len(value.encode('utf-8'))} bytes in UTF-8; at most 255 fit a u8 length")
    return value


def as_f32(values: object, name: str, size: int | None = None) -> np.ndarray:
    """Read-only float32 1-D copy of ``values``, so a frozen message really is immutable."""
    try:
        array = np.array(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise payload_error(f"{name} must be numbers: {error}") from None
    if array.ndim != 1 or (size is not None and array.shape[0] != size):
        expected = f"({size},)" if size is not None else "(n,)"
        raise payload_error(f"{name} must have shape {expected}, got {array.shape}")
    array.setflags(write=False)
    return array


def pack_str(value: str) -> bytes:
    """u8 byte count, then the UTF-8 bytes."""
    data = value.encode("utf-8")
    return bytes([len(data)]) + data


def pack_f32(*arrays: np.ndarray) -> bytes:
    """The arrays back to back as little-endian float32."""
    return np.concatenate(arrays).astype("<f4").tobytes()


class PayloadReader:
    """Reads fields from a payload in order; every overrun or leftover is a ProtocolError."""

    def __init__(self, payload: bytes, message_name: str) -> None:
        self._payload = bytes(payload)
        self._offset = 0
        self._name = message_name

    def _take(self, size: int) -> bytes:
        if self._offset + size > len(self._payload):
            raise payload_error(
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
            raise payload_error(f"{self._name}: string is not valid UTF-8 ({error})") from None

    def floats(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)

    def finish(self) -> None:
        extra = len(self._payload) - self._offset
        if extra:
            raise payload_error(f"{self._name} payload has {extra} trailing bytes")


_Fixed = TypeVar("_Fixed", bound="FixedLayout")


class FixedLayout:
    """Mixin for messages whose payload is one struct of their fields, in declaration order."""

    _LAYOUT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self._LAYOUT.pack(*(getattr(self, item.name) for item in dataclasses.fields(self)))  # type: ignore[arg-type]

    @classmethod
    def unpack(cls: type[_Fixed], payload: bytes) -> _Fixed:
        if len(payload) != cls._LAYOUT.size:
            raise payload_error(f"{cls.__name__} payload is {len(payload)} bytes, expected {cls._LAYOUT.size}")
        return cls(*cls._LAYOUT.unpack(payload))

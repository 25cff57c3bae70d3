"""The emulator's side of the cable: pseudo-terminal and TCP ports that can be pulled and
re-plugged, and a fault injector that drops, corrupts, delays, duplicates or reorders the frames
the emulated robot sends (seeded). Used by sim/emulator.py; a host reopens the same path: a
symlink re-pointed atomically at each new pty, or a TCP port listened on again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import socket
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from controller.errors import ConfigError

# -- link faults ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultSpec:
    """Link faults the emulator injects into the frames it sends (`--faults KEY=VALUE,...`).

    Each frame draws each fault independently, in this order: drop (nothing else applies), corrupt,
    duplicate, then delay or reorder.
    """

    PROBABILITIES: ClassVar[tuple[str, ...]] = ("drop", "corrupt", "delay", "duplicate", "reorder")

    drop: float = 0.0
    """Probability that a frame is never written (the host sees a sequence gap)."""
    corrupt: float = 0.0
    """Probability that one byte before the frame's delimiter is changed (the host's CRC check drops it)."""
    delay: float = 0.0
    """Probability that a frame is held back 1 to 3 control periods (it arrives late, after newer ones)."""
    duplicate: float = 0.0
    """Probability that a frame is written twice."""
    reorder: float = 0.0
    """Probability that a frame swaps places with the next one (sent at the latest one period later)."""
    disconnect: float | None = None
    """Seconds after the first Hello when the port vanishes, once; None: never."""
    outage: float = 0.2
    """Seconds the port stays away on a disconnect."""
    seed: int = 0
    """Seed of the fault generator, so a fault pattern can be replayed."""

    def __post_init__(self) -> None:
        for name in self.PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"fault probability {name}={value} is outside [0, 1]")
        if self.disconnect is not None and not self.disconnect >= 0.0:
            raise ConfigError(f"disconnect={self.disconnect} must be >= 0 seconds after the first Hello")
        if not self.outage >= 0.0:
            raise ConfigError(f"outage={self.outage} must be >= 0 seconds")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(item.name for item in dataclasses.fields(cls))

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """`"drop=0.05,corrupt=0.01,disconnect=1.0"` -> FaultSpec; empty text: no faults.

        Raises:
            ConfigError: An unknown key (the message lists the valid ones), a malformed item, or a
                value out of range.
        """
        values: dict[str, float | int] = {}
        valid = ", ".join(cls.keys())
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"fault '{item}' is not KEY=VALUE; valid keys: {valid}")
            if key not in set(cls.keys()):
                raise ConfigError(f"unknown fault '{key}' in --faults; valid: {valid}")
            try:
                values[key] = int(value) if key == "seed" else float(value)
            except ValueError:
                raise ConfigError(f"fault {key}={value!r} is not a number") from None
        return cls(**values)

    @property
    def active(self) -> bool:
        return self.disconnect is not None or any(getattr(self, name) > 0 for name in self.PROBABILITIES)


class FaultInjector:
    """Sits between the emulator's encoder and its port and applies a FaultSpec to each frame.

    Args:
        spec: Which faults, how often.
        period: Control period (s): the unit of delay.
        write: Writes bytes to the port.
    """

    def __init__(self, spec: FaultSpec, period: float, write: Callable[[bytes], None]) -> None:
        self.spec = spec
        self.period = period
        self.rng = np.random.default_rng(spec.seed)
        self.counts = dict.fromkeys(FaultSpec.PROBABILITIES, 0)
        self._write = write
        self._held: list[tuple[float, bytes]] = []  # (release time, frame), delayed frames
        self._swapped: tuple[float, bytes] | None = None  # waits for the next frame to overtake it

    def send(self, frame: bytes, now: float) -> None:
        """Apply the faults to one encoded frame (0x00 delimiter included) and write what survives."""
        self.release(now)
        spec, rng = self.spec, self.rng
        if rng.random() < spec.drop:
            self.counts["drop"] += 1
            return
        if rng.random() < spec.corrupt:
            self.counts["corrupt"] += 1
            frame = self._corrupt(frame)
        if rng.random() < spec.duplicate:
            self.counts["duplicate"] += 1
            frame = frame + frame
        if rng.random() < spec.delay:
            self.counts["delay"] += 1
            self._held.append((now + self.period * int(rng.integers(1, 4)), frame))
            return
        if self._swapped is None and rng.random() < spec.reorder:
            self.counts["reorder"] += 1
            self._swapped = (now + self.period, frame)
            return
        self._write(frame)
        if self._swapped is not None:  # this frame overtook the one held back
            self._write(self._swapped[1])
            self._swapped = None

    def release(self, now: float) -> None:
        """Write the held frames whose time has come."""
        if self._swapped is not None and now >= self._swapped[0]:
            self._write(self._swapped[1])
            self._swapped = None
        if self._held:
            due = [frame for release, frame in self._held if release <= now]
            self._held = [(release, frame) for release, frame in self._held if release > now]
            for frame in due:
                self._write(frame)

    def clear(self) -> None:
        """Forget the held frames (the port they were meant for is gone)."""
        self._held.clear()
        self._swapped = None

    def _corrupt(self, frame: bytes) -> bytes:
        # Change one byte before the delimiter to another non-zero value: a 0x00 would split the frame,
        # which tests COBS resynchronisation rather than the CRC.
        data = bytearray(frame)
        index = int(self.rng.integers(0, len(data) - 1))
        value = int(self.rng.integers(1, 255))  # 1..254, skip the old value: uniform over the other 254
        data[index] = value if value < data[index] else value + 1
        return bytes(data)


# -- ports ----------------------------------------------------------------------------------------


def _point_symlink(link_path: str, target: str) -> None:
    """Make `link_path` point at `target` atomically (a host never sees a missing or half-made link)."""
    temporary = f"{link_path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link_path)


class PtyPort:
    """The robot's end of a pseudo-terminal; the host opens `path` like a serial device.

    Args:
        link_path: A symlink to the pty, re-pointed at each `replug()`, so a host can reopen the same
            path after the port vanished; None: `path` is the /dev/pts/N itself.
    """

    def __init__(self, link_path: str | None = None) -> None:
        self.link_path = link_path
        self.dropped_writes = 0
        self.master: int | None = None
        self._slave: int | None = None
        self.device = ""
        self.replug()

    @property
    def path(self) -> str:
        return self.link_path or self.device

    def replug(self) -> None:
        """Open a fresh pty (and point the link path at it)."""
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line discipline: bytes pass unchanged
        os.set_blocking(self.master, False)
        self.device = os.ttyname(self._slave)
        if self.link_path:
            _point_symlink(self.link_path, self.device)

    def pull(self) -> None:
        """The port vanishes: the link path disappears and a host holding the pty gets an I/O error."""
        if self.link_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.link_path)
        for fd in (self.master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self._slave = None

    def read(self, timeout: float) -> bytes:
        if self.master is None:
            time.sleep(max(0.0, timeout))
            return b""
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
        if self.master is None:
            self.dropped_writes += 1
            return
        try:
            os.write(self.master, data)
        except (BlockingIOError, OSError):
            # No reader draining the port: drop the frame rather than stall the robot.
            self.dropped_writes += 1

    def close(self) -> None:
        self.pull()


class SocketPort:
    """The robot's end of a TCP link: the host opens `socket://host:port`; one host at a time.

    Args:
        host: Address to listen on.
        port: TCP port; 0 picks a free one (kept across `replug()`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port_number = port
        self.dropped_writes = 0
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self.replug()

    @property
    def path(self) -> str:
        return f"socket://{self.host}:{self.port_number}"

    def replug(self) -> None:
        """Listen again, on the same port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port_number))
        listener.listen(1)
        listener.setblocking(False)
        self.port_number = listener.getsockname()[1]
        self._listener = listener

    def pull(self) -> None:
        """Drop the host's connection and stop listening (connections are refused until `replug()`)."""
        for sock in (self._client, self._listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._client = self._listener = None

    def read(self, timeout: float) -> bytes:
        sockets = [sock for sock in (self._listener, self._client) if sock is not None]
        if not sockets:
            time.sleep(max(0.0, timeout))
            return b""
        ready, _, _ = select.select(sockets, [], [], max(0.0, timeout))
        if self._listener is not None and self._listener in ready:
            with contextlib.suppress(BlockingIOError):
                client, _ = self._listener.accept()
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client.settimeout(0.05)  # a host that stops reading must not stall the robot for long
                if self._client is not None:  # a new host replaces the old one, as on a serial line
                    with contextlib.suppress(OSError):
                        self._client.close()
                self._client = client
        if self._client is None or self._client not in ready:
            return b""
        try:
            data = self._client.recv(65536)
        except (TimeoutError, BlockingIOError):
            return b""
        except OSError:
            data = b""
        if not data:  # the host hung up
            with contextlib.suppress(OSError):
                self._client.close()
            self._client = None
        return data

    def write(self, data: bytes) -> None:
        if self._client is None:
            self.dropped_writes += 1
            return
        try:
            self._client.sendall(data)
        except OSError:
            self.dropped_writes += 1

    def close(self) -> None:
        self.pull()


Port = PtyPort | SocketPort


def open_port(link_path: str | None = None) -> Port:
    """`socket://host:port` -> SocketPort; a file path (symlink to create) or None -> PtyPort."""
    if link_path and link_path.startswith("socket://"):
        host, sep, number = link_path[len("socket://") :].rpartition(":")
        if not sep or not number.isdigit():
            raise ConfigError(f"link path {link_path!r} is not socket://HOST:PORT")
        return SocketPort(host or "127.0.0.1", int(number))
    return PtyPort(link_path)

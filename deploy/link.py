"""Host side of the serial link: a pyserial transport, protocol v1 framing, typed messages.

Any pyserial URL works: a device (/dev/ttyUSB0), a pseudo-terminal (/dev/pts/5, what
``metactl emulate`` offers), ``socket://host:port`` and ``loop://``. One reader thread owns the port
and decodes frames as they arrive; writes go through a lock. States land in a one-slot mailbox (a
control loop wants the newest, never a backlog); every other message goes to a bounded queue.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType

import serial

from deploy.errors import LinkError, ProtocolError
from deploy.messages import Capabilities, Fault, Hello, Message, State
from deploy.protocol import PROTOCOL_VERSION, DecoderStats, FrameDecoder, FrameEncoder

try:  # POSIX only; elsewhere socket:// falls back to pyserial's one-byte reads
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkStats:
    """Snapshot of a link's counters since it was created (kept across close/open)."""

    decoder: DecoderStats
    frames_sent: int
    bytes_sent: int
    bytes_received: int
    messages_dropped: int  # non-State messages lost because nobody called recv() and the queue was full
    states_skipped: int  # States overwritten before latest_state() returned them

    @property
    def corrupt(self) -> int:
        return self.decoder.corrupt


class Link:
    """A serial link to the robot's microcontroller.

    Args:
        url: Anything ``serial.serial_for_url`` accepts: a device or pty path, ``socket://host:port``,
            ``loop://``.
        baudrate: Line rate for real UARTs (ignored by pty, socket and loop transports).
        read_timeout: Seconds one port read may block. It bounds how long ``close()`` waits on
            transports that cannot cancel a read (``socket://``).
        write_timeout: Seconds a write may block before ``send`` raises LinkError.
        queue_size: Most non-State messages kept for ``recv``; the oldest go first.

    A port error in the reader thread (pty closed, USB unplugged, socket dropped) is raised as
    LinkError by the next ``send``, ``latest_state`` or ``reset_input``; ``recv`` first returns the
    messages that arrived before it (a Fault explaining the disconnect is worth reading).
    """

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = 1_000_000,
        read_timeout: float = 0.05,
        write_timeout: float = 0.5,
        queue_size: int = 256,
    ) -> None:
        for name, value in (("baudrate", baudrate), ("read_timeout", read_timeout), ("queue_size", queue_size)):
            if value <= 0:
                raise LinkError(f"{name}={value} must be positive")
        if write_timeout < 0:
            raise LinkError(f"write_timeout={write_timeout} must be >= 0")
        self.url = url
        self.baudrate = baudrate
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self._port: serial.SerialBase | None = None
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._cond = threading.Condition()  # guards decoder, mailbox, queue, counters and _error
        self._decoder = FrameDecoder(resync=True)
        self._encoder = FrameEncoder()
        self._queue: collections.deque[Message] = collections.deque(maxlen=queue_size)
        self._state: State | None = None
        self._state_fresh = False
        self._error: LinkError | None = None
        self._delimit_next_write = False
        self._frames_sent = self._bytes_sent = self._bytes_received = 0
        self._messages_dropped = self._states_skipped = 0

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True between open() and close() while the port works (False once the reader hit an error)."""
        return self._port is not None and self._error is None

    def open(self) -> None:
        """Open the port and start the reader thread.

        Raises:
            LinkError: Already open, or the port cannot be opened (message names the url).
        """
        if self._port is not None:
            raise LinkError(f"link to {self.url!r} is already open")
        try:
            # No hardware flow control and no DTR/RTS toggling: a pty has no modem lines, and a DTR pulse
            # resets some boards. (pyserial's own initial DTR/RTS ioctl fails harmlessly on a pty.)
            port = serial.serial_for_url(
                self.url,
                baudrate=self.baudrate,
                timeout=self.read_timeout,
                write_timeout=self.write_timeout,
                dsrdtr=False,
                rtscts=False,
            )
        except (serial.SerialException, OSError, ValueError) as error:
            raise LinkError(f"cannot open serial link {self.url!r}: {error}") from error
        sock = getattr(port, "_socket", None)
        if sock is not None:  # socket://: frames are small and latency-bound
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            self._decoder.reset(resync=True)  # the robot may be mid-frame
            self._queue.clear()
            self._state, self._state_fresh, self._error = None, False, None
        self._port = port
        self._stop.clear()
        # A lone delimiter ends whatever partial frame the robot's decoder holds; empty frames are ignored.
        self._delimit_next_write = True
        self._reader = threading.Thread(
            target=self._read_loop, args=(port,), name=f"metactl-link-reader {self.url}", daemon=True
        )
        self._reader.start()

    def close(self) -> None:
        """Stop the reader thread and close the port. Idempotent; never raises."""
        port, reader = self._port, self._reader
        if port is None:
            return
        self._stop.set()
        if hasattr(port, "cancel_read"):
            with contextlib.suppress(Exception):
                port.cancel_read()
        if reader is not None:
            reader.join(timeout=2.0 + 2 * self.read_timeout)
            if reader.is_alive():
                logger.warning("reader thread of %s did not stop; closing the port under it", self.url)
        with self._write_lock:
            with contextlib.suppress(Exception):
                port.close()
            self._port, self._reader = None, None
        with self._cond:
            self._cond.notify_all()  # wake recv/latest_state waiters: they raise "closed"

    def __enter__(self) -> Link:
        if self._port is None:
            self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # -- I/O --------------------------------------------------------------------------------------

    def send(self, msg: Message) -> int:
        """Frame and write ``msg``; returns the sequence number it went out with.

        Raises:
            ProtocolError: The message does not fit the protocol (payload too large).
            LinkError: The link is closed or broken, or the write failed or timed out.
        """
        with self._write_lock:
            port = self._check_usable()
            seq = self._encoder.next_seq
            frame = self._encoder.encode(msg)
            if self._delimit_next_write:
                frame = b"\x00" + frame
            try:
                port.write(frame)
            except serial.SerialTimeoutException as error:
                self._delimit_next_write = True  # part of the frame may be out: terminate it first next time
                raise LinkError(f"write to {self.url!r} timed out after {self.write_timeout} s") from error
            except (serial.SerialException, OSError) as error:
                failure = LinkError(f"write to {self.url!r} failed: {error}")
                self._fail(failure)
                raise failure from error
            self._delimit_next_write = False
            with self._cond:
                self._frames_sent += 1
                self._bytes_sent += len(frame)
            return seq

    def recv(self, timeout: float | None = None) -> Message | None:
        """Next non-State message, oldest first; None if none arrives within ``timeout`` (None: wait forever).

        Raises:
            LinkError: The link is closed, or broke and every message received before is already returned.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._error is not None or self._port is None, timeout)
            if self._queue:
                return self._queue.popleft()
            self._check_usable()
            return None

    def latest_state(self, timeout: float | None = None) -> State | None:
        """Newest State not returned before; waits up to ``timeout`` (None: forever) for one, else None.

        States that arrive while nobody asks are overwritten and counted in ``stats.states_skipped``;
        compare ``State.tick`` between calls to see which ticks were missed.

        Raises:
            LinkError: The link is closed or broken (even if a State is waiting: do not act on a dead link).
        """
        with self._cond:
            self._cond.wait_for(lambda: self._state_fresh or self._error is not None or self._port is None, timeout)
            self._check_usable()
            if not self._state_fresh:
                return None
            self._state_fresh = False
            return self._state

    def reset_input(self) -> None:
        """Drop every byte, frame and message received so far (e.g. before a new episode)."""
        with self._cond:
            port = self._check_usable()
            try:
                port.reset_input_buffer()
            except (serial.SerialException, OSError) as error:
                raise LinkError(f"cannot flush input of {self.url!r}: {error}") from error
            self._decoder.reset(resync=True)  # the reader may hold the first half of a frame
            self._queue.clear()
            self._state_fresh = False

    @property
    def stats(self) -> LinkStats:
        """Counters snapshot: decoder errors and gaps, frames and bytes each way, local drops."""
        with self._cond:
            return LinkStats(
                decoder=dataclasses.replace(self._decoder.stats),
                frames_sent=self._frames_sent,
                bytes_sent=self._bytes_sent,
                bytes_received=self._bytes_received,
                messages_dropped=self._messages_dropped,
                states_skipped=self._states_skipped,
            )

    # -- reader thread ----------------------------------------------------------------------------

    def _read_loop(self, port: serial.SerialBase) -> None:
        try:
            while not self._stop.is_set():
                data = port.read(_bytes_waiting(port) or 1)
                if data:
                    self._on_data(data)
        except Exception as error:  # any failure must reach the caller, not vanish with the thread
            if not self._stop.is_set():
                logger.warning("serial link %s failed: %s", self.url, error)
                self._fail(LinkError(f"serial link {self.url!r} failed: {type(error).__name__}: {error}"))

    def _on_data(self, data: bytes) -> None:
        with self._cond:
            self._bytes_received += len(data)
            for _seq, msg in self._decoder.feed(data):
                if isinstance(msg, State):
                    self._states_skipped += self._state_fresh
                    self._state, self._state_fresh = msg, True
                else:
                    self._messages_dropped += len(self._queue) == self._queue.maxlen
                    self._queue.append(msg)
            self._cond.notify_all()

    def _fail(self, error: LinkError) -> None:
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def _check_usable(self) -> serial.SerialBase:
        port = self._port
        if port is None:
            raise LinkError(f"link to {self.url!r} is not open; call open() or use it as a context manager")
        if self._error is not None:
            raise self._error
        return port


def _bytes_waiting(port: serial.SerialBase) -> int:
    """Bytes readable now. pyserial's socket:// only says 0 or 1, which would mean one recv per byte."""
    sock = getattr(port, "_socket", None)
    if sock is not None and fcntl is not None:
        with contextlib.suppress(OSError, ValueError):
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    return port.in_waiting


def handshake(link: Link, host_name: str, timeout: float = 2.0, *, retry_interval: float = 0.5) -> Capabilities:
    """Send Hello and wait for the robot's Capabilities.

    Hello is re-sent every ``retry_interval`` seconds (a robot that is still booting misses the first),
    so a late duplicate Capabilities may follow in ``link.recv``. Other messages received meanwhile
    are discarded, except a Fault, which is raised.

    Raises:
        LinkError: No Capabilities within ``timeout`` (names the url), or the robot sent a Fault.
        ProtocolError: The robot speaks another protocol version.
    """
    deadline = time.monotonic() + timeout
    next_hello = time.monotonic()
    hellos_sent = 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise LinkError(
                f"no Capabilities from {link.url!r} within {timeout} s after {hellos_sent} Hello(s): is the robot "
                f"(or `metactl emulate`) running on that port and speaking protocol v{PROTOCOL_VERSION}?"
            )
        if now >= next_hello:
            link.send(Hello(PROTOCOL_VERSION, host_name))
            hellos_sent += 1
            next_hello = now + retry_interval
        msg = link.recv(timeout=max(0.0, min(deadline, next_hello) - time.monotonic()))
        if isinstance(msg, Capabilities):
            if msg.protocol_version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"robot at {link.url!r} speaks protocol v{msg.protocol_version}, this host v{PROTOCOL_VERSION}"
                )
            return msg
        if isinstance(msg, Fault):
            raise LinkError(f"robot at {link.url!r} reported fault {msg.code} during handshake: {msg.message}")
        if msg is not None:
            logger.debug("handshake on %s: ignoring %s", link.url, type(msg).__name__)

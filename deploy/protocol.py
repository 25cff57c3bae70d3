"""Serial protocol v1 framing between the host (robot computer) and the robot's microcontroller.

A frame on the wire is ``cobs(header + payload + crc) + b"\\x00"`` with header ``<BBHH`` (version,
message type, sequence number, payload length) and ``crc = crc32(header + payload)`` as ``<I``.
The full specification, with a test vector per message, is docs/protocol.md.

With deploy/messages.py this module is the codec (numpy, stdlib, cobs): the emulator in sim/ and the host link in
deploy/link.py share it, so both ends of the wire run the same code.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from cobs import cobs

from deploy.errors import ProtocolError
from deploy.messages import MESSAGE_CLASSES, Message, MessageType

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<BBHH")  # version, message type, sequence number, payload length
CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size  # 6
CRC_SIZE = CRC.size  # 4
MAX_PAYLOAD = 1024
MAX_FRAME_SIZE = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE  # 1034 bytes before COBS
# COBS adds one code byte per started block of 254 bytes: n + n // 254 + 1 bounds it.
MAX_ENCODED_SIZE = MAX_FRAME_SIZE + MAX_FRAME_SIZE // 254 + 1  # 1039, without the 0x00 delimiter
SEQ_MODULO = 1 << 16


# -- framing --------------------------------------------------------------------------------------


def encode_frame(msg: Message, seq: int) -> bytes:
    """Encode one message as a complete wire frame, the 0x00 delimiter included.

    Raises:
        ProtocolError: ``seq`` is outside u16 or the payload exceeds MAX_PAYLOAD.
    """
    if not 0 <= seq < SEQ_MODULO:
        raise ProtocolError(f"seq={seq} does not fit u16 (0..{SEQ_MODULO - 1})")
    payload = msg.pack()
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{type(msg).__name__} payload is {len(payload)} bytes; MAX_PAYLOAD is {MAX_PAYLOAD}")
    body = HEADER.pack(PROTOCOL_VERSION, msg.TYPE, seq, len(payload)) + payload
    return cobs.encode(body + CRC.pack(zlib.crc32(body))) + b"\x00"


def decode_frame(frame: bytes) -> tuple[int, Message]:
    """Decode one frame given without its 0x00 delimiter.

    Checks run in this order, each with its own ``ProtocolError.kind``: oversize, cobs, short, crc,
    version, length, type, payload. The CRC is checked before any header field is trusted, so a flipped
    bit anywhere shows up as a CRC error.

    Returns:
        (seq, message).
    """
    if len(frame) > MAX_ENCODED_SIZE:
        raise ProtocolError(f"frame is {len(frame)} bytes encoded; at most {MAX_ENCODED_SIZE}", kind="oversize")
    try:
        raw = cobs.decode(frame)
    except cobs.DecodeError as error:
        raise ProtocolError(f"COBS decoding failed: {error}", kind="cobs") from None
    if len(raw) < HEADER_SIZE + CRC_SIZE:
        raise ProtocolError(f"short frame: {len(raw)} bytes, at least {HEADER_SIZE + CRC_SIZE}", kind="short")
    body = raw[:-CRC_SIZE]
    (received_crc,) = CRC.unpack_from(raw, len(body))
    computed_crc = zlib.crc32(body)
    if received_crc != computed_crc:
        raise ProtocolError(f"CRC mismatch: frame says {received_crc:#010x}, computed {computed_crc:#010x}", kind="crc")
    version, type_code, seq, length = HEADER.unpack_from(body)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version}, this host speaks {PROTOCOL_VERSION}", kind="version")
    if length != len(body) - HEADER_SIZE:
        raise ProtocolError(
            f"length mismatch: header says {length}, payload is {len(body) - HEADER_SIZE}", kind="length"
        )
    try:
        msg_type = MessageType(type_code)
    except ValueError:
        valid = ", ".join(f"{t.name}={t.value:#04x}" for t in MessageType)
        raise ProtocolError(f"unknown message type {type_code:#04x}; valid: {valid}", kind="type") from None
    return seq, MESSAGE_CLASSES[msg_type].unpack(body[HEADER_SIZE:])


@dataclass
class DecoderStats:
    """What a FrameDecoder saw. Every dropped frame lands in exactly one error count."""

    frames_ok: int = 0
    crc_errors: int = 0
    cobs_errors: int = 0
    length_errors: int = 0  # short frames and header length != payload length
    unknown_types: int = 0
    version_errors: int = 0
    payload_errors: int = 0  # valid frame, malformed message (wrong size, bad enum, bad UTF-8)
    oversize: int = 0  # longer than MAX_ENCODED_SIZE; discarded up to the next 0x00
    seq_gaps: int = 0  # sequence numbers missing between consecutive good frames, whatever the cause
    duplicates: int = 0  # good frame with the same seq as the previous one (still delivered)
    seq_resets: int = 0  # seq jumped backwards: the peer restarted its counter (not counted as a gap)
    skipped_bytes: int = 0  # discarded unread: rest of an oversize frame, a partial first frame after a resync

    @property
    def corrupt(self) -> int:
        """Frames dropped as corrupt or not understood."""
        return (
            self.crc_errors
            + self.cobs_errors
            + self.length_errors
            + self.unknown_types
            + self.version_errors
            + self.payload_errors
            + self.oversize
        )


_ERROR_COUNTERS = {
    "oversize": "oversize",
    "cobs": "cobs_errors",
    "short": "length_errors",
    "crc": "crc_errors",
    "version": "version_errors",
    "length": "length_errors",
    "type": "unknown_types",
    "payload": "payload_errors",
}


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back (seq, message) for each good frame.

    It never raises on bad input: every bad frame is counted in ``stats`` and dropped, and its buffer
    never holds more than MAX_ENCODED_SIZE bytes.

    Args:
        resync: The stream may start mid-frame (a port opened while the robot already writes to it): if
            the first frame does not decode, its bytes go to ``stats.skipped_bytes``, not to an error count.
    """

    def __init__(self, *, resync: bool = False) -> None:
        self.stats = DecoderStats()
        self._buffer = bytearray()
        self._resync = resync
        self._discarding = False
        self._last_seq: int | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of the unfinished frame held now (never more than MAX_ENCODED_SIZE)."""
        return len(self._buffer)

    def reset(self, *, resync: bool = True) -> None:
        """Drop the partial frame and forget the last seq (stats are kept); see ``resync`` above."""
        self.stats.skipped_bytes += len(self._buffer)
        self._buffer.clear()
        self._resync = resync
        self._discarding = False
        self._last_seq = None

    def feed(self, data: bytes) -> list[tuple[int, Message]]:
        """Consume ``data``; return the frames it completed, oldest first."""
        data = bytes(data)
        decoded: list[tuple[int, Message]] = []
        start = 0
        while start < len(data):
            end = data.find(b"\x00", start)
            if end < 0:
                self._accumulate(data[start:])
                break
            self._accumulate(data[start:end])
            self._end_frame(decoded)
            start = end + 1
        return decoded

    def _accumulate(self, chunk: bytes) -> None:
        if self._discarding:
            self.stats.skipped_bytes += len(chunk)
        elif len(self._buffer) + len(chunk) > MAX_ENCODED_SIZE:
            if not self._resync:
                self.stats.oversize += 1
            self.stats.skipped_bytes += len(self._buffer) + len(chunk)
            self._buffer.clear()
            self._discarding = True
        else:
            self._buffer += chunk

    def _end_frame(self, decoded: list[tuple[int, Message]]) -> None:
        if self._discarding:
            self._discarding = self._resync = False
            return
        if not self._buffer:  # consecutive delimiters: an idle line, not an error
            return
        frame = bytes(self._buffer)
        self._buffer.clear()
        resync, self._resync = self._resync, False
        try:
            seq, msg = decode_frame(frame)
        except ProtocolError as error:
            if resync:
                self.stats.skipped_bytes += len(frame)
            else:
                counter = _ERROR_COUNTERS.get(error.kind or "payload", "payload_errors")
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            return
        self._track_seq(seq)
        self.stats.frames_ok += 1
        decoded.append((seq, msg))

    def _track_seq(self, seq: int) -> None:
        last, self._last_seq = self._last_seq, seq
        if last is None:
            return
        step = (seq - last) % SEQ_MODULO  # wrap-aware: 65535 -> 0 is a step of 1
        if step == 0:
            self.stats.duplicates += 1
        elif step > SEQ_MODULO // 2:
            self.stats.seq_resets += 1
        else:
            self.stats.seq_gaps += step - 1


class FrameEncoder:
    """Holds the outgoing sequence counter (u16, wraps) for one direction of a link."""

    def __init__(self, start_seq: int = 0) -> None:
        self.next_seq = start_seq % SEQ_MODULO

    def encode(self, msg: Message) -> bytes:
        """Frame ``msg`` with the next seq; the counter advances only when encoding succeeds."""
        frame = encode_frame(msg, self.next_seq)
        self.next_seq = (self.next_seq + 1) % SEQ_MODULO
        return frame

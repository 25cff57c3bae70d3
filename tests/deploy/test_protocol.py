"""Serial protocol v1 codec: vectors shared with docs/protocol.md, hand-checked CRC and COBS, error counting."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from cobs import cobs

from deploy.errors import LinkError, ProtocolError
from deploy.messages import (
    Capabilities,
    Capability,
    Command,
    EStop,
    Fault,
    Heartbeat,
    Hello,
    Mode,
    ModeRequest,
    Reset,
    State,
    StateFlag,
)
from deploy.protocol import MAX_ENCODED_SIZE, MAX_PAYLOAD, FrameDecoder, FrameEncoder, decode_frame, encode_frame

NAN3 = [np.nan, np.nan, np.nan]

# (seq, message, frame hex): the same literals as the table in docs/protocol.md.
VECTORS = [
    (0, Hello(1, "host"), "0301010102060b0104686f7374c3e52e3700"),
    (
        1,
        Capabilities(1, "a1", 500, Capability.RESET_SUPPORTED | Capability.BASE_VELOCITY, ("hip", "knee")),
        "0401020102120801026131f401050f0203686970046b6e65657b910a4b00",
    ),
    (
        2,
        State(
            42,
            1.5,
            Mode.POSITION,
            StateFlag.EPISODE_START,
            [0.5, -1.0],
            [0.25, 0.0],
            [2.0, -2.0],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.125],
            [0.0, 0.0, 9.75],
            NAN3,
        ),  # fmt: skip
        "04011002025b022a010101010101010106f83f0202020101023f010380bf0103803e0101010101010240010102c0010101010101010101"
        "0101010103803f01010101010101010101023e010101010101010101031c410103c07f0103c07f0107c07f5671cb2600",
    ),
    (
        3,
        Command(42, [0.5, -1.0], [20.0, 20.0], [0.5, 0.5]),
        "04011103021d022a010102020101023f010380bf0103a0410103a0410101023f0101063f44b92dbe00",
    ),
    (4, ModeRequest(Mode.DAMPING), "04011204020106013b8b40f600"),
    (5, Reset(0), "0401130502010105b8417b7700"),
    (6, Heartbeat(7, 0.25), "04012006020c0207010101010101010107d03f32b2489c00"),
    (7, EStop(1), "0401300702010601d65584fb00"),
    (8, Fault(3, "torque"), "04013108020902030c06746f727175658544a65300"),
]


def _state(tick: int = 1, num_joints: int = 2) -> State:
    joints = np.arange(num_joints, dtype=np.float32)
    return State(tick, 0.5, Mode.DAMPING, 0, joints, -joints, 2 * joints, [0, 0, 0, 1], [1, 2, 3], [4, 5, 6])


def _raw_frame(type_code: int, payload: bytes, *, seq: int = 0, version: int = 1, length: int | None = None) -> bytes:
    """A frame with a valid CRC but whatever header we ask for (no delimiter)."""
    body = struct.pack("<BBHH", version, type_code, seq, len(payload) if length is None else length) + payload
    return cobs.encode(body + struct.pack("<I", zlib.crc32(body)))


@pytest.mark.parametrize(("seq", "message", "frame_hex"), VECTORS, ids=[type(m).__name__ for _, m, _ in VECTORS])
def test_vectors_encode_and_decode(seq: int, message: object, frame_hex: str) -> None:
    assert encode_frame(message, seq).hex() == frame_hex
    assert decode_frame(bytes.fromhex(frame_hex)[:-1]) == (seq, message)


def test_doc_lists_the_same_vectors() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    for seq, message, frame_hex in VECTORS:
        assert f"| {seq} | `{type(message).__name__}(" in doc
        assert f"`{frame_hex}`" in doc


def test_crc_and_cobs_by_hand() -> None:
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value
    body = bytes([1, 0x30, 7, 0, 1, 0]) + bytes([1])  # EStop(1), seq 7: header + payload
    assert zlib.crc32(body) == 0xFB8455D6
    # COBS: each code byte = 1 + count of non-zero bytes up to the next zero, which it replaces.
    expected = bytes([4, 1, 0x30, 7, 2, 1, 6, 1, 0xD6, 0x55, 0x84, 0xFB, 0])
    assert encode_frame(EStop(1), 7) == expected


@pytest.mark.parametrize(
    "message",
    [
        Hello(1, "héllo-ü"),
        Capabilities(1, "", 0, 0, ()),
        Capabilities(1, "a1", 65535, 0xFFFF, tuple(f"joint_{i}" for i in range(12))),
        _state(tick=2**32 - 1, num_joints=12),
        _state(num_joints=0),
        Command(0, [], [], []),
        Command(9, np.linspace(-1, 1, 12), np.full(12, 30.0), np.full(12, 0.7)),
        ModeRequest(Mode.ESTOP),
        Reset(Reset.REFUSED),
        Heartbeat(2**32 - 1, 1e9 + 0.123456789),
        EStop(255),
        Fault(65535, "x" * 255),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip(message: object) -> None:
    for seq in (0, 1, 65535):
        assert decode_frame(encode_frame(message, seq)[:-1]) == (seq, message)
    assert type(message).unpack(message.pack()) == message


def test_state_fields() -> None:
    state = _state(num_joints=3)
    assert state.num_joints == 3 and state.joint_pos.dtype == np.float32
    assert np.isnan(state.base_vel).all()  # default: not measured
    assert len(state.pack()) == 67 + 12 * 3
    assert len(Command(0, [0] * 3, [0] * 3, [0] * 3).pack()) == 5 + 12 * 3
    with pytest.raises(ValueError):
        state.joint_pos[0] = 1.0  # frozen message, read-only arrays
    assert state != _state(tick=2, num_joints=3)
    assert state != State(**{**state.__dict__, "quat": [0, 0, 1, 0]})
    with pytest.raises(TypeError):
        hash(state)
    assert hash(Reset(0)) == hash(Reset(0))
    decoded = decode_frame(encode_frame(State(**{**state.__dict__, "flags": 0xFF}), 0)[:-1])[1]
    assert decoded.flags & StateFlag.FALLEN  # unknown flag bits survive


@pytest.mark.parametrize(
    "build",
    [
        lambda: Hello(256, "x"),
        lambda: Hello(1, "x" * 256),
        lambda: Capabilities(1, "a1", 70000, 0, ()),
        lambda: Capabilities(1, "a1", 1, 0, tuple("j" for _ in range(256))),
        lambda: State(-1, 0, 0, 0, [0], [0], [0], [0, 0, 0, 1], [0] * 3, [0] * 3),
        lambda: State(0, 0, 7, 0, [0], [0], [0], [0, 0, 0, 1], [0] * 3, [0] * 3),
        lambda: State(0, 0, 0, 0, [0, 1], [0], [0, 0], [0, 0, 0, 1], [0] * 3, [0] * 3),
        lambda: State(0, 0, 0, 0, [0], [0], [0], [0, 0, 1], [0] * 3, [0] * 3),
        lambda: Command(0, [[0.0]], [0], [0]),
        lambda: Command(0, [0.0], [0, 0], [0]),
        lambda: Command(0, ["a"], [0], [0]),
        lambda: ModeRequest(4),
        lambda: Heartbeat(2**32, 0.0),
    ],
)
def test_invalid_messages_raise(build: object) -> None:
    with pytest.raises(ProtocolError):
        build()


def test_mode_error_names_valid_options() -> None:
    with pytest.raises(ProtocolError, match="PASSIVE=0.*ESTOP=3"):
        ModeRequest(9)


def test_encode_limits() -> None:
    assert issubclass(ProtocolError, LinkError)
    with pytest.raises(ProtocolError, match="MAX_PAYLOAD"):
        encode_frame(_state(num_joints=80), 0)  # 67 + 12 * 80 = 1027 > 1024
    biggest = Command(0, *(np.zeros(84),) * 3)  # 5 + 12 * 84 = 1013 bytes
    assert len(encode_frame(biggest, 0)) - 1 <= MAX_ENCODED_SIZE
    assert len(cobs.encode(b"\x01" * (6 + MAX_PAYLOAD + 4))) == MAX_ENCODED_SIZE  # worst case: no zeros
    with pytest.raises(ProtocolError, match="u16"):
        encode_frame(EStop(), 65536)


@pytest.mark.parametrize(
    ("frame", "kind", "match"),
    [
        (b"\x05\x01\x02", "cobs", "COBS"),
        (b"\x01\x00\x02", "cobs", "COBS"),
        (cobs.encode(b"\x01\x11\x00\x00\x00"), "short", "short frame"),
        (encode_frame(EStop(1), 0)[:-1][:-2] + b"\x01\x01", "crc", "CRC mismatch"),
        (_raw_frame(0x30, b"\x01", version=2), "version", "protocol version 2"),
        (_raw_frame(0x30, b"\x01", length=2), "length", "length mismatch"),
        (_raw_frame(0x7F, b""), "type", "unknown message type 0x7f"),
        (_raw_frame(0x12, b"\x09"), "payload", "mode=9"),
        (_raw_frame(0x30, b""), "payload", "0 bytes, expected 1"),
        (_raw_frame(0x10, _state().pack()[:-1]), "payload", "too short"),
        (_raw_frame(0x10, _state().pack() + b"\x00"), "payload", "trailing"),
        (_raw_frame(0x01, b"\x01\x02\xff\xfe"), "payload", "UTF-8"),
        (b"\x01" * (MAX_ENCODED_SIZE + 1), "oversize", "at most"),
    ],
)
def test_decode_frame_errors(frame: bytes, kind: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as caught:
        decode_frame(frame)
    assert caught.value.kind == kind


def _stream(*messages: object, start_seq: int = 0) -> list[bytes]:
    encoder = FrameEncoder(start_seq)
    return [encoder.encode(message) for message in messages]


def test_decoder_stream_and_empty_frames() -> None:
    frames = _stream(Hello(1, "h"), _state(), Heartbeat(1, 2.0))
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00" + frames[0] + b"\x00\x00" + b"".join(frames[1:])) == [
        (0, Hello(1, "h")),
        (1, _state()),
        (2, Heartbeat(1, 2.0)),
    ]
    byte_by_byte = FrameDecoder()
    assert [item for byte in b"".join(frames) for item in byte_by_byte.feed(bytes([byte]))] == decoder.feed(
        b"".join(frames)
    )
    assert decoder.stats.corrupt == 0 and decoder.stats.frames_ok == 6 and decoder.stats.seq_resets == 1
    assert byte_by_byte.stats.seq_gaps == 0 and byte_by_byte.pending_bytes == 0


def test_every_corrupted_byte_is_counted_never_decoded() -> None:
    good, bad, after = _stream(EStop(1), _state(), Reset(0))
    for position in range(len(bad) - 1):  # not the delimiter
        for mask in (0x01, 0x80, 0xFF):
            corrupted = bytearray(bad)
            corrupted[position] ^= mask
            decoder = FrameDecoder()
            decoded = decoder.feed(good + bytes(corrupted) + after)
            assert decoded == [(0, EStop(1)), (2, Reset(0))], (position, mask)
            assert decoder.stats.corrupt >= 1 and decoder.stats.seq_gaps == 1


def test_truncated_frames_are_dropped() -> None:
    whole, after = _stream(_state(), Fault(1, "f"))
    for cut in range(1, len(whole) - 1):
        decoder = FrameDecoder()
        assert decoder.feed(whole[:cut] + b"\x00" + after) == [(1, Fault(1, "f"))]
        assert decoder.stats.corrupt == 1


def test_garbage_never_raises_and_stays_bounded() -> None:
    rng = np.random.default_rng(0)
    decoder = FrameDecoder()
    garbage = rng.integers(0, 256, size=200_000, dtype=np.uint8).tobytes()
    position = 0
    while position < len(garbage):
        size = int(rng.integers(1, 3000))
        decoder.feed(garbage[position : position + size])
        assert decoder.pending_bytes <= MAX_ENCODED_SIZE
        position += size
    assert decoder.stats.frames_ok == 0 and decoder.stats.corrupt > 100
    assert decoder.feed(b"\x00" + encode_frame(EStop(3), 9)) == [(9, EStop(3))]


def test_oversize_is_discarded_to_next_delimiter() -> None:
    decoder = FrameDecoder()
    for _ in range(10):
        assert decoder.feed(b"\x01" * 1000) == []
        assert decoder.pending_bytes <= MAX_ENCODED_SIZE
    assert decoder.feed(b"\x00" + encode_frame(EStop(3), 0)) == [(0, EStop(3))]
    assert decoder.stats.oversize == 1 and decoder.stats.corrupt == 1
    assert decoder.stats.skipped_bytes == 10_000


def test_seq_gaps_wrap_duplicates_and_resets() -> None:
    def stats_for(seqs: list[int]) -> tuple[int, int, int]:
        decoder = FrameDecoder()
        for seq in seqs:
            decoder.feed(encode_frame(EStop(), seq))
        return decoder.stats.seq_gaps, decoder.stats.duplicates, decoder.stats.seq_resets

    assert stats_for([65533, 65534, 65535, 0, 1]) == (0, 0, 0)  # wraps cleanly
    assert stats_for([65534, 1]) == (2, 0, 0)  # 65535 and 0 missing
    assert stats_for([10, 10, 13]) == (2, 1, 0)  # 11, 12 missing; 10 repeated
    assert stats_for([500, 3, 4]) == (0, 0, 1)  # peer restarted its counter
    encoder = FrameEncoder(start_seq=65535)
    assert [decode_frame(encoder.encode(EStop())[:-1])[0] for _ in range(2)] == [65535, 0]


def test_resync_skips_a_partial_first_frame() -> None:
    frame, after = _stream(_state(), EStop(2))
    decoder = FrameDecoder(resync=True)
    assert decoder.feed(frame[7:] + after) == [(1, EStop(2))]
    assert decoder.stats.corrupt == 0 and decoder.stats.skipped_bytes == len(frame) - 7 - 1
    assert decoder.feed(frame[7:]) == [] and decoder.stats.corrupt == 1  # only the first frame is forgiven
    decoder.reset()
    assert decoder.feed(b"\x01" * 2000 + b"\x00" + after) == [(1, EStop(2))]
    assert decoder.stats.oversize == 0 and decoder.stats.corrupt == 1

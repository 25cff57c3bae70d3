"""The C reference firmware (deploy/firmware/) against the Python codec, through its host_test harness.

The C is compiled once per module with the system compiler and driven over stdin/stdout: frames and
messages go through in batches, so 10,000 random messages each way cost one process start each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from cobs import cobs

from deploy.errors import ProtocolError
from deploy.messages import (
    Capabilities,
    Capability,
    Command,
    EStop,
    Fault,
    FaultCode,
    Heartbeat,
    Hello,
    Message,
    Mode,
    ModeRequest,
    Reset,
    State,
    StateFlag,
)
from deploy.protocol import MAX_ENCODED_SIZE, MAX_PAYLOAD, FrameDecoder, decode_frame, encode_frame

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "deploy" / "firmware"
SOURCES = ["host_test.c", "metactl_protocol.c", "metactl_robot.c"]
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2"]
MAX_JOINTS = 32  # METACTL_MAX_JOINTS in metactl_protocol.h

# Float32 bit patterns worth hitting on purpose: zeros, infinities, quiet and signalling NaNs, subnormals.
SPECIAL_F32 = np.array(
    [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x00000001, 0x3F800000, 0x7F7FFFFF],
    dtype=np.uint32,
)
TEXT_POOL = ["a", "Z", "0", " ", "_", "\x00", "\x7f", "é", "ß", "€", "漢", "\uffff", "😀", "\U0010ffff"]


# -- building and running the harness ------------------------------------------------------------


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Harness:
    """The compiled host_test binary; each call is one process fed all its lines at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, mode: str, lines: list[str], *options: str) -> list[str]:
        result = subprocess.run(
            [str(self.path), mode, *options],
            input="".join(line + "\n" for line in lines),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"host_test {mode} failed ({result.returncode}): {result.stderr}"
        return result.stdout.splitlines()

    def decode(self, frames: list[bytes]) -> list[dict]:
        """Frames without their delimiter -> the harness's JSON, one dict each."""
        return [json.loads(line) for line in self.run("decode", [frame.hex() for frame in frames])]

    def encode(self, items: list[tuple[int, Message]]) -> list[str]:
        """(seq, message) -> the wire frame hex C produced (or 'error ...')."""
        return self.run("encode", [message_line(seq, message) for seq, message in items])


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang, or $CC) on PATH: the firmware reference cannot be built")
    out = tmp_path_factory.mktemp("firmware") / "host_test"
    result = subprocess.run(
        [compiler, *CFLAGS, "-o", str(out), *(str(FIRMWARE / name) for name in SOURCES)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(CFLAGS)} build failed:\n{result.stderr}"
    return Harness(out)


# -- Python messages <-> the harness's text --------------------------------------------------------


def _f64_hex(value: float) -> str:
    return f"{struct.unpack('<Q', struct.pack('<d', value))[0]:016x}"


def fields(seq: int, message: Message) -> dict:
    """What `host_test decode` prints for this message: floats as IEEE bits, strings as UTF-8 hex."""
    out: dict = {"seq": seq, "type": message.TYPE.name}
    for item in dataclasses.fields(message):
        value = getattr(message, item.name)
        if isinstance(value, np.ndarray):
            out[item.name] = [f"{bits:08x}" for bits in value.astype("<f4").view("<u4")]
        elif isinstance(value, float):
            out[item.name] = _f64_hex(value)
        elif isinstance(value, str):
            out[item.name] = value.encode("utf-8").hex()
        elif isinstance(value, tuple):
            out[item.name] = [name.encode("utf-8").hex() for name in value]
        else:
            out[item.name] = int(value)
    return out


def message_line(seq: int, message: Message) -> str:
    """The `host_test encode` line for this message: its fields in wire order, counts where the wire has them."""
    values = fields(seq, message)
    words = [str(seq), values["type"]]
    for item in dataclasses.fields(message):
        value = values[item.name]
        if item.name in ("joint_pos", "targets", "joint_names"):
            words.append(str(len(value)))
        if isinstance(value, list):
            words += [word or "-" for word in value]
        elif isinstance(value, str):
            words.append(value or "-")
        else:
            words.append(str(value))
    return " ".join(words)


# -- random messages ------------------------------------------------------------------------------


def _floats(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 (size,): ordinary values, arbitrary bit patterns (any NaN payload) and special values."""
    ordinary = rng.normal(0.0, 10.0, size).astype(np.float32).view(np.uint32)
    anything = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    special = rng.choice(SPECIAL_F32, size)
    pick = rng.integers(0, 3, size)
    return np.choose(pick, [ordinary, anything, special]).astype(np.uint32).view(np.float32)


def _double(rng: np.random.Generator) -> float:
    if rng.random() < 0.5:
        return float(rng.normal(0.0, 1e3))
    return struct.unpack("<d", struct.pack("<Q", int(rng.integers(0, 2**64, dtype=np.uint64))))[0]


def _text(rng: np.random.Generator, max_chars: int) -> str:
    # Index a Python list: numpy string arrays would strip a trailing NUL.
    text = "".join(TEXT_POOL[i] for i in rng.integers(0, len(TEXT_POOL), int(rng.integers(0, max_chars + 1))))
    while len(text.encode("utf-8")) > 255:
        text = text[:-1]
    return text


def random_message(rng: np.random.Generator) -> Message:
    """One message of a random type, with at most MAX_JOINTS joints and a payload that fits MAX_PAYLOAD."""
    kind = int(rng.integers(0, 9))
    n = int(rng.integers(0, MAX_JOINTS + 1))
    u8, u16, u32 = (int(rng.integers(0, 2**bits)) for bits in (8, 16, 32))
    if kind == 0:
        return Hello(u8, _text(rng, 80))
    if kind == 1:
        names = [_text(rng, 12) for _ in range(n)]
        while True:
            message = Capabilities(u8, _text(rng, 40), u16, int(rng.integers(0, 2**16)), tuple(names))
            if len(message.pack()) <= MAX_PAYLOAD:
                return message
            names.pop()
    if kind == 2:
        arrays = [_floats(rng, size) for size in (n, n, n, 4, 3, 3, 3)]
        return State(u32, _double(rng), Mode(int(rng.integers(0, 4))), u8, *arrays)
    if kind == 3:
        return Command(u32, _floats(rng, n), _floats(rng, n), _floats(rng, n))
    if kind == 4:
        return ModeRequest(Mode(int(rng.integers(0, 4))))
    if kind == 5:
        return Reset(u8)
    if kind == 6:
        return Heartbeat(u32, _double(rng))
    if kind == 7:
        return EStop(u8)
    return Fault(u16, _text(rng, 80))


def random_items(seed: int, count: int) -> list[tuple[int, Message]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, 2**16)), random_message(rng)) for _ in range(count)]


def python_kind(frame: bytes) -> str | None:
    """ProtocolError.kind of Python's decode_frame, None when it decodes."""
    try:
        decode_frame(frame)
    except ProtocolError as error:
        return error.kind
    return None


def doc_vectors() -> list[tuple[int, str, str]]:
    """(seq, message text, frame hex) from the test-vector table of docs/protocol.md."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    return [
        (int(seq), text, frame)
        for seq, text, frame in re.findall(r"^\| (\d+) \| `(.+)` \| `([0-9a-f]+)` \|$", doc, flags=re.MULTILINE)
    ]


# -- codec ---------------------------------------------------------------------------------------


def test_core_files_need_no_os() -> None:
    allowed = {"<stdbool.h>", "<stddef.h>", "<stdint.h>", "<string.h>", "<float.h>"}
    allowed |= {'"metactl_protocol.h"', '"metactl_robot.h"'}
    for name in ("metactl_protocol.h", "metactl_protocol.c", "metactl_robot.h", "metactl_robot.c"):
        text = (FIRMWARE / name).read_text()
        includes = set(re.findall(r"^#include\s+(\S+)", text, flags=re.MULTILINE))
        assert includes <= allowed, f"{name} includes {sorted(includes - allowed)}"
        assert not re.search(r"\b(malloc|calloc|realloc|free|printf)\s*\(", text), name


def test_crc_check_value(harness: Harness) -> None:
    # The CRC-32 check value, and the worked EStop example of docs/protocol.md.
    lines = harness.run("crc", [b"123456789".hex(), "01300700010001", ""])
    assert lines == ["cbf43926", "fb8455d6", "00000000"]


def test_doc_vectors_decode_and_encode_in_c(harness: Harness) -> None:
    vectors = doc_vectors()
    assert [seq for seq, _, _ in vectors] == list(range(9))  # one vector per message type
    frames = [bytes.fromhex(frame_hex) for _, _, frame_hex in vectors]
    expected = [fields(*decode_frame(frame[:-1])) for frame in frames]
    assert harness.decode([frame[:-1] for frame in frames]) == expected
    assert {item["type"] for item in expected} == {
        "HELLO",
        "CAPABILITIES",
        "STATE",
        "COMMAND",
        "MODE",
        "RESET",
        "HEARTBEAT",
        "ESTOP",
        "FAULT",
    }
    assert harness.encode([decode_frame(frame[:-1]) for frame in frames]) == [frame.hex() for frame in frames]
    # By hand from the doc's Command vector: targets 0.5 and -1.0 are f32 0x3f000000 and 0xbf800000.
    command = harness.decode([frames[3][:-1]])[0]
    assert command == {
        "seq": 3,
        "type": "COMMAND",
        "tick": 42,
        "targets": ["3f000000", "bf800000"],
        "kp": ["41a00000", "41a00000"],
        "kd": ["3f000000", "3f000000"],
    }


def test_random_messages_python_to_c(harness: Harness) -> None:
    items = random_items(seed=1, count=10_000)
    decoded = harness.decode([encode_frame(message, seq)[:-1] for seq, message in items])
    wrong = [(got, fields(*item)) for got, item in zip(decoded, items) if got != fields(*item)]
    assert len(decoded) == len(items)
    assert not wrong, f"{len(wrong)} of {len(items)} differ; first: C {wrong[0][0]} Python {wrong[0][1]}"


def test_random_messages_c_to_python(harness: Harness) -> None:
    items = random_items(seed=2, count=10_000)
    frames = harness.encode(items)
    assert len(frames) == len(items)
    wrong = []
    for frame_hex, (seq, message) in zip(frames, items):
        frame = bytes.fromhex(frame_hex) if not frame_hex.startswith("error") else b""
        # Compared as bits (fields), not with ==: a State whose time is NaN never equals itself.
        if frame != encode_frame(message, seq) or fields(*decode_frame(frame[:-1])) != fields(seq, message):
            wrong.append((frame_hex, message_line(seq, message)))
    assert not wrong, f"{len(wrong)} of {len(items)} differ; first: C {wrong[0][0]} for {wrong[0][1]}"


def _crafted(version: int, type_code: int, payload: bytes, length: int | None = None, seq: int = 5) -> bytes:
    """A frame with a valid CRC around whatever header and payload, to reach the checks after the CRC."""
    body = struct.pack("<BBHH", version, type_code, seq, len(payload) if length is None else length) + payload
    return cobs.encode(body + struct.pack("<I", zlib.crc32(body)))


CRAFTED = {
    "empty": b"",
    "oversize": b"\x01" * (MAX_ENCODED_SIZE + 1),
    "zero inside": b"\x03\x01\x00\x01",
    "cobs overrun": b"\x05\x01\x02",
    "short": cobs.encode(b"\x01\x30\x07\x00\x01"),
    "version 2": _crafted(2, 0x30, b"\x01"),
    "length says 3": _crafted(1, 0x30, b"\x01", length=3),
    "type 0x7f": _crafted(1, 0x7F, b""),
    # Two faults at once: the first check in decode order names it.
    "version 2 and length": _crafted(2, 0x30, b"\x01", length=3),
    "length and type": _crafted(1, 0x7F, b"\x01", length=0),
    "type and payload": _crafted(1, 0x7F, b"\x09"),
    "mode 4": _crafted(1, 0x12, b"\x04"),
    "estop 2 bytes": _crafted(1, 0x30, b"\x01\x02"),
    "heartbeat short": _crafted(1, 0x20, b"\x00" * 11),
    "command cut": _crafted(1, 0x11, Command(1, [1.0], [2.0], [3.0]).pack()[:-1]),
    "command trailing": _crafted(1, 0x11, Command(1, [1.0], [2.0], [3.0]).pack() + b"\x00"),
    "state mode 9": _crafted(1, 0x10, b"\x00" * 12 + b"\x09\x00\x00" + b"\x00" * 52),
    "hello overlong": _crafted(1, 0x01, b"\x01\x02\xc0\x80"),
    "hello surrogate": _crafted(1, 0x01, b"\x01\x03\xed\xa0\x80"),
    "hello above U+10FFFF": _crafted(1, 0x01, b"\x01\x04\xf4\x90\x80\x80"),
    "hello cut UTF-8": _crafted(1, 0x01, b"\x01\x02\xe2\x82"),
    "fault string overrun": _crafted(1, 0x31, b"\x03\x00\x09abc"),
    "capabilities name overrun": _crafted(1, 0x02, b"\x01\x00\xf4\x01\x00\x00\x02\x01a"),
}


def test_corrupt_frames_are_rejected_like_python(harness: Harness) -> None:
    frames = list(CRAFTED.values())
    for _, _, frame_hex in doc_vectors():
        frame = bytes.fromhex(frame_hex)[:-1]
        for bit in range(8 * len(frame)):  # every single-bit flip
            flipped = bytearray(frame)
            flipped[bit // 8] ^= 1 << (bit % 8)
            frames.append(bytes(flipped))
        frames += [frame[:cut] for cut in range(len(frame))]  # every truncation
    expected = [python_kind(frame) for frame in frames]
    assert None not in expected
    got = [item.get("error") for item in harness.decode(frames)]
    mismatched = [(frame.hex(), want, have) for frame, want, have in zip(frames, expected, got) if want != have]
    assert not mismatched, f"{len(mismatched)} differ; first (frame, python, C): {mismatched[0]}"
    named = dict(zip(CRAFTED, got))
    assert named["oversize"] == "oversize" and named["zero inside"] == "cobs" and named["short"] == "short"
    assert named["version 2"] == "version" and named["length says 3"] == "length" and named["type 0x7f"] == "type"
    assert named["hello surrogate"] == named["state mode 9"] == "payload"
    assert named["version 2 and length"] == "version" and named["length and type"] == "length"
    assert named["type and payload"] == "type"


def test_mutated_random_frames_agree(harness: Harness) -> None:
    rng = np.random.default_rng(3)
    frames = []
    for seq, message in random_items(seed=4, count=3000):
        frame = bytearray(encode_frame(message, seq)[:-1])
        position = int(rng.integers(0, len(frame)))
        action = int(rng.integers(0, 3))
        if action == 0:
            frame[position] ^= 1 << int(rng.integers(0, 8))
        elif action == 1:
            del frame[position]
        else:
            frame.insert(position, frame[position])
        frames.append(bytes(frame))
    results = harness.decode(frames)
    for frame, got in zip(frames, results):
        kind = python_kind(frame)
        assert got.get("error") == kind, frame.hex()
        if kind is None:  # a benign mutation (e.g. a doubled byte COBS absorbed): same message both sides
            assert got == fields(*decode_frame(frame))


def test_more_joints_than_the_build_holds_is_a_payload_error(harness: Harness) -> None:
    # The protocol allows 79 joints in a State; this build holds MAX_JOINTS and refuses more, by name.
    too_many = np.zeros(MAX_JOINTS + 1, dtype=np.float32)
    frames = [
        encode_frame(Command(1, too_many, too_many, too_many), 0)[:-1],
        encode_frame(State(1, 0.0, Mode.DAMPING, 0, too_many, too_many, too_many, [0, 0, 0, 1], [0] * 3, [0] * 3), 0)[
            :-1
        ],
    ]
    assert [item["error"] for item in harness.decode(frames)] == ["payload", "payload"]


def _stream_stats(decoder: FrameDecoder) -> dict:
    return dataclasses.asdict(decoder.stats)


@pytest.mark.parametrize("resync", [False, True])
def test_stream_decoder_matches_python(harness: Harness, resync: bool) -> None:
    rng = np.random.default_rng(5)
    pieces = [b"\x07\x01\x02"]  # starts mid-frame
    for seq, message in random_items(seed=6, count=600):
        frame = encode_frame(message, seq)
        choice = int(rng.integers(0, 8))
        if choice == 0:
            frame = frame[: int(rng.integers(1, len(frame)))]  # truncated: merges into the next frame
        elif choice == 1:
            flipped = bytearray(frame)
            flipped[int(rng.integers(0, len(frame) - 1))] ^= 0x10
            frame = bytes(flipped)
        elif choice == 2:
            frame = bytes(rng.integers(0, 256, int(rng.integers(1, 60)), dtype=np.uint8)) + b"\x00"
        elif choice == 3:
            frame = b"\x01" * int(rng.integers(MAX_ENCODED_SIZE - 2, MAX_ENCODED_SIZE + 400)) + b"\x00\x00"
        pieces.append(frame)
    stream = b"".join(pieces)
    cuts = np.sort(rng.integers(0, len(stream), 400))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if b > a]

    python = FrameDecoder(resync=resync)
    expected = [fields(seq, message) for chunk in chunks for seq, message in python.feed(chunk)]
    lines = harness.run("stream", [chunk.hex() for chunk in chunks], *(["--resync"] if resync else []))
    summary = json.loads(lines[-1])
    assert [json.loads(line) for line in lines[:-1]] == expected
    assert summary["stats"] == _stream_stats(python)
    assert summary["pending_bytes"] == python.pending_bytes
    assert summary["peak_pending_bytes"] <= MAX_ENCODED_SIZE
    assert summary["stats"]["oversize"] > 0
    assert summary["stats"]["crc_errors"] > 0 and summary["stats"]["frames_ok"] > 100


# -- robot state machine -------------------------------------------------------------------------

# Two joints; hand-checked numbers below use these limits. Flags 1 = RESET_SUPPORTED.
ROBOT_CONFIG = [
    "config 2 1 50 2 100 5 500 a1",
    "joint 0 hip -0.8 0.8 33.5",
    "joint 1 knee -2.5 -0.5 10",
]
COMMAND = Command(0, [0.5, -1.0], [20.0, 20.0], [0.5, 0.5])


class RobotSession:
    """Builds a robot script; `run` returns one (mode, messages sent, reply dict) per script line."""

    def __init__(self, config: list[str] | None = None, start_ms: int = 1000) -> None:
        self.lines = [*(config or ROBOT_CONFIG), f"init {start_ms}"]
        self.host_seq = 0

    def rx(self, now_ms: int, *messages: Message) -> RobotSession:
        data = b""
        for message in messages:
            data += encode_frame(message, self.host_seq)
            self.host_seq += 1
        return self.raw(now_ms, data)

    def raw(self, now_ms: int, data: bytes) -> RobotSession:
        self.lines.append(f"rx {now_ms} {data.hex()}")
        return self

    def add(self, line: str) -> RobotSession:
        self.lines.append(line)
        return self

    def run(self, harness: Harness) -> list[tuple[int | None, list[Message], dict]]:
        decoder = FrameDecoder()
        out = []
        for line in harness.run("robot", self.lines):
            reply = json.loads(line)
            assert "error" not in reply, reply
            out.append((reply["mode"], [message for _, message in decoder.feed(bytes.fromhex(reply["tx"]))], reply))
        # The robot's own frames: seq 0, 1, 2, ... with nothing lost or corrupt.
        assert decoder.stats.corrupt == 0 and decoder.stats.seq_gaps == 0 and decoder.stats.seq_resets == 0
        assert len(out) == len(self.lines)
        return out


def _faults(messages: list[Message]) -> list[int]:
    return [message.code for message in messages if isinstance(message, Fault)]


def test_robot_powers_up_damping_and_answers_hello(harness: Harness) -> None:
    session = RobotSession().rx(1001, Hello(1, "host")).add("state").add("state")
    replies = session.run(harness)
    init, hello, first, second = replies[-4:]
    assert init[2]["status"] == "ok" and init[0] == Mode.DAMPING
    assert hello[1] == [Capabilities(1, "a1", 500, Capability.RESET_SUPPORTED, ("hip", "knee"))]
    (state,) = first[1]
    assert state.tick == 0 and state.mode == Mode.DAMPING and state.flags == StateFlag.EPISODE_START
    assert np.all(np.isnan(state.base_vel))  # no BASE_VELOCITY capability: NaN, as the spec says
    assert second[1][0].tick == 1 and second[1][0].flags == 0


def test_watchdog_drops_to_damping_after_50_ms(harness: Harness) -> None:
    q_qd = "torques 0.25 -1.5 1 -2"
    session = (
        RobotSession()
        .rx(1000, ModeRequest(Mode.POSITION))
        .rx(1010, COMMAND)
        .add(q_qd)
        .add("tick 1059")
        .add("tick 1060")  # exactly 50 ms: still in POSITION
        .rx(1060, Heartbeat(7, 0.25))  # heartbeats do not feed the watchdog
        .add("tick 1061")
        .add(q_qd)
        .rx(1070, COMMAND)  # too late: the host must request POSITION again
        .rx(1080, ModeRequest(Mode.POSITION))
        .add(q_qd)  # POSITION before its first Command damps
        .rx(1090, COMMAND)
        .add("tick 1140")
        .add("tick 1141")
        .add("stats")
    )
    replies = session.run(harness)[4:]
    modes = [mode for mode, _, _ in replies]
    assert modes == [2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 1, 1]
    # tau = kp (target - q) - kd qd: hip 20 (0.5 - 0.25) - 0.5 * 1 = 4.5; knee 20 (-1 + 1.5) + 0.5 * 2 = 11,
    # clamped to the knee's 10 N m (Fault LIMIT_CLAMPED).
    assert replies[2][2]["tau"] == [4.5, 10.0] and _faults(replies[2][1]) == [FaultCode.LIMIT_CLAMPED]
    assert replies[5][1] == [Heartbeat(7, 0.25)]
    assert _faults(replies[6][1]) == [FaultCode.WATCHDOG]
    assert replies[7][2]["tau"] == [-2.0, 4.0]  # damping: -2 qd
    assert _faults(replies[8][1]) == [FaultCode.BAD_REQUEST]
    assert replies[10][2]["tau"] == [-2.0, 4.0]
    assert _faults(replies[13][1]) == [FaultCode.WATCHDOG]
    stats = replies[14][2]["robot"]
    assert stats["watchdog_trips"] == 2 and stats["commands_applied"] == 2 and stats["commands_ignored"] == 1


def test_watchdog_across_the_millisecond_wrap_and_not_in_lockstep(harness: Harness) -> None:
    start = 2**32 - 6
    session = (
        RobotSession(start_ms=start)
        .rx(start, ModeRequest(Mode.POSITION))
        .rx(2**32 - 1, COMMAND)
        .add("tick 44")  # 45 ms after the Command, across the wrap
        .add("tick 50")  # 51 ms
    )
    assert [mode for mode, _, _ in session.run(harness)[-2:]] == [2, 1]
    lockstep = ["config 2 3 50 2 100 5 500 a1", *ROBOT_CONFIG[1:]]  # flags 3 = RESET_SUPPORTED | LOCKSTEP
    session = RobotSession(lockstep).rx(1000, ModeRequest(Mode.POSITION), COMMAND).add("tick 100000")
    assert session.run(harness)[-1][0] == Mode.POSITION


def test_estop_latches_until_reset(harness: Harness) -> None:
    session = (
        RobotSession()
        .rx(1000, ModeRequest(Mode.POSITION), COMMAND)
        .rx(1010, EStop(1))
        .add("torques 0.25 -1.5 1 -2")
        .rx(1020, ModeRequest(Mode.POSITION))
        .rx(1030, COMMAND)
        .rx(1040, ModeRequest(Mode.DAMPING))
        .add("tick 900000")
        .add("state")
        .rx(900001, Reset(Reset.REQUEST))
        .add("state")
        .rx(900002, ModeRequest(Mode.POSITION))
    )
    replies = session.run(harness)[4:]
    assert [mode for mode, _, _ in replies] == [2, 3, 3, 3, 3, 3, 3, 3, 1, 1, 2]
    assert replies[2][2]["tau"] == [-2.0, 4.0]  # ESTOP damps
    assert [_faults(replies[i][1]) for i in (3, 4, 5)] == [[FaultCode.ESTOP_LATCHED]] * 3
    assert replies[7][1][0].mode == Mode.ESTOP
    assert replies[8][1] == [Reset(Reset.DONE)]
    assert replies[9][1][0].flags & StateFlag.EPISODE_START  # RESET_SUPPORTED restarts the episode


def test_estop_input_refuses_reset_while_asserted(harness: Harness) -> None:
    session = (
        RobotSession()
        .add("estop 1 7")
        .rx(1010, Reset())
        .add("estop 0 7")
        .rx(1020, ModeRequest(Mode.POSITION))
        .rx(1030, Reset())
    )
    replies = session.run(harness)[4:]
    assert [mode for mode, _, _ in replies] == [3, 3, 3, 3, 1]
    assert replies[0][1] == [EStop(7)]
    assert replies[1][1] == [Reset(Reset.REFUSED)]
    assert _faults(replies[3][1]) == [FaultCode.ESTOP_LATCHED]  # released, but still latched
    assert replies[4][1] == [Reset(Reset.DONE)]


def test_commands_are_clamped_and_bad_ones_ignored(harness: Harness) -> None:
    wild = Command(0, [2.0, -3.0], [500.0, 20.0], [-1.0, 0.5])
    session = (
        RobotSession()
        .rx(1000, ModeRequest(Mode.POSITION), wild)
        .add("torques 0 -1 0 0")
        .rx(1010, wild)  # still clamped: no second Fault
        .rx(1020, COMMAND)
        .rx(1030, wild)  # clamping starts again
        .rx(1040, Command(0, [0.0, 0.0, 0.0], [1.0] * 3, [1.0] * 3))  # three joints on a two-joint robot
        .rx(1050, Command(0, [np.nan, 0.0], [1.0, 1.0], [1.0, 1.0]))
        .rx(1060, Command(0, [0.0, 0.0], [np.inf, 1.0], [1.0, 1.0]))
        .add("torques 0 -1 0 0")
    )
    replies = session.run(harness)[4:]
    assert _faults(replies[0][1]) == [FaultCode.LIMIT_CLAMPED]
    # kp 500 -> 100, target 2 -> 0.8: 100 * 0.8 = 80 -> 33.5; knee target -3 -> -2.5: 20 * (-2.5 + 1) = -30 -> -10.
    assert replies[1][2]["tau"] == [33.5, -10.0] and _faults(replies[1][1]) == [FaultCode.LIMIT_CLAMPED]
    assert _faults(replies[2][1]) == [] and _faults(replies[3][1]) == []
    assert _faults(replies[4][1]) == [FaultCode.LIMIT_CLAMPED]
    assert [_faults(replies[i][1]) for i in (5, 6, 7)] == [[FaultCode.BAD_COMMAND]] * 3
    assert replies[8][2]["tau"] == [33.5, -10.0]  # the last good Command still holds
    assert {mode for mode, _, _ in replies} == {Mode.POSITION}


def test_robot_ignores_corrupt_bytes_and_echoes_heartbeats_exactly(harness: Harness) -> None:
    signalling_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000001))[0]
    good = encode_frame(ModeRequest(Mode.POSITION), 0)
    corrupt = bytearray(good)
    corrupt[-3] ^= 0x01  # a CRC byte
    assert python_kind(bytes(corrupt[:-1])) == "crc"
    heartbeat = Heartbeat(0xDEADBEEF, signalling_nan)
    session = (
        RobotSession()
        .raw(1000, b"\x05\x11\x22" + b"\x00")  # the tail of a frame sent before the robot booted
        .raw(1001, bytes(corrupt))
        .rx(1002, heartbeat)
        .add("stats")
    )
    replies = session.run(harness)[4:]
    assert [mode for mode, _, _ in replies] == [1, 1, 1, 1]
    (echo,) = replies[2][1]
    assert echo.pack() == heartbeat.pack()  # bit for bit, signalling NaN included
    decoder = replies[3][2]["decoder"]
    assert decoder["crc_errors"] == 1 and decoder["skipped_bytes"] == 3 and decoder["frames_ok"] == 1


def test_robot_refuses_an_invalid_config(harness: Harness) -> None:
    bad_limits = [*ROBOT_CONFIG[:2], "joint 1 knee -0.5 -2.5 10"]  # lower > upper
    no_torque = [*ROBOT_CONFIG[:2], "joint 1 knee -2.5 -0.5 0"]
    for config in (bad_limits, no_torque):
        reply = json.loads(harness.run("robot", [*config, "init 0"])[-1])
        assert reply["status"] == "invalid"

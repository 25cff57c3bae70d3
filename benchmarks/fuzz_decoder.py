"""Fuzz `deploy.protocol.FrameDecoder` with random and mutated byte streams.

    python benchmarks/fuzz_decoder.py [--frames N] [--seed S] [--quick] [--json]

Each fed frame ("unit") is a valid frame of a random message (every type, 0..79 joints, NaN and
infinity included) that is then, by category:

    clean      left as it is
    bit_flip   1 to 3 bits flipped anywhere, the 0x00 delimiter included
    truncate   cut short, with or without its delimiter (without: it runs into the next frame)
    duplicate  one byte doubled
    drop       one byte removed (the delimiter too: the frame runs into the next)
    garbage    1 to 64 random bytes and a delimiter
    oversize   a run of 1040 to 3117 non-zero bytes (longer than MAX_ENCODED_SIZE), then a delimiter
    crafted    a valid CRC around a wrong header or payload (version, length, unknown type, another
               type's payload, cut or padded payload, random payload): reaches the checks after the CRC

Each unit goes to one decoder in 1 to 3 chunks split at random. Counted: `exceptions` (escaped the
decoder; caught here), `accepted_corrupt` (a message came out that is neither the unit's own original
nor that of an earlier unit whose bytes were still pending because its delimiter was lost; seq and
payload compared as bytes, since a NaN field never compares equal), `peak_buffer_bytes` (the most
`decoder.pending_bytes` seen after any chunk; bounded by MAX_ENCODED_SIZE) and `frames_per_s`
(units per second of time inside `feed`). Crafted frames carry a valid CRC on purpose, so what they
decode to is not counted as accepted corruption; their job is to find exceptions.

Prints a Markdown table, then the JSON object as the last line (`--json`: the JSON line alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from cobs import cobs

from deploy.messages import (
    Capabilities,
    Command,
    EStop,
    Fault,
    Heartbeat,
    Hello,
    Message,
    MessageType,
    Mode,
    ModeRequest,
    Reset,
    State,
)
from deploy.protocol import CRC, HEADER, MAX_ENCODED_SIZE, MAX_PAYLOAD, PROTOCOL_VERSION, FrameDecoder, encode_frame

DEFAULT_FRAMES = 1_000_000
QUICK_FRAMES = 20_000
POOL_SIZE = 4096
CATEGORIES = ("clean", "bit_flip", "truncate", "duplicate", "drop", "garbage", "oversize", "crafted")
WEIGHTS = (0.15, 0.25, 0.10, 0.10, 0.10, 0.10, 0.02, 0.18)
MAX_STATE_JOINTS = (MAX_PAYLOAD - 67) // 12  # 79: State is 67 + 12 n bytes
KNOWN_TYPES = tuple(int(t) for t in MessageType)
UNKNOWN_TYPES = tuple(code for code in range(256) if code not in KNOWN_TYPES)
TEXT_POOL = ("a", "Z", "0", " ", "\x00", "é", "€", "漢", "😀", "\U0010ffff")
NO_ZERO = bytes.maketrans(b"\x00", b"\x01")  # oversize runs must not contain the delimiter


class PoolEntry(NamedTuple):
    """A valid frame and what it encodes."""

    seq: int
    type_code: int
    payload: bytes
    frame: bytes  # wire bytes, delimiter included


# -- random messages ------------------------------------------------------------------------------


def _floats(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size,) float32: half ordinary values, half arbitrary bit patterns (NaN payloads, inf, subnormals)."""
    bits = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.where(rng.random(size) < 0.5, rng.normal(0.0, 5.0, size).astype(np.float32), bits)


def _text(rng: np.random.Generator, max_chars: int) -> str:
    text = "".join(TEXT_POOL[i] for i in rng.integers(0, len(TEXT_POOL), int(rng.integers(0, max_chars + 1))))
    return text.encode("utf-8")[:255].decode("utf-8", errors="ignore")


def random_message(rng: np.random.Generator) -> Message:
    """A message of a random type; joint counts up to what a payload holds."""
    kind = int(rng.integers(0, 9))
    u8, u16, u32 = (int(rng.integers(0, 2**bits)) for bits in (8, 16, 32))
    if kind == 0:
        return Hello(u8, _text(rng, 40))
    if kind == 1:
        names = tuple(_text(rng, 8) for _ in range(int(rng.integers(0, 25))))
        return Capabilities(u8, _text(rng, 16), u16, int(rng.integers(0, 2**16)), names)
    if kind == 2:
        n = int(rng.integers(0, MAX_STATE_JOINTS + 1))
        arrays = [_floats(rng, size) for size in (n, n, n, 4, 3, 3, 3)]
        return State(u32, float(rng.normal()), Mode(int(rng.integers(0, 4))), u8, *arrays)
    if kind == 3:
        n = int(rng.integers(0, (MAX_PAYLOAD - 5) // 12 + 1))
        return Command(u32, _floats(rng, n), _floats(rng, n), _floats(rng, n))
    if kind == 4:
        return ModeRequest(Mode(int(rng.integers(0, 4))))
    if kind == 5:
        return Reset(u8)
    if kind == 6:
        return Heartbeat(u32, float(rng.normal()))
    if kind == 7:
        return EStop(u8)
    return Fault(u16, _text(rng, 40))


def build_pool(seed: int, size: int = POOL_SIZE) -> list[PoolEntry]:
    """`size` random messages with random seqs, encoded once (re-encoding per unit would dominate the run)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        seq, message = int(rng.integers(0, 2**16)), random_message(rng)
        pool.append(PoolEntry(seq, int(message.TYPE), message.pack(), encode_frame(message, seq)))
    return pool


# -- mutations ------------------------------------------------------------------------------------


def _flip(rand: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for bit in rand.sample(range(8 * len(data)), rand.randint(1, 3)):  # distinct bits: flips never cancel
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def _crafted(rand: random.Random, entry: PoolEntry) -> bytes:
    """A frame with a correct CRC around a header or payload that is wrong in one way."""
    version, type_code, payload = PROTOCOL_VERSION, entry.type_code, entry.payload
    length = None
    choice = rand.randrange(6)
    if choice == 0:
        version = rand.choice((0, *range(2, 256)))
    elif choice == 1:
        length = (len(payload) + rand.randint(1, 0xFFFF)) % 0x10000  # never the true length
    elif choice == 2:
        type_code = rand.choice(UNKNOWN_TYPES)
    elif choice == 3:
        type_code = rand.choice(KNOWN_TYPES)  # another message's payload under this type
    elif choice == 4:
        cut = rand.randrange(len(payload) + 1)
        payload = payload[:cut] if rand.random() < 0.5 else payload + rand.randbytes(rand.randint(1, 8))
    else:
        type_code, payload = rand.choice(KNOWN_TYPES), rand.randbytes(rand.randrange(64))
    body = HEADER.pack(version, type_code, entry.seq, len(payload) if length is None else length) + payload
    return cobs.encode(body + CRC.pack(zlib.crc32(body))) + b"\x00"


def make_unit(rand: random.Random, category: str, entry: PoolEntry) -> bytes:
    """The bytes fed for one unit of `category`, derived from `entry`'s frame."""
    frame = entry.frame
    if category == "clean":
        return frame
    if category == "bit_flip":
        return _flip(rand, frame)
    if category == "truncate":
        cut = rand.randrange(1, len(frame) - 1)
        return frame[:cut] + (b"\x00" if rand.random() < 0.5 else b"")
    if category == "duplicate":
        position = rand.randrange(len(frame))
        return frame[: position + 1] + frame[position:]
    if category == "drop":
        position = rand.randrange(len(frame))
        return frame[:position] + frame[position + 1 :]
    if category == "garbage":
        return rand.randbytes(rand.randint(1, 64)) + b"\x00"
    if category == "oversize":
        return rand.randbytes(rand.randint(MAX_ENCODED_SIZE + 1, 3 * MAX_ENCODED_SIZE)).translate(NO_ZERO) + b"\x00"
    if category == "crafted":
        return _crafted(rand, entry)
    raise ValueError(f"category={category!r}; valid: {', '.join(CATEGORIES)}")


# -- the run --------------------------------------------------------------------------------------


@dataclass
class CategoryCounts:
    """What became of the units of one category."""

    units: int = 0
    decoded_intact: int = 0  # came out as exactly the message encoded
    decoded_other: int = 0  # came out as something else (accepted_corrupt, except for crafted units)
    silent: int = 0  # nothing came out (dropped, counted by the decoder)
    exceptions: int = 0


def _empty_counts() -> dict[str, CategoryCounts]:
    return {name: CategoryCounts() for name in CATEGORIES}


@dataclass
class FuzzResult:
    """Counts of one fuzz run; `as_json` is the benchmark's JSON line."""

    frames: int
    seed: int
    exceptions: int = 0
    accepted_corrupt: int = 0
    peak_buffer_bytes: int = 0
    bytes_fed: int = 0
    feed_seconds: float = 0.0
    wall_seconds: float = 0.0
    categories: dict[str, CategoryCounts] = field(default_factory=_empty_counts)
    decoder_stats: dict[str, int] = field(default_factory=dict)
    first_exceptions: list[str] = field(default_factory=list)
    first_accepted_corrupt: list[str] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.feed_seconds if self.feed_seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "exceptions": self.exceptions,
            "accepted_corrupt": self.accepted_corrupt,
            "peak_buffer_bytes": self.peak_buffer_bytes,
            "max_encoded_size": MAX_ENCODED_SIZE,
            "frames_per_s": round(self.frames_per_s, 1),
            "mbytes_per_s": round(self.bytes_fed / self.feed_seconds / 1e6, 3) if self.feed_seconds > 0 else 0.0,
            "feed_seconds": round(self.feed_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "bytes_fed": self.bytes_fed,
            "seed": self.seed,
            "decoded_intact": sum(counts.decoded_intact for counts in self.categories.values()),
            "categories": {name: dataclasses.asdict(counts) for name, counts in self.categories.items()},
            "decoder_stats": self.decoder_stats,
            "first_exceptions": self.first_exceptions,
            "first_accepted_corrupt": self.first_accepted_corrupt,
        }


class Fuzzer:
    """Feeds units to one FrameDecoder and attributes what comes out to the unit that completed it."""

    def __init__(self, seed: int) -> None:
        self.rand = random.Random(seed)
        self.decoder = FrameDecoder()
        self.result = FuzzResult(frames=0, seed=seed)
        # Originals of earlier units whose bytes are still in the decoder (their delimiter was lost): a
        # frame that comes out intact may be theirs, e.g. a dropped delimiter made good by the next unit.
        self._pending: list[PoolEntry] = []

    def feed_unit(self, unit: bytes, category: str, original: PoolEntry) -> None:
        """Feed `unit` in 1 to 3 chunks and score its outputs against `original` (or a pending earlier one)."""
        result, counts = self.result, self.result.categories[category]
        candidates = [*self._pending, original]
        counts.units += 1
        result.frames += 1
        result.bytes_fed += len(unit)
        cuts = sorted(self.rand.randrange(len(unit) + 1) for _ in range(self.rand.randrange(3)))
        outputs = []
        for start, end in zip([0, *cuts], [*cuts, len(unit)]):
            began = time.perf_counter()
            try:
                outputs += self.decoder.feed(unit[start:end])
            except Exception as error:  # counting what escapes is the point
                result.exceptions += 1
                counts.exceptions += 1
                if len(result.first_exceptions) < 5:
                    result.first_exceptions.append(f"{category}: {error!r} on {unit.hex()}")
            result.feed_seconds += time.perf_counter() - began
            result.peak_buffer_bytes = max(result.peak_buffer_bytes, self.decoder.pending_bytes)
        self._pending = candidates[-4:] if self.decoder.pending_bytes else []
        if not outputs:
            counts.silent += 1
        for seq, message in outputs:
            # Bytes, not ==: a State or Heartbeat whose float is NaN never equals itself.
            payload = message.pack()
            if any(
                seq == sent.seq and int(message.TYPE) == sent.type_code and payload == sent.payload
                for sent in candidates
            ):
                counts.decoded_intact += 1
            else:
                counts.decoded_other += 1
                if category != "crafted":
                    result.accepted_corrupt += 1
                    if len(result.first_accepted_corrupt) < 5:
                        result.first_accepted_corrupt.append(f"{category}: {unit.hex()}")


def run_fuzz(num_frames: int, seed: int = 0) -> FuzzResult:
    """Feed `num_frames` units (see the module docstring) to one FrameDecoder and count what happened."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    started = time.perf_counter()
    pool = build_pool(seed)
    fuzzer = Fuzzer(seed)
    rand = fuzzer.rand
    categories = rand.choices(CATEGORIES, weights=WEIGHTS, k=num_frames)
    for category in categories:
        entry = pool[rand.randrange(len(pool))]
        fuzzer.feed_unit(make_unit(rand, category, entry), category, entry)
    result = fuzzer.result
    result.decoder_stats = dataclasses.asdict(fuzzer.decoder.stats)
    result.wall_seconds = time.perf_counter() - started
    return result


def markdown(result: FuzzResult) -> str:
    lines = [
        "| category | units | decoded intact | decoded other | nothing out | exceptions |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in result.categories.items():
        lines.append(f"| {name} | {c.units} | {c.decoded_intact} | {c.decoded_other} | {c.silent} | {c.exceptions} |")
    summary = result.as_json()
    lines += [
        "",
        "| measurement | value |",
        "|---|---:|",
        f"| frames fed | {result.frames} |",
        f"| exceptions escaped | {result.exceptions} |",
        f"| accepted corrupt | {result.accepted_corrupt} |",
        f"| peak buffer bytes (limit {MAX_ENCODED_SIZE}) | {result.peak_buffer_bytes} |",
        f"| frames/s inside feed | {summary['frames_per_s']:,.0f} |",
        f"| MB/s inside feed | {summary['mbytes_per_s']} |",
        f"| wall seconds | {summary['wall_seconds']} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=None, help=f"units to feed (default {DEFAULT_FRAMES:,})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_FRAMES:,} units")
    parser.add_argument("--seed", type=int, default=0, help="seed of the messages and the mutations")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    frames = args.frames if args.frames is not None else (QUICK_FRAMES if args.quick else DEFAULT_FRAMES)
    if frames < 1:
        parser.error(f"--frames must be >= 1, got {frames}")
    result = run_fuzz(frames, args.seed)
    if not args.json:
        print(markdown(result))
    summary = result.as_json()
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

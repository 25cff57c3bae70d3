"""A small run of benchmarks/fuzz_decoder.py against deploy.protocol.FrameDecoder, in-process."""

from __future__ import annotations

import json

import pytest

from benchmarks.fuzz_decoder import CATEGORIES, Fuzzer, PoolEntry, build_pool, main, run_fuzz
from deploy.messages import EStop
from deploy.protocol import MAX_ENCODED_SIZE, encode_frame


def test_quick_fuzz_finds_no_exception_and_no_accepted_corruption() -> None:
    result = run_fuzz(2000, seed=0)
    assert result.frames == 2000
    assert result.exceptions == 0, result.first_exceptions
    assert result.accepted_corrupt == 0
    assert 0 < result.peak_buffer_bytes <= MAX_ENCODED_SIZE
    # The run exercised what it claims: every category, every decoder error path, good frames too.
    assert all(result.categories[name].units > 0 for name in CATEGORIES)
    stats = result.decoder_stats
    for counter in ("crc_errors", "cobs_errors", "length_errors", "unknown_types", "version_errors", "oversize"):
        assert stats[counter] > 0, counter
    assert result.categories["clean"].decoded_intact > 0.8 * result.categories["clean"].units


def test_a_changed_frame_that_decodes_counts_as_accepted_corrupt() -> None:
    # EStop(2) arriving where EStop(1) was sent: the detector must see it (a CRC collision would look so).
    fuzzer = Fuzzer(seed=0)
    sent = PoolEntry(seq=5, type_code=int(EStop.TYPE), payload=EStop(1).pack(), frame=encode_frame(EStop(1), 5))
    fuzzer.feed_unit(encode_frame(EStop(2), 5), "bit_flip", sent)
    fuzzer.feed_unit(sent.frame, "duplicate", sent)
    assert fuzzer.result.accepted_corrupt == 1
    assert fuzzer.result.categories["duplicate"].decoded_intact == 1
    # Crafted frames carry a valid CRC on purpose: what they decode to is not corruption.
    fuzzer.feed_unit(encode_frame(EStop(3), 5), "crafted", sent)
    assert fuzzer.result.accepted_corrupt == 1


def test_a_lost_delimiter_made_good_later_is_not_corruption() -> None:
    # A frame whose 0x00 was dropped, then a garbage unit that starts with 0x00: the first frame arrives
    # intact, completed by the next unit's bytes, and must be scored against its own original.
    fuzzer = Fuzzer(seed=0)
    sent = PoolEntry(seq=9, type_code=int(EStop.TYPE), payload=EStop(4).pack(), frame=encode_frame(EStop(4), 9))
    other = PoolEntry(seq=1, type_code=int(EStop.TYPE), payload=EStop(0).pack(), frame=encode_frame(EStop(0), 1))
    fuzzer.feed_unit(sent.frame[:-1], "drop", sent)
    fuzzer.feed_unit(b"\x00\x13\x37\x00", "garbage", other)
    assert fuzzer.result.accepted_corrupt == 0
    assert fuzzer.result.categories["garbage"].decoded_intact == 1


def test_pool_is_deterministic() -> None:
    assert build_pool(seed=3, size=50) == build_pool(seed=3, size=50)


def test_cli_prints_json_last(capsys: pytest.CaptureFixture[str]) -> None:
    summary = main(["--frames", "300", "--seed", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| category |")
    assert json.loads(lines[-1]) == summary
    keys = {"frames", "exceptions", "accepted_corrupt", "peak_buffer_bytes", "frames_per_s"}
    assert keys <= summary.keys() and summary["frames"] == 300
    main(["--frames", "10", "--json"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 1

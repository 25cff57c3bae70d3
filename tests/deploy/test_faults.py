"""Link faults: the emulator's injector, and the host riding through them.

The realtime runs are real processes over a real pty (`metactl emulate --faults ...`); the
injector is checked frame by frame against the real decoder.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from controller.errors import ConfigError
from controller.robot import load_robot_spec
from deploy.control import run_episode
from deploy.errors import LinkError
from deploy.link import Link
from deploy.messages import Mode, Reset, State
from deploy.protocol import FrameDecoder, FrameEncoder
from deploy.robot import RobotEnv
from deploy.runtime import PolicyRuntime
from sim.emulator import Emulator
from sim.emulator_link import FaultInjector, FaultSpec
from tests.conftest import metactl

FAULTS = "drop=0.05,corrupt=0.01,delay=0.02,duplicate=0.01,reorder=0.01"
PERIOD = 0.02


@pytest.fixture(scope="module")
def spec():
    return load_robot_spec("a1")


def _frames(count: int) -> list[bytes]:
    encoder = FrameEncoder()
    return [encoder.encode(Reset(index % 2)) for index in range(count)]


def _inject(spec: FaultSpec, frames: list[bytes]) -> tuple[FaultInjector, bytearray]:
    wire = bytearray()
    injector = FaultInjector(spec, PERIOD, wire.extend)
    for frame in frames:
        injector.send(frame, now=0.0)
    return injector, wire


# -- FaultSpec ------------------------------------------------------------------------------------


def test_fault_spec_parses_every_key() -> None:
    spec = FaultSpec.parse(FAULTS + ",disconnect=1.5,outage=0.3,seed=7")
    assert (spec.drop, spec.corrupt, spec.delay, spec.duplicate, spec.reorder) == (0.05, 0.01, 0.02, 0.01, 0.01)
    assert (spec.disconnect, spec.outage, spec.seed) == (1.5, 0.3, 7)
    assert spec.active and not FaultSpec.parse("").active


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("drop=0.1,dorp=0.2", "unknown fault 'dorp' in --faults; valid: drop, corrupt, delay"),
        ("corrupt=1.5", "fault probability corrupt=1.5 is outside [0, 1]"),
        ("delay=-0.1", "fault probability delay=-0.1 is outside [0, 1]"),
        ("drop", "fault 'drop' is not KEY=VALUE"),
        ("drop=lots", "fault drop='lots' is not a number"),
        ("disconnect=-1", "disconnect=-1.0 must be >= 0"),
    ],
)
def test_fault_spec_errors_name_the_bad_item(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FaultSpec.parse(text)


def test_emulate_cli_refuses_an_unknown_fault() -> None:
    result = metactl("emulate", "--faults", "drop=0.1,jitter=0.2", "--seconds", "1", check=False, timeout=60)
    assert result.returncode == 2
    assert "unknown fault 'jitter'" in result.stderr and "reorder" in result.stderr


# -- FaultInjector, frame by frame ------------------------------------------------------------------


def test_each_dropped_frame_is_one_missing_seq_at_the_receiver() -> None:
    frames = _frames(20)
    wire = bytearray(frames[0])  # the first and last frames go through, so every drop lies between good ones
    injector = FaultInjector(FaultSpec(drop=0.5, seed=2), PERIOD, wire.extend)
    for frame in frames[1:-1]:
        injector.send(frame, 0.0)
    wire += frames[-1]
    decoder = FrameDecoder()
    decoded = decoder.feed(bytes(wire))
    assert 0 < injector.counts["drop"] < 18
    assert len(decoded) == 20 - injector.counts["drop"]
    assert decoder.stats.seq_gaps == injector.counts["drop"] and decoder.stats.corrupt == 0


def test_corrupt_changes_one_byte_and_the_crc_catches_it() -> None:
    frames = _frames(50)
    injector, wire = _inject(FaultSpec(corrupt=1.0, seed=3), frames)
    assert injector.counts["corrupt"] == 50
    assert len(wire) == sum(map(len, frames))  # same length: one byte changed per frame, never to 0x00
    assert wire.count(0) == 50
    changed = [sum(a != b for a, b in zip(frame, wire[i : i + len(frame)])) for i, frame in _offsets(frames)]
    assert changed == [1] * 50
    decoder = FrameDecoder()
    assert decoder.feed(bytes(wire)) == []
    assert decoder.stats.corrupt == 50 and decoder.stats.crc_errors + decoder.stats.cobs_errors == 50


def _offsets(frames: list[bytes]):
    start = 0
    for frame in frames:
        yield start, frame
        start += len(frame)


def test_duplicate_is_counted_by_the_receiver() -> None:
    frames = _frames(3)
    _, wire = _inject(FaultSpec(duplicate=1.0), frames)
    decoder = FrameDecoder()
    decoded = decoder.feed(bytes(wire))
    assert [seq for seq, _ in decoded] == [0, 0, 1, 1, 2, 2]
    assert decoder.stats.duplicates == 3


def test_delay_holds_frames_one_to_three_periods() -> None:
    frames = _frames(20)
    injector, wire = _inject(FaultSpec(delay=1.0, seed=1), frames)
    assert wire == b"" and injector.counts["delay"] == 20
    injector.release(0.5 * PERIOD)
    assert wire == b""
    injector.release(1.0 * PERIOD)
    after_one = wire.count(0)
    injector.release(3.0 * PERIOD)
    assert 0 < after_one < 20 and wire.count(0) == 20


def test_reorder_swaps_a_frame_with_the_next() -> None:
    frames = _frames(2)
    wire = bytearray()
    injector = FaultInjector(FaultSpec(reorder=1.0), PERIOD, wire.extend)
    injector.send(frames[0], 0.0)
    assert wire == b""
    injector.send(frames[1], 0.001)  # overtakes the held one (a second swap waits for the first to go)
    assert bytes(wire) == frames[1] + frames[0]
    decoder = FrameDecoder()
    assert [seq for seq, _ in decoder.feed(bytes(wire))] == [1, 0]
    assert decoder.stats.seq_resets == 1  # a backward jump: the receiver never reorders


def test_a_held_frame_goes_out_after_one_period_without_a_successor() -> None:
    frames = _frames(1)
    wire = bytearray()
    injector = FaultInjector(FaultSpec(reorder=1.0), PERIOD, wire.extend)
    injector.send(frames[0], 0.0)
    injector.release(PERIOD)
    assert bytes(wire) == frames[0]


# -- the host through a faulty realtime link -----------------------------------------------------------


def test_episodes_survive_faults_and_learning_sees_no_bad_sample(tiny_bundle: Path, emulator) -> None:
    robot = emulator("--faults", FAULTS + ",seed=5")
    runtime = PolicyRuntime(tiny_bundle)
    env = RobotEnv(robot.port, runtime.bundle.spec, episode_seconds=2.0)
    try:
        env.connect()
        episodes, ticks = [], []
        for _ in range(2):
            episodes.append(run_episode(env, runtime))
            ticks.append(np.array(env.ticks))
            answered, last_command = env.last_command.tick, env.last_command_time
            stopped = env.stopped_state
            # Watch the robot a little longer on the same link.
            seen = [stopped] + _states_for(env.link, 0.15)
        assert all(episode.length == 100 or episode.terminated for episode in episodes)
        for episode, episode_ticks in zip(episodes, ticks):
            steps = np.diff(episode_ticks)
            assert len(episode_ticks) == episode.length + 1  # one State per observation, the first one included
            assert np.all(steps >= 1)  # never a repeated or older State fed to the policy
            assert episode.gaps >= np.count_nonzero(steps != 1)  # every tick gap is flagged
            if episode.complete:
                assert np.all(steps == 1)
            assert all(np.all(np.isfinite(obs)) for obs in episode.obs)
        stats = env.link.stats.decoder
        assert stats.corrupt > 0 and stats.seq_gaps > 0  # the faults happened, and were seen
        assert env.health.gaps >= sum(np.count_nonzero(np.diff(t) != 1) for t in ticks)

        # Damping within 50 ms of the last Command: the robot's own clock (CLOCK_MONOTONIC) in its States.
        assert stopped is not None and stopped.mode == Mode.DAMPING
        # The last Command answers State T; the host asks for damping on receiving T + 1, and State T + 2
        # (40 ms after T) shows it. Each State the faults took away on the way costs one period more.
        lost_before = stopped.tick - answered - 2
        assert stopped.time - last_command < 0.05 + PERIOD * lost_before
        late = [s for s in seen if s.time > last_command + 0.05]
        assert late and all(s.mode != Mode.POSITION for s in late), [(s.time - last_command, s.mode) for s in seen]
    finally:
        env.close()


def _states_for(link: Link, seconds: float) -> list[State]:
    states, deadline = [], time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        state = link.latest_state(timeout=remaining)
        if state is not None:
            states.append(state)
    return states


def test_pulled_port_reconnects_within_a_second_and_flags_the_episode(tiny_bundle: Path, emulator) -> None:
    robot = emulator("--faults", "disconnect=1.0")
    assert Path(robot.port).is_symlink()  # a path the host can reopen after the pty is replaced
    runtime = PolicyRuntime(tiny_bundle)
    env = RobotEnv(robot.port, runtime.bundle.spec, episode_seconds=3.0)
    try:
        env.connect()
        episode = run_episode(env, runtime)
        assert env.reconnects == 1 and env.health.reconnects == 1
        assert env.health.reconnect_seconds[0] < 1.0
        assert not episode.complete  # left out of learning
        assert episode.length > 50  # the pull came mid-episode (1 s = 50 ticks in), and the episode went on
        assert np.all(np.diff(env.ticks) >= 1)
    finally:
        env.close()


def test_reconnect_gives_up_naming_the_url(spec) -> None:
    robot = Emulator(spec, lockstep=True)
    server = threading.Thread(target=robot.run, daemon=True)
    server.start()
    env = RobotEnv(robot.port.path, spec, reconnect_timeout=0.4)
    try:
        env.connect()
        env.reset()
        robot.stop()
        server.join(timeout=2)
        robot.close()  # the robot is gone for good
        start = time.monotonic()
        with pytest.raises(
            LinkError, match=f"lost the robot on '{robot.port.path}' and could not reconnect within 0.4 s"
        ):
            env.step(np.zeros(spec.num_joints))
        assert 0.4 <= time.monotonic() - start < 2.0
    finally:
        env.close()
        robot.stop()

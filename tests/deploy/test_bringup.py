"""Link bring-up against a real emulator process and against a scripted robot on a raw pty."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
import zlib
from collections.abc import Iterator

import pytest
from cobs import cobs

from deploy.bringup import LinkReport, LinkThresholds, assess_link, capability_words, check_link, format_report
from deploy.errors import LinkError
from deploy.messages import Capabilities, Capability, Fault, Heartbeat, Hello, Mode, State
from deploy.protocol import CRC, HEADER, PROTOCOL_VERSION, FrameDecoder, FrameEncoder

JOINTS = ("hip", "knee")


def _bad_crc_frame(msg: Heartbeat, seq: int = 0) -> bytes:
    """A well-formed frame whose CRC has its lowest bit flipped."""
    body = HEADER.pack(PROTOCOL_VERSION, msg.TYPE, seq, len(msg.pack())) + msg.pack()
    return cobs.encode(body + CRC.pack(zlib.crc32(body) ^ 1)) + b"\x00"


class ScriptedRobot(threading.Thread):
    """The robot end of a raw pty: answers Hello, streams States at `rate_hz` (unless lockstep), echoes
    Heartbeats except `drop`. With `inject`, when Heartbeat 2 arrives it injects, in this order: one frame
    with a bad CRC (no seq consumed), a Fault, a jump of 3 in its sequence counter, and its echo written twice.
    """

    def __init__(
        self,
        rate_hz: int = 100,
        *,
        lockstep: bool = False,
        drop: tuple[int, ...] = (),
        inject: bool = False,
        answer: bool = True,
    ) -> None:
        super().__init__(daemon=True)
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.rate_hz, self.lockstep, self.drop, self.answer = rate_hz, lockstep, drop, answer
        self.inject = inject
        self.encoder = FrameEncoder()
        self.stop_event = threading.Event()

    def _write(self, frame: bytes) -> None:
        os.write(self.master, frame)

    def _send(self, msg: object) -> bytes:
        frame = self.encoder.encode(msg)
        self._write(frame)
        return frame

    def run(self) -> None:
        decoder = FrameDecoder()
        streaming, tick, period = False, 0, 1.0 / self.rate_hz
        next_state = time.monotonic()
        while not self.stop_event.is_set():
            timeout = max(0.0, next_state - time.monotonic()) if streaming else 0.02
            ready, _, _ = select.select([self.master], [], [], timeout)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    continue  # EIO while the host has the port closed
                for _, msg in decoder.feed(data):
                    if isinstance(msg, Hello) and self.answer:
                        flags = Capability.LOCKSTEP if self.lockstep else Capability.RESET_SUPPORTED
                        self._send(Capabilities(1, "test-bot", self.rate_hz, flags, JOINTS))
                        streaming = not self.lockstep
                        next_state = time.monotonic()
                    elif isinstance(msg, Heartbeat) and msg.nonce not in self.drop:
                        if msg.nonce == 2 and self.inject:
                            self._write(_bad_crc_frame(Heartbeat(99, 0.0)))
                            self._send(Fault(2, "target clamped"))
                            self.encoder.next_seq += 3
                            self._write(self._send(msg))
                        else:
                            self._send(msg)
            if streaming and time.monotonic() >= next_state:
                self._send(
                    State(tick, tick * period, Mode.DAMPING, 0, [0, 0], [0, 0], [0, 0], [0, 0, 0, 1], [0] * 3, [0] * 3)
                )
                tick += 1
                next_state += period

    def close(self) -> None:
        self.stop_event.set()
        self.join(timeout=2)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def scripted_robot() -> Iterator[type[ScriptedRobot]]:
    started: list[ScriptedRobot] = []

    def start(*args, **kwargs) -> ScriptedRobot:
        started.append(ScriptedRobot(*args, **kwargs))
        started[-1].start()
        return started[-1]

    yield start
    for robot in started:
        robot.close()


def test_against_emulator(emulator) -> None:
    robot = emulator()
    report = check_link(robot.port, seconds=1.0)
    assert (report.robot, report.protocol_version, report.control_rate_hz) == ("a1", 1, 50)
    assert len(report.joint_names) == 12 and report.joint_names[0] == "FR_hip_joint"
    assert report.capabilities == ("can reset its episode", "measures base velocity")
    assert report.heartbeats_sent == 50 and report.heartbeats_lost == 0  # 1 s at 50 Hz
    rtt = report.round_trip_ms
    assert 0 < rtt["p50"] <= rtt["p90"] <= rtt["p99"] <= rtt["max"] < 100
    assert 40 <= report.state_rate_hz <= 60 and 40 <= report.states_received <= 60
    assert report.corrupt == report.seq_gaps == report.duplicates == 0
    assert report.frames_received == report.heartbeats_sent + report.states_received
    text = format_report(report)
    assert "robot 'a1'" in text and "50/50 heartbeats, round trip p50" in text and "robot says 50 Hz" in text


def test_counts_every_injected_error(scripted_robot) -> None:
    robot = scripted_robot(100, drop=(5,), inject=True)
    thresholds = LinkThresholds(max_round_trip_p99_ms=1000.0, max_state_rate_error=0.5)  # only injected errors
    report = check_link(robot.path, seconds=0.3, heartbeat_hz=40, thresholds=thresholds)
    assert report.heartbeats_sent == 12 and report.heartbeats_echoed == 11 and report.heartbeats_lost == 1
    assert report.corrupt_by_cause["crc_errors"] == 1 and report.corrupt == 1
    assert (report.seq_gaps, report.duplicates, report.seq_resets) == (3, 1, 0)
    assert report.faults == ("fault 2: target clamped",)
    assert report.state_rate_hz == pytest.approx(100, rel=0.5)
    assert len(report.problems) == 5 and not report.ok
    text = format_report(report)
    assert "link NOT OK (5 problems)" in text
    for words in ("1 of 12 Heartbeats", "1 corrupt frames (1 CRC)", "3 frames lost", "1 frames received twice"):
        assert f"PROBLEM: {words}" in text
    assert "PROBLEM: the robot reported fault 2: target clamped" in text


def test_lockstep_robot_has_no_state_rate(scripted_robot) -> None:
    robot = scripted_robot(200, lockstep=True)
    report = check_link(robot.path, seconds=0.2, thresholds=LinkThresholds(max_round_trip_p99_ms=1000.0))
    assert report.lockstep and report.state_rate_hz is None and report.states_received == 0
    assert report.ok, report.problems
    assert "lockstep robot: no stream to time" in format_report(report)


def test_silent_robot_and_missing_port(scripted_robot) -> None:
    robot = scripted_robot(answer=False)
    with pytest.raises(LinkError, match="no Capabilities"):
        check_link(robot.path, seconds=0.1, handshake_timeout=0.3)
    with pytest.raises(LinkError, match="/dev/metactl-no-such-port"):
        check_link("/dev/metactl-no-such-port")
    with pytest.raises(LinkError, match="seconds=0"):
        check_link(robot.path, seconds=0)


def _report(**changes: object) -> LinkReport:
    fields = dict(
        url="/dev/ttyUSB0",
        robot="a1",
        protocol_version=1,
        joint_names=("hip", "knee"),
        control_rate_hz=50,
        flags=int(Capability.BASE_VELOCITY),
        capabilities=("measures base velocity",),
        handshake_ms=2.0,
        seconds=3.0,
        heartbeat_hz=50.0,
        heartbeats_sent=150,
        heartbeats_echoed=150,
        round_trip_ms={"p50": 0.21, "p90": 0.4, "p99": 0.9, "max": 1.2},
        states_received=150,
        state_rate_hz=49.9,
        corrupt_by_cause={"crc_errors": 0, "cobs_errors": 0},
        seq_gaps=0,
        duplicates=0,
        seq_resets=0,
        skipped_bytes=0,
        frames_received=300,
        frames_sent=150,
        messages_dropped=0,
        faults=(),
    )
    return LinkReport(**(fields | changes))


def test_thresholds_by_hand() -> None:
    good = _report()
    assert assess_link(good) == ()
    assert "link OK: 150/150 heartbeats, round trip p50 0.21 ms" in format_report(good)
    assert "State at 49.9 Hz (robot says 50 Hz)" in format_report(good)
    # 50 Hz: period 20 ms, default round-trip limit 20 / 4 = 5 ms; 47 Hz is 6% off (> 5%).
    bad = _report(round_trip_ms={"p50": 1.0, "p90": 3.0, "p99": 5.01, "max": 8.0}, state_rate_hz=47.0)
    problems = assess_link(bad)
    assert len(problems) == 2
    assert problems[0].startswith("round trip p99 5.01 ms is over 5.00 ms")
    assert problems[1] == "State arrives at 47.0 Hz, the robot says 50 Hz (more than 5% apart)"
    assert assess_link(bad, LinkThresholds(max_round_trip_p99_ms=6.0, max_state_rate_error=0.07)) == ()
    assert assess_link(_report(round_trip_ms=None, heartbeats_echoed=0))[0].startswith("no Heartbeat echo")
    assert assess_link(_report(seq_resets=1)) == ("the robot restarted its sequence counter 1 times (did it reboot?)",)


def test_capability_words() -> None:
    assert capability_words(0) == ()
    assert capability_words(Capability.RESET_SUPPORTED | Capability.BASE_VELOCITY) == (
        "can reset its episode",
        "measures base velocity",
    )
    assert capability_words(0x8002)[1] == "unknown capability bits 0x8000"

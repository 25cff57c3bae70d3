"""Link bring-up: the first check on new hardware (``metactl link --port PORT``).

It opens the link, shakes hands (robot identity, protocol version, joint order, control rate,
capabilities), measures the round trip of Heartbeats sent at a steady rate, counts the State frames
the robot streams against the rate it advertises, and reads every frame error counter of the link.
It sends only Hello and Heartbeat: nothing that moves the robot.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from deploy.errors import LinkError
from deploy.link import Link, LinkStats, handshake
from deploy.messages import Capabilities, Capability, Fault, Heartbeat

# Words for the Capability bits, in bit order.
CAPABILITY_WORDS = {
    Capability.RESET_SUPPORTED: "can reset its episode",
    Capability.LOCKSTEP: "lockstep (steps once per Command, streams no State on its own)",
    Capability.BASE_VELOCITY: "measures base velocity",
}

# DecoderStats counters of frames dropped as corrupt, with the words format_report uses.
CORRUPT_CAUSES = {
    "crc_errors": "CRC",
    "cobs_errors": "COBS",
    "length_errors": "length",
    "unknown_types": "unknown type",
    "version_errors": "version",
    "payload_errors": "payload",
    "oversize": "oversize",
}


@dataclass(frozen=True)
class LinkThresholds:
    """What counts as a problem in a bring-up check; each broken threshold is one PROBLEM line."""

    max_round_trip_p99_ms: float | None = None
    """Heartbeat round-trip p99 limit; None: a quarter of the control period (5 ms at 50 Hz), since
    reading a State, inferring and sending the Command must all fit in one period."""
    max_state_rate_error: float = 0.05
    """Largest relative difference between the State rate received and the advertised control rate."""
    max_heartbeats_lost: int = 0
    """Heartbeats sent whose echo never came back."""
    max_corrupt_frames: int = 0
    """Frames dropped as corrupt (all causes together)."""
    max_seq_gaps: int = 0
    """Frames missing between consecutive good frames (sequence number gaps)."""
    max_duplicates: int = 0
    """Frames received twice in a row."""


@dataclass(frozen=True)
class LinkReport:
    """What `check_link` measured. Times are in milliseconds, rates in Hz.

    Frame counters are deltas over the measurement (after the handshake), so bytes left in the port
    from before the link was opened do not count against it.
    """

    url: str
    robot: str
    protocol_version: int
    joint_names: tuple[str, ...]
    control_rate_hz: int
    flags: int
    capabilities: tuple[str, ...]
    handshake_ms: float
    seconds: float
    """How long the measurement took: the Heartbeat schedule plus the wait for the last echoes."""
    heartbeat_hz: float
    heartbeats_sent: int
    heartbeats_echoed: int
    round_trip_ms: dict[str, float] | None
    """p50, p90, p99 and max of the Heartbeat round trip; None when no echo came back."""
    states_received: int
    state_rate_hz: float | None
    """States received per second (host clock); None for a lockstep robot or fewer than 2 States."""
    corrupt_by_cause: dict[str, int]
    seq_gaps: int
    duplicates: int
    seq_resets: int
    skipped_bytes: int
    frames_received: int
    frames_sent: int
    messages_dropped: int
    faults: tuple[str, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def heartbeats_lost(self) -> int:
        return self.heartbeats_sent - self.heartbeats_echoed

    @property
    def corrupt(self) -> int:
        return sum(self.corrupt_by_cause.values())

    @property
    def lockstep(self) -> bool:
        return bool(self.flags & Capability.LOCKSTEP)

    @property
    def ok(self) -> bool:
        return not self.problems


def capability_words(flags: int) -> tuple[str, ...]:
    """Capability bits -> plain words, unknown bits named by value."""
    words = [text for bit, text in CAPABILITY_WORDS.items() if flags & bit]
    unknown = int(flags) & ~sum(int(bit) for bit in Capability)
    if unknown:
        words.append(f"unknown capability bits {unknown:#06x}")
    return tuple(words)


def check_link(
    url: str,
    seconds: float = 3.0,
    *,
    heartbeat_hz: float = 50.0,
    handshake_timeout: float = 2.0,
    thresholds: LinkThresholds | None = None,
    baudrate: int = 1_000_000,
    host_name: str = "metactl-bringup",
) -> LinkReport:
    """Open the link at ``url``, shake hands, then measure it for ``seconds``; see the module docstring.

    Args:
        url: A device or pty path, ``socket://host:port`` or any other pyserial URL.
        seconds: How long Heartbeats are sent and States counted.
        heartbeat_hz: Heartbeats per second (``seconds * heartbeat_hz`` of them in all).
        handshake_timeout: Seconds to wait for the robot's Capabilities.
        thresholds: Limits for the PROBLEM lines (default: `LinkThresholds()`).
        baudrate: Line rate for a real UART.
        host_name: Sent in Hello.

    Returns:
        The measurements, with ``problems`` filled by `assess_link`.

    Raises:
        LinkError: A bad argument, a port that cannot be opened (named), no Capabilities in time, a
            robot Fault during the handshake, or the link breaking during the measurement.
        ProtocolError: The robot speaks another protocol version.
    """
    for name, value in (("seconds", seconds), ("heartbeat_hz", heartbeat_hz), ("handshake_timeout", handshake_timeout)):
        if not value > 0:
            raise LinkError(f"{name}={value} must be positive")
    with Link(url, baudrate=baudrate) as link:
        link.reset_input()
        start = time.perf_counter()
        caps = handshake(link, host_name, timeout=handshake_timeout)
        handshake_ms = 1e3 * (time.perf_counter() - start)
        link.latest_state(timeout=0)  # a State sent with Capabilities belongs to the handshake, not the count
        baseline = link.stats
        watcher = _StateWatcher(link)
        watcher.start()
        try:
            round_trips, sent, faults, elapsed = _heartbeats(link, seconds, heartbeat_hz)
        finally:
            watcher.stop()
        if watcher.error is not None:
            raise watcher.error
        stats = link.stats
    report = _report(
        url, caps, handshake_ms, elapsed, heartbeat_hz, sent, round_trips, faults, watcher, baseline, stats
    )
    return dataclasses.replace(report, problems=assess_link(report, thresholds))


def assess_link(report: LinkReport, thresholds: LinkThresholds | None = None) -> tuple[str, ...]:
    """One sentence per broken threshold (empty: the link is fine)."""
    limits = thresholds or LinkThresholds()
    problems = []
    rtt_limit = limits.max_round_trip_p99_ms
    if rtt_limit is None:
        rtt_limit = 250.0 / report.control_rate_hz if report.control_rate_hz > 0 else float("inf")
    if report.round_trip_ms is None:
        problems.append(f"no Heartbeat echo came back ({report.heartbeats_sent} sent): the robot does not answer")
    elif report.round_trip_ms["p99"] > rtt_limit:
        problems.append(
            f"round trip p99 {report.round_trip_ms['p99']:.2f} ms is over {rtt_limit:.2f} ms; a USB-serial adapter "
            f"may be batching bytes (FTDI: set latency_timer to 1)"
        )
    if report.heartbeats_lost > limits.max_heartbeats_lost:
        problems.append(f"{report.heartbeats_lost} of {report.heartbeats_sent} Heartbeats never came back")
    if not report.lockstep:
        if report.state_rate_hz is None:
            problems.append(f"the robot streamed {report.states_received} State frames in {report.seconds:.1f} s")
        elif abs(report.state_rate_hz / report.control_rate_hz - 1.0) > limits.max_state_rate_error:
            problems.append(
                f"State arrives at {report.state_rate_hz:.1f} Hz, the robot says {report.control_rate_hz} Hz "
                f"(more than {100 * limits.max_state_rate_error:.0f}% apart)"
            )
    if report.corrupt > limits.max_corrupt_frames:
        causes = ", ".join(
            f"{count} {CORRUPT_CAUSES[name]}" for name, count in report.corrupt_by_cause.items() if count
        )
        problems.append(f"{report.corrupt} corrupt frames ({causes}): check wiring, ground and baud rate")
    if report.seq_gaps > limits.max_seq_gaps:
        problems.append(f"{report.seq_gaps} frames lost in sequence gaps")
    if report.duplicates > limits.max_duplicates:
        problems.append(f"{report.duplicates} frames received twice")
    if report.seq_resets:
        problems.append(f"the robot restarted its sequence counter {report.seq_resets} times (did it reboot?)")
    problems.extend(f"the robot reported {fault}" for fault in report.faults)
    return tuple(problems)


def format_report(report: LinkReport) -> str:
    """The report in plain words: identity, link summary, counters, then one PROBLEM line per problem."""
    caps = "; ".join(report.capabilities) or "no capability flags"
    lines = [
        f"robot {report.robot!r} on {report.url}, protocol v{report.protocol_version}, "
        f"control rate {report.control_rate_hz} Hz, handshake {report.handshake_ms:.1f} ms; {caps}",
        f"{len(report.joint_names)} joints: {', '.join(report.joint_names)}",
    ]
    status = "link OK" if report.ok else f"link NOT OK ({len(report.problems)} problems)"
    if report.round_trip_ms is None:
        heartbeats = f"{report.heartbeats_sent} heartbeats, none echoed"
    else:
        rtt = report.round_trip_ms
        heartbeats = (
            f"{report.heartbeats_echoed}/{report.heartbeats_sent} heartbeats, round trip p50 {rtt['p50']:.2f} ms, "
            f"p90 {rtt['p90']:.2f} ms, p99 {rtt['p99']:.2f} ms, max {rtt['max']:.2f} ms"
        )
    if report.lockstep:
        states = f"{report.states_received} States (lockstep robot: no stream to time)"
    elif report.state_rate_hz is None:
        states = f"{report.states_received} States"
    else:
        states = f"State at {report.state_rate_hz:.1f} Hz (robot says {report.control_rate_hz} Hz)"
    lines.append(f"{status}: {heartbeats}; {report.corrupt} corrupt frames; {states}")
    causes = ", ".join(f"{CORRUPT_CAUSES[name]} {count}" for name, count in report.corrupt_by_cause.items())
    lines.append(
        f"in {report.seconds:.1f} s: {report.frames_received} frames received, {report.frames_sent} sent; "
        f"corrupt by cause: {causes}; sequence gaps {report.seq_gaps}, duplicates {report.duplicates}, "
        f"counter restarts {report.seq_resets}; {report.skipped_bytes} bytes skipped resyncing; "
        f"{report.messages_dropped} messages dropped unread"
    )
    lines.extend(f"PROBLEM: {problem}" for problem in report.problems)
    return "\n".join(lines)


# -- measurement ----------------------------------------------------------------------------------


class _StateWatcher(threading.Thread):
    """Counts States as they arrive and stamps the first and last (host clock), beside the Heartbeats."""

    def __init__(self, link: Link) -> None:
        super().__init__(name="metactl-bringup-states", daemon=True)
        self._link = link
        self._stop_event = threading.Event()
        self.returned = 0
        self.first: float | None = None
        self.last: float | None = None
        self.skipped_at_first = 0
        self.error: LinkError | None = None

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                if self._link.latest_state(timeout=0.05) is None:
                    continue
                now = time.perf_counter()
                if self.first is None:
                    self.first, self.skipped_at_first = now, self._link.stats.states_skipped
                self.last = now
                self.returned += 1
        except LinkError as error:
            self.error = error

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=1.0)

    def rate_hz(self, skipped_total: int) -> float | None:
        """States per second from the first to the last one seen; overwritten ones count too."""
        if self.first is None or self.last is None or self.last <= self.first:
            return None
        after_first = self.returned - 1 + (skipped_total - self.skipped_at_first)
        return after_first / (self.last - self.first)


def _heartbeats(
    link: Link, seconds: float, heartbeat_hz: float, drain_s: float = 0.5
) -> tuple[list[float], int, list[str], float]:
    """Send Heartbeats on a fixed schedule and time their echoes; returns (round trips ms, sent, faults, s)."""
    count = max(1, int(round(seconds * heartbeat_hz)))
    period = 1.0 / heartbeat_hz
    pending: dict[int, float] = {}  # nonce -> send time, until its echo arrives
    round_trips: list[float] = []
    faults: list[str] = []

    def collect(until: float, stop_when_answered: bool) -> None:
        while not (stop_when_answered and not pending):
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            msg = link.recv(timeout=remaining)
            received = time.perf_counter()
            if isinstance(msg, Heartbeat) and msg.nonce in pending:
                round_trips.append(1e3 * (received - pending.pop(msg.nonce)))
            elif isinstance(msg, Fault):
                faults.append(f"fault {msg.code}: {msg.message}")

    start = time.perf_counter()
    for nonce in range(count):
        # An absolute schedule: a slow echo does not stretch the period of the next send.
        collect(start + nonce * period, stop_when_answered=False)
        pending[nonce] = time.perf_counter()
        link.send(Heartbeat(nonce, pending[nonce]))
    collect(time.perf_counter() + max(drain_s, period), stop_when_answered=True)
    return round_trips, count, faults, time.perf_counter() - start


def _report(
    url: str,
    caps: Capabilities,
    handshake_ms: float,
    elapsed: float,
    heartbeat_hz: float,
    sent: int,
    round_trips: list[float],
    faults: list[str],
    watcher: _StateWatcher,
    baseline: LinkStats,
    stats: LinkStats,
) -> LinkReport:
    def delta(name: str) -> int:
        return getattr(stats.decoder, name) - getattr(baseline.decoder, name)

    round_trip = None
    if round_trips:
        p50, p90, p99 = np.percentile(round_trips, [50, 90, 99])
        round_trip = {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(max(round_trips))}
    skipped_states = stats.states_skipped - baseline.states_skipped
    return LinkReport(
        url=url,
        robot=caps.robot,
        protocol_version=caps.protocol_version,
        joint_names=tuple(caps.joint_names),
        control_rate_hz=caps.control_rate_hz,
        flags=int(caps.flags),
        capabilities=capability_words(caps.flags),
        handshake_ms=handshake_ms,
        seconds=elapsed,
        heartbeat_hz=heartbeat_hz,
        heartbeats_sent=sent,
        heartbeats_echoed=len(round_trips),
        round_trip_ms=round_trip,
        states_received=watcher.returned + skipped_states,
        state_rate_hz=None if caps.flags & Capability.LOCKSTEP else watcher.rate_hz(stats.states_skipped),
        corrupt_by_cause={name: delta(name) for name in CORRUPT_CAUSES},
        seq_gaps=delta("seq_gaps"),
        duplicates=delta("duplicates"),
        seq_resets=delta("seq_resets"),
        skipped_bytes=delta("skipped_bytes"),
        frames_received=delta("frames_ok"),
        frames_sent=stats.frames_sent - baseline.frames_sent,
        messages_dropped=stats.messages_dropped - baseline.messages_dropped,
        faults=tuple(faults),
    )

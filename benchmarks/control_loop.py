"""The full host control loop at a fixed rate, against a replay robot on a pseudo-terminal.

    python benchmarks/control_loop.py --rate 500 --seconds S [--json] [--bundle DIR]
                                      [--nice N] [--affinity] [--fifo]

The host runs the deploy path of `metactl deploy` (`deploy.control.run_episode`): `RobotEnv` over
a `Link` (reader thread, State mailbox), `ObservationMapping` to build the observation and the joint
targets, `PolicyRuntime.act` (onnxruntime) to infer, and a Command per State. The emulator's
physics cannot keep 500 Hz in real time here, so the robot is a replay robot: a child process that
owns the pty, answers Hello and Reset, writes State frames of one fixed standing state at `--rate`
on an absolute schedule, and stamps (robot clock) when each State goes out and when the Command
answering it arrives.

Measured over `--seconds` after a 0.5 s warm-up:

    achieved_hz         Commands per second the host sent (host clock)
    deadline_miss_rate  share of States whose Command was not back before the next State went out
                        (never-answered States count as misses)
    jitter_p99_ms       p99 of |host command period - 1/rate|, from the time each Command is handed
                        to `RobotEnv.step`
    round_trip_*_ms     State written by the robot -> its Command read by the robot
    host_compute_*_us   State returned to the host loop -> Command handed to RobotEnv.step
    robot_late_p99_ms   how late the replay robot itself wrote its States (its own share of jitter)

Options that change scheduling, applied to both processes: `--nice N` (os.nice), `--affinity`
(robot on CPU 0, host on CPU 1), `--fifo` (SCHED_FIFO, as a robot computer would run its loop;
needs root or CAP_SYS_NICE). Prints a Markdown table, then one JSON object as the last line
(`--json`: the JSON line alone). Targets at 500 Hz: miss rate <= 0.001, jitter p99 <= 0.5 ms.

The replay robot and the scheduling options are in control_loop_robot.py; this file holds the host
loop, the bare pty floor, the statistics and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import tempfile
import time
import tty
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from controller.mapping import ObservationMapping
from controller.mlsh_policy import MLSHPolicy
from controller.robot import load_robot_spec
from deploy.bundle import load_bundle
from deploy.export import build_manifest, write_version
from deploy.robot import RobotEnv
from deploy.runtime import PolicyRuntime

if __package__:  # python -m benchmarks.control_loop, or imported as benchmarks.control_loop
    from .control_loop_robot import apply_scheduling, replay_robot
else:  # python benchmarks/control_loop.py: this file's directory is sys.path[0]
    from control_loop_robot import apply_scheduling, replay_robot

TARGETS = {"deadline_miss_rate": 0.001, "jitter_p99_ms": 0.5}
WARMUP_S = 0.5
TAIL_TICKS = 20  # States after the measured window, so the last measured one has a "next State"
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "a1_terrain.yaml"


def fresh_bundle(directory: Path) -> Path:
    """A freshly initialized MLSH policy shaped like configs/a1_terrain.yaml, exported as a bundle."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    spec = load_robot_spec(config["robot"])
    mapping = ObservationMapping(spec)
    torch.manual_seed(0)
    policy = MLSHPolicy(mapping.obs_dim, mapping.act_dim, **config["policy"])
    write_version(directory, policy, build_manifest(spec, policy, {"command": "benchmarks: fresh MLSH policy"}))
    return directory


class GcWatch:
    """Counts the garbage collector's runs per generation, and its longest pause, while in gc.callbacks."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.longest_ms = 0.0
        self._start = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter_ns()
        else:
            self.counts[info["generation"]] += 1
            self.longest_ms = max(self.longest_ms, (time.perf_counter_ns() - self._start) / 1e6)


def run_host(url: str, bundle: Path, last_tick: int) -> dict[str, Any]:
    """The deploy loop until the host has answered `last_tick`; per answered tick: tick, received, handed over."""
    runtime = PolicyRuntime(bundle)
    # No Bundle.check_robot: the bundle runs at the spec's 50 Hz, the replay robot at --rate.
    env = RobotEnv(url, runtime.bundle.spec, state_timeout=1.0)
    ticks, received, handed = [], [], []
    clock = time.perf_counter_ns
    watch = GcWatch()  # a full collection of this process takes ~100 ms: it must not land in the loop
    gc.callbacks.append(watch)
    try:
        env.connect(timeout=5.0)
        obs, info = env.reset()
        runtime.reset()
        got = clock()
        while True:
            tick = info["state"].tick
            action, _ = runtime.act(obs)
            handed_at = clock()
            obs, _, _, _, info = env.step(action)
            ticks.append(tick)
            received.append(got)
            handed.append(handed_at)
            got = clock()
            if tick >= last_tick:
                break
    finally:
        gc.callbacks.remove(watch)
        env.close()
    return {
        "tick": np.array(ticks),
        "received": np.array(received),
        "handed": np.array(handed),
        "gaps": env.gaps,
        "gc_collections": watch.counts,
        "gc_longest_ms": watch.longest_ms,
    }


def pty_floor(rate_hz: float, count: int, size: int = 150, child_cpu: int | None = None) -> dict[str, float]:
    """Round trip of `size` bytes through a raw pty to an echoing child process and back, nothing else.

    The same kernel path the loop's frames take (a State frame is about 150 bytes), paced at `rate_hz`:
    the floor under the loop's round trip on this machine.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    child = os.fork()
    if child == 0:  # echo until the parent closes its end
        os.close(master)
        if child_cpu is not None:
            os.sched_setaffinity(0, {child_cpu})
        with contextlib.suppress(OSError):
            while data := os.read(slave, 4096):
                os.write(slave, data)
        os._exit(0)
    os.close(slave)
    payload, times = b"x" * size, np.empty(count, dtype=np.int64)
    next_ping = time.perf_counter()
    try:
        for index in range(count):
            next_ping += 1.0 / rate_hz
            start = time.perf_counter_ns()
            os.write(master, payload)
            received = 0
            while received < size:
                received += len(os.read(master, 4096))
            times[index] = time.perf_counter_ns() - start
            time.sleep(max(0.0, next_ping - time.perf_counter()))
    finally:
        os.close(master)
        os.waitpid(child, 0)
    p50, p99 = np.percentile(times / 1e6, [50, 99])
    return {"pty_round_trip_p50_ms": float(p50), "pty_round_trip_p99_ms": float(p99)}


def summarize(host: dict[str, Any], robot: dict[str, Any], first: int, last: int, rate_hz: float) -> dict[str, Any]:
    """Statistics over ticks [first, last]."""
    period_ms = 1e3 / rate_hz
    window = slice(first, last + 1)
    sent, arrived = robot["sent"], robot["arrived"]
    answered = arrived[window] >= 0
    # Missed: the Command for tick k was not read before State k + 1 was written (or never came).
    on_time = answered & (arrived[window] < sent[first + 1 : last + 2])
    round_trip = (arrived[window] - sent[window])[answered] / 1e6
    in_window = (host["tick"] >= first) & (host["tick"] <= last)
    handed = host["handed"][in_window] / 1e6
    ticks = host["tick"][in_window]
    consecutive = np.diff(ticks) == 1
    periods = np.diff(handed)[consecutive]
    compute = (host["handed"] - host["received"])[in_window] / 1e3
    arrivals = np.diff(arrived[window][answered]) / 1e6
    # One clock on both sides (CLOCK_MONOTONIC behind perf_counter_ns), so the legs can be split.
    host_ticks = host["tick"][in_window]
    state_leg = (host["received"][in_window] - sent[host_ticks]) / 1e6
    answered_host = arrived[host_ticks] >= 0
    command_leg = (arrived[host_ticks] - host["handed"][in_window])[answered_host] / 1e6
    count = last - first + 1
    return {
        "ticks": count,
        "achieved_hz": (len(handed) - 1) / ((handed[-1] - handed[0]) / 1e3),
        "deadline_misses": int(count - on_time.sum()),
        "deadline_miss_rate": float(1.0 - on_time.mean()),
        "unanswered": int(count - answered.sum()),
        "host_gaps": int(host["gaps"]),
        "period_p50_ms": float(np.percentile(periods, 50)),
        "jitter_p99_ms": float(np.percentile(np.abs(periods - period_ms), 99)),
        "jitter_max_ms": float(np.abs(periods - period_ms).max()),
        "round_trip_p50_ms": float(np.percentile(round_trip, 50)),
        "round_trip_p99_ms": float(np.percentile(round_trip, 99)),
        "round_trip_max_ms": float(round_trip.max()),
        "host_compute_p50_us": float(np.percentile(compute, 50)),
        "host_compute_p99_us": float(np.percentile(compute, 99)),
        "state_leg_p50_ms": float(np.percentile(state_leg, 50)),
        "state_leg_p99_ms": float(np.percentile(state_leg, 99)),
        "command_leg_p50_ms": float(np.percentile(command_leg, 50)),
        "command_leg_p99_ms": float(np.percentile(command_leg, 99)),
        "robot_command_jitter_p99_ms": float(np.percentile(np.abs(arrivals - period_ms), 99)),
        "robot_late_p99_ms": float(np.percentile((sent[window] - robot["scheduled"][window]) / 1e6, 99)),
    }


def markdown(results: dict[str, Any]) -> str:
    rows = [
        ("achieved rate (Hz)", f"{results['achieved_hz']:.1f}", f"{results['rate_hz']:.0f}"),
        (
            "deadline misses",
            f"{results['deadline_misses']} of {results['ticks']} ({results['deadline_miss_rate']:.4f})",
            f"<= {TARGETS['deadline_miss_rate']}",
        ),
        ("States never answered / host gaps", f"{results['unanswered']} / {results['host_gaps']}", ""),
        ("command period p50 (ms)", f"{results['period_p50_ms']:.3f}", f"{1e3 / results['rate_hz']:.3f}"),
        ("jitter p99 / max (ms)", f"{results['jitter_p99_ms']:.3f} / {results['jitter_max_ms']:.2f}", "<= 0.5 (p99)"),
        (
            "round trip p50 / p99 / max (ms)",
            f"{results['round_trip_p50_ms']:.3f} / {results['round_trip_p99_ms']:.3f} / "
            f"{results['round_trip_max_ms']:.2f}",
            "",
        ),
        (
            "host compute p50 / p99 (us)",
            f"{results['host_compute_p50_us']:.0f} / {results['host_compute_p99_us']:.0f}",
            "",
        ),
        (
            "State written -> host has the observation, p50 / p99 (ms)",
            f"{results['state_leg_p50_ms']:.3f} / {results['state_leg_p99_ms']:.3f}",
            "",
        ),
        (
            "Command handed to RobotEnv.step -> read by robot, p50 / p99 (ms)",
            f"{results['command_leg_p50_ms']:.3f} / {results['command_leg_p99_ms']:.3f}",
            "",
        ),
        (
            "bare pty round trip (150 B echo), p50 / p99 (ms)",
            f"{results['pty_round_trip_p50_ms']:.3f} / {results['pty_round_trip_p99_ms']:.3f}",
            "",
        ),
        (
            "host garbage collections gen 0/1/2, longest (ms)",
            f"{'/'.join(map(str, results['gc_collections']))}, {results['gc_longest_ms']:.2f}",
            "",
        ),
        ("robot: Command arrival jitter p99 (ms)", f"{results['robot_command_jitter_p99_ms']:.3f}", ""),
        ("robot: own State lateness p99 (ms)", f"{results['robot_late_p99_ms']:.3f}", ""),
    ]
    lines = ["| measurement | value | target |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="State rate of the replay robot (Hz)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds (after a 0.5 s warm-up)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: a fresh a1_terrain-shaped policy)")
    parser.add_argument("--nice", type=int, default=0, help="os.nice increment for host and robot (negative: root)")
    parser.add_argument("--affinity", action="store_true", help="pin the robot to CPU 0 and the host to CPU 1")
    parser.add_argument("--fifo", action="store_true", help="SCHED_FIFO for host and robot (root or CAP_SYS_NICE)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0:
        parser.error(f"--rate {args.rate} and --seconds {args.seconds} must be positive")
    first = int(round(WARMUP_S * args.rate))
    last = first + int(round(args.seconds * args.rate)) - 1
    load_before = os.getloadavg()[0]

    if args.bundle is not None:
        spec = load_bundle(args.bundle).spec
    else:
        spec = load_robot_spec(yaml.safe_load(SHIPPED_CONFIG.read_text())["robot"])
    # fork before torch or onnxruntime start any thread: the child needs only the codec and starts at once.
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe()
    robot_scheduling = (args.nice, 0 if args.affinity else None, args.fifo)
    robot = context.Process(
        target=replay_robot, args=(child_end, spec, args.rate, last + 1 + TAIL_TICKS, robot_scheduling), daemon=True
    )
    robot.start()
    try:
        with tempfile.TemporaryDirectory(prefix="metactl-bench-") as tmp:
            bundle = args.bundle if args.bundle is not None else fresh_bundle(Path(tmp) / "bundle")
            applied = apply_scheduling(args.nice, 1 if args.affinity else None, args.fifo)
            floor = pty_floor(args.rate, int(min(args.rate, 1000)), child_cpu=0 if args.affinity else None)
            url = parent_end.recv()
            host = run_host(url, bundle, last)
            timings = parent_end.recv()
    finally:
        robot.join(timeout=5)
        if robot.is_alive():
            robot.terminate()
    results: dict[str, Any] = {
        "rate_hz": args.rate,
        "seconds": args.seconds,
        "scheduling_host": applied,
        "scheduling_robot": timings["applied"],
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(load_before, 2),
    }
    results |= summarize(host, timings, first, last, args.rate)
    results |= floor | {"gc_collections": host["gc_collections"], "gc_longest_ms": host["gc_longest_ms"]}
    results["targets"] = TARGETS
    results["meets_targets"] = {
        "deadline_miss_rate": results["deadline_miss_rate"] <= TARGETS["deadline_miss_rate"],
        "jitter_p99_ms": results["jitter_p99_ms"] <= TARGETS["jitter_p99_ms"],
    }
    results = {key: round(value, 4) if isinstance(value, float) else value for key, value in results.items()}
    if not args.json:
        print(markdown(results))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

"""The replay robot of benchmarks/control_loop.py: the robot end of the pseudo-terminal.

A child process that owns the pty, answers Hello, Reset and Heartbeat, writes State frames of one
fixed standing state at a fixed rate on an absolute schedule, and stamps (robot clock) when each
State goes out and when the first Command answering it arrives. `apply_scheduling` is the nice,
affinity and SCHED_FIFO options, which the host process applies to itself as well.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
import tty
from multiprocessing.connection import Connection

import numpy as np

from controller.robot import RobotSpec
from deploy.messages import Capabilities, Capability, Command, Heartbeat, Hello, Mode, Reset, State, StateFlag
from deploy.protocol import FrameDecoder, FrameEncoder

FIFO_PRIORITY = 50


def apply_scheduling(nice: int, cpu: int | None, fifo: bool) -> list[str]:
    """Change this process's scheduling (threads started later inherit it); returns what took effect."""
    applied = []
    if nice:
        try:
            os.nice(nice)
            applied.append(f"nice {nice:+d}")
        except OSError as error:
            applied.append(f"nice {nice:+d} refused ({error.strerror})")
    if cpu is not None and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})
        applied.append(f"cpu {cpu}")
    if fifo:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
            applied.append(f"SCHED_FIFO {FIFO_PRIORITY}")
        except OSError as error:
            applied.append(f"SCHED_FIFO refused ({error.strerror})")
    return applied


def standing_state(spec: RobotSpec, tick: int, robot_time: float, flags: int = 0) -> State:
    """One fixed reading: default pose, at rest, upright, in POSITION mode."""
    zeros = np.zeros(spec.num_joints)
    return State(
        tick, robot_time, Mode.POSITION, flags, spec.array("default_pose"), zeros, zeros, [0, 0, 0, 1], [0, 0, 0],
        [0, 0, 9.81], [0, 0, 0],
    )  # fmt: skip


def replay_robot(
    conn: Connection, spec: RobotSpec, rate_hz: float, num_ticks: int, scheduling: tuple[int, int | None, bool]
) -> None:
    """Child process: serve `num_ticks` States at `rate_hz` on a fresh pty; send the timings back over `conn`."""
    applied = apply_scheduling(*scheduling)
    master, slave = os.openpty()
    tty.setraw(slave)  # bytes pass unchanged
    os.set_blocking(master, False)
    conn.send(os.ttyname(slave))
    decoder, encoder = FrameDecoder(), FrameEncoder()
    period_ns = int(round(1e9 / rate_hz))
    scheduled = np.zeros(num_ticks, dtype=np.int64)
    sent = np.zeros(num_ticks, dtype=np.int64)
    arrived = np.full(num_ticks, -1, dtype=np.int64)  # first Command per tick, robot clock (ns)
    started = False
    episode_start = StateFlag(0)  # set by a Reset, carried by the next State built

    def serve(until_ns: int) -> None:
        """Read and answer whatever arrives until `until_ns` (perf_counter_ns)."""
        nonlocal started, episode_start
        while (remaining := until_ns - time.perf_counter_ns()) > 0:
            ready, _, _ = select.select([master], [], [], remaining / 1e9)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except (BlockingIOError, OSError):  # EIO while the host has the port closed
                continue
            now = time.perf_counter_ns()
            for _, msg in decoder.feed(data):
                if isinstance(msg, Command):
                    if 0 <= msg.tick < num_ticks and arrived[msg.tick] < 0:
                        arrived[msg.tick] = now
                elif isinstance(msg, Hello):
                    flags = Capability.RESET_SUPPORTED | Capability.BASE_VELOCITY
                    caps = Capabilities(1, spec.name, int(round(rate_hz)), flags, tuple(spec.joint_names))
                    os.write(master, encoder.encode(caps))
                    started = True
                elif isinstance(msg, Reset):
                    os.write(master, encoder.encode(Reset(Reset.DONE)))
                    episode_start = StateFlag.EPISODE_START
                elif isinstance(msg, Heartbeat):
                    os.write(master, encoder.encode(msg))

    deadline = time.perf_counter_ns() + 120 * 10**9
    while not started and time.perf_counter_ns() < deadline:
        serve(time.perf_counter_ns() + 10**7)
    start = time.perf_counter_ns() + period_ns
    for tick in range(num_ticks if started else 0):
        scheduled[tick] = start + tick * period_ns
        # Built before its time, so encoding does not delay the write.
        frame = encoder.encode(standing_state(spec, tick, scheduled[tick] / 1e9, episode_start))
        episode_start = StateFlag(0)
        serve(scheduled[tick])
        with contextlib.suppress(BlockingIOError):  # nobody reads: the missing Commands will show it
            os.write(master, frame)
        sent[tick] = time.perf_counter_ns()
    serve(time.perf_counter_ns() + 2 * 10**8)  # the last Commands
    conn.send({"scheduled": scheduled, "sent": sent, "arrived": arrived, "applied": applied, "started": started})
    conn.close()
    os.close(master)
    os.close(slave)

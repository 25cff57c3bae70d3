"""Host-side safety in RobotEnv: rate limit, NaN guards, stale States, fall stop, soft start,
damping and EStop, watchdog recovery.

Against a real emulator (in-process in lockstep, or `metactl emulate` in real time) or `loop://`,
where every frame the host sends comes back to it, so a test can play the robot's States.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from controller.robot import load_robot_spec
from deploy.control import run_episode
from deploy.messages import Capabilities, Capability, Mode, ModeRequest, State
from deploy.robot import RobotEnv
from deploy.robot_states import tick_newer
from deploy.runtime import PolicyRuntime
from sim.emulator import Emulator, SensorErrors


@pytest.fixture(scope="module")
def spec():
    return load_robot_spec("a1")


@pytest.fixture
def lockstep_robot(spec) -> Iterator[Callable[..., Emulator]]:
    """Factory: an Emulator in lockstep, served from a thread of this process."""
    started: list[tuple[Emulator, threading.Thread]] = []

    def start(**kwargs) -> Emulator:
        robot = Emulator(spec, lockstep=True, **kwargs)
        thread = threading.Thread(target=robot.run, daemon=True)
        thread.start()
        started.append((robot, thread))
        return robot

    yield start
    for robot, thread in started:
        robot.stop()
        thread.join(timeout=2)
        robot.close()


def _state(spec, tick: int, *, mode: Mode = Mode.POSITION, **fields) -> State:
    n = spec.num_joints
    values = {
        "joint_pos": spec.array("default_pose"),
        "joint_vel": np.zeros(n),
        "joint_torque": np.zeros(n),
        "quat": [0.0, 0.0, 0.0, 1.0],
        "gyro": np.zeros(3),
        "accel": [0.0, 0.0, 9.81],
        "base_vel": np.zeros(3),
    } | fields
    return State(tick, tick * 0.02, mode, 0, **values)


def _loop_env(spec, **kwargs) -> RobotEnv:
    """A RobotEnv on loop://: the test sends the States it should receive."""
    env = RobotEnv("loop://", spec, reset_wait=0.0, **kwargs)
    env.link.open()
    env.capabilities = Capabilities(1, spec.name, 50, Capability.BASE_VELOCITY, tuple(spec.joint_names))
    return env


# -- rate limit and non-finite values ----------------------------------------------------------------


def test_default_rate_limit_is_a_full_action_swing(spec) -> None:
    assert spec.action_scale == 0.2
    assert RobotEnv("loop://", spec).max_target_step == pytest.approx(0.4)  # 2 x action_scale per tick


def test_rate_limit_caps_every_joint_every_tick(spec, lockstep_robot) -> None:
    robot = lockstep_robot()
    env = RobotEnv(robot.port.path, spec, max_target_step=0.05)
    try:
        env.connect()
        _, info = env.reset()
        measured = info["state"].joint_pos  # no offsets: the spec frame is the encoder frame
        env.step(np.ones(spec.num_joints))
        # Hand-computed first tick: wanted = default + gait(phase 0) + 0.2 x 1; minus the default pose that
        # is 0.2 on hips and calves, 0.3 + 0.2 on the FR/RL thighs and -0.3 + 0.2 on the FL/RR thighs (the
        # trot's second diagonal is half a cycle behind). All are more than 0.05 away: one step of 0.05.
        direction = np.array([1, 1, 1, 1, -1, 1, 1, -1, 1, 1, 1, 1])
        np.testing.assert_allclose(env.last_command.targets, measured + 0.05 * direction, atol=1e-6)
        previous = env.last_command.targets.astype(np.float64)
        for k in range(5):
            env.step(np.full(spec.num_joints, -1.0 if k % 2 == 0 else 1.0))  # flip the action every tick
            sent = env.last_command.targets.astype(np.float64)
            assert np.max(np.abs(sent - previous)) <= 0.05 + 1e-6
            np.testing.assert_allclose(robot.targets, sent)  # what the robot got: no clamp needed there
            previous = sent
        assert env.health.rate_limited == 6
    finally:
        env.close()


def test_nonfinite_targets_hold_the_previous_ones(spec) -> None:
    env = _loop_env(spec)
    try:
        env.link.send(_state(spec, 10))
        env.reset()
        default = spec.array("default_pose")
        targets = default + 0.01
        targets[[0, 4]] = [np.nan, np.inf]
        safe = env.safe_targets(targets)
        assert np.all(np.isfinite(safe))
        np.testing.assert_allclose(safe[[0, 4]], default[[0, 4]])  # held at the previous target (measured pose)
        np.testing.assert_allclose(np.delete(safe, [0, 4]), np.delete(targets, [0, 4]))
        assert env.health.nonfinite_targets == 1
    finally:
        env.close()


def test_nan_action_sends_a_finite_command(spec, lockstep_robot) -> None:
    robot = lockstep_robot()
    env = RobotEnv(robot.port.path, spec)
    try:
        env.connect()
        env.reset()
        obs, *_ = env.step(np.full(spec.num_joints, np.nan))
        assert np.all(np.isfinite(env.last_command.targets)) and np.all(np.isfinite(obs))
        assert env.mapping.nonfinite_actions == 1
        env.step(np.zeros(spec.num_joints))
        assert "BAD_COMMAND" not in env.health.faults and robot.mode == Mode.POSITION
    finally:
        env.close()


def test_nonfinite_reading_never_reaches_the_policy_and_flags_the_episode(spec) -> None:
    env = _loop_env(spec)
    try:
        env.link.send(_state(spec, 10))
        env.reset()
        joint_pos = spec.array("default_pose")
        joint_pos[3] = np.nan
        env.link.send(_state(spec, 11, joint_pos=joint_pos, gyro=[np.inf, 0.0, 0.0]))
        obs, reward, terminated, truncated, info = env.step(np.zeros(spec.num_joints))
        assert np.all(np.isfinite(obs)) and obs.dtype == np.float32
        assert info["gap"] and env.gaps == 1 and env.health.nonfinite_states == 1
        assert np.all(np.isfinite(env.last_command.targets))
    finally:
        env.close()


# -- stale States -------------------------------------------------------------------------------------


def test_tick_comparison_wraps() -> None:
    assert tick_newer(1, 0) and not tick_newer(0, 0) and not tick_newer(4, 5)
    assert tick_newer(0, 2**32 - 1) and not tick_newer(2**32 - 1, 0)


def test_duplicated_and_late_states_are_never_a_new_step(spec) -> None:
    env = _loop_env(spec)
    try:
        env.link.send(_state(spec, 5))
        env.reset()
        # While the host waits for its next State: a duplicate of tick 5, then a late tick 4, then tick 7.
        later = [_state(spec, 5), _state(spec, 4), _state(spec, 7)]
        timers = [threading.Timer(0.05 * (i + 1), env.link.send, (s,)) for i, s in enumerate(later)]
        for timer in timers:
            timer.start()
        _, _, _, _, info = env.step(np.zeros(spec.num_joints))
        assert info["state"].tick == 7 and info["gap"]  # 6 never came: a gap, flagged
        assert env.health.stale_states == 2 and env.ticks == [5, 7]
    finally:
        for timer in timers:
            timer.cancel()
        env.close()


# -- falls, damping, EStop ------------------------------------------------------------------------------


def test_tilt_past_the_limit_ends_the_episode_and_damps(spec) -> None:
    env = _loop_env(spec)
    try:
        env.link.send(_state(spec, 1))
        env.reset()
        # Rolled 70 degrees: upright = cos(70 deg) = 0.34 < min_upright 0.5.
        half = np.radians(70) / 2
        env.link.send(_state(spec, 2, quat=[np.sin(half), 0.0, 0.0, np.cos(half)]))
        _, _, terminated, truncated, info = env.step(np.zeros(spec.num_joints))
        assert terminated and not truncated and info["safety_stop"] == "fallen"
        assert env.health.falls == 1
        sent_after = []  # loop:// echoes what the host sent after the step's State
        while (message := env.link.recv(timeout=0.2)) is not None:
            sent_after.append(message)
        assert ModeRequest(Mode.DAMPING) in sent_after
    finally:
        env.close()


def test_close_leaves_the_robot_damping(spec, lockstep_robot) -> None:
    robot = lockstep_robot()
    env = RobotEnv(robot.port.path, spec)
    env.connect()
    env.reset()
    env.step(np.zeros(spec.num_joints))
    assert robot.mode == Mode.POSITION
    env.close()
    _wait_for(lambda: robot.mode == Mode.DAMPING)


def _wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class _CtrlCAtTick:
    """The bundle's runtime, with a real SIGINT to this process on the given control tick.

    Raised from inside the loop rather than by a timer: under load a 30 s lockstep episode of an
    untrained policy can end (a fall) before a timer fires.
    """

    def __init__(self, runtime: PolicyRuntime, tick: int) -> None:
        self.runtime, self.tick, self.ticks = runtime, tick, 0

    def reset(self) -> None:
        self.runtime.reset()

    def act(self, obs: np.ndarray, deterministic: bool = True):
        self.ticks += 1
        if self.ticks == self.tick:
            signal.raise_signal(signal.SIGINT)  # Python raises KeyboardInterrupt at the next bytecode
        return self.runtime.act(obs, deterministic=deterministic)

    def observe(self, reward: float) -> None:
        self.runtime.observe(reward)


def test_ctrl_c_sends_estop_and_a_reset_clears_it(spec, lockstep_robot, tiny_bundle: Path) -> None:
    robot = lockstep_robot()
    runtime = _CtrlCAtTick(PolicyRuntime(tiny_bundle), tick=5)
    env = RobotEnv(robot.port.path, spec, episode_seconds=30.0)
    # Ctrl-C as a terminal delivers it: Python's default handler, the signal not blocked, whatever
    # state earlier tests in this process left behind.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        env.connect()
        with pytest.raises(KeyboardInterrupt):
            episode = run_episode(env, runtime)
            pytest.fail(f"no KeyboardInterrupt: the episode ended after {episode.length} steps")
        assert runtime.ticks == 5
        _wait_for(lambda: robot.mode == Mode.ESTOP)
        env.close()  # no DAMPING request on top of the latch
        env.link.open()
        env.reset()  # Reset clears the latch
        env.step(np.zeros(spec.num_joints))
        assert robot.mode == Mode.POSITION
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        env.close()


# -- soft start -----------------------------------------------------------------------------------------


def test_soft_start_ramps_from_the_measured_pose(spec, lockstep_robot) -> None:
    offsets = np.zeros(spec.num_joints)
    offsets[[1, 4]] = [0.3, -0.25]  # the encoders read 0.3 and -0.25 rad away from the default pose
    robot = lockstep_robot(errors=SensorErrors(joint_offsets=offsets))
    env = RobotEnv(robot.port.path, spec, soft_start_seconds=0.2)  # 10 ticks at 50 Hz
    try:
        env.connect()
        sent_before = env.link.stats.frames_sent
        _, info = env.reset()
        assert info["soft_start_ticks"] == 10
        # Reset request, then 10 Commands (and the ModeRequest(POSITION) before the first).
        assert env.link.stats.frames_sent - sent_before == 1 + 1 + 10
        # The ramp ended on the default pose; each tick moved at most 0.3 / 10 = 0.03 rad.
        np.testing.assert_allclose(env.last_command.targets, spec.array("default_pose"), atol=1e-6)
        assert env.health.rate_limited == 0
        assert env.ticks == [info["state"].tick] and env.gaps == 0  # the episode starts after the ramp
    finally:
        env.close()


def test_soft_start_is_skipped_after_a_reset_into_the_pose(spec, lockstep_robot) -> None:
    robot = lockstep_robot()
    env = RobotEnv(robot.port.path, spec, soft_start_seconds=1.0)
    try:
        env.connect()
        _, info = env.reset()
        assert info["soft_start_ticks"] == 0
        _, _, _, _, step_info = env.step(np.zeros(spec.num_joints))
        assert step_info["state"].tick == info["state"].tick + 1 and not step_info["gap"]
    finally:
        env.close()


# -- watchdog -------------------------------------------------------------------------------------------


def test_watchdog_trip_is_counted_and_recovered(spec, emulator) -> None:
    robot = emulator()  # real time, 50 ms watchdog
    env = RobotEnv(robot.port, spec)
    try:
        env.connect()
        env.reset()
        for _ in range(5):
            env.step(np.zeros(spec.num_joints))
        time.sleep(0.2)  # the host stalls: no Command for 200 ms
        _, _, _, _, info = env.step(np.zeros(spec.num_joints))
        assert info["mode"] == Mode.DAMPING and info["gap"]
        # At least the stall's trip; a host starved of CPU by other jobs can stall past 50 ms again.
        assert env.health.watchdog_trips >= 1 and env.gaps >= 1
        modes = [env.step(np.zeros(spec.num_joints))[4]["mode"] for _ in range(5)]
        assert modes[-1] == Mode.POSITION  # the host asked for POSITION again
        assert env.health.faults.get("WATCHDOG", 0) == env.health.watchdog_trips
    finally:
        env.close()


def test_targets_stay_within_torque_reach_of_the_measured_pose(spec) -> None:
    """kp * |target - measured| never asks for more than the torque limit."""
    from deploy.messages import State

    env = RobotEnv("loop://", spec, max_target_step=10.0)
    measured = np.array(spec.default_pose)
    env._last = State(
        0, 0.0, Mode.POSITION, 0, measured, np.zeros(12), np.zeros(12), [0, 0, 0, 1], np.zeros(3), np.zeros(3)
    )
    env._targets = measured.copy()
    far = measured + 2.0
    safe = env.safe_targets(far)
    reach = np.array(spec.torque_limit) / spec.kp
    assert np.all(safe - measured <= reach + 1e-6)  # the State carries float32 angles
    assert np.all(safe <= np.array(spec.joint_upper))

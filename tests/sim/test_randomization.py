"""Every Task knob changes the physics it names (sim/pybullet_robot.py, sim/terrain.py).

Each test runs the A1 for a few dozen control steps under a task and under the nominal task and
compares what the knob should change. Delays are checked to the physics step.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pybullet
import pytest

from controller.mapping import rotate_to_body
from controller.robot import load_robot_spec
from sim.env import LocomotionEnv
from sim.pybullet_robot import SimRobot
from sim.tasks import Task
from sim.terrain import (
    CATCH_DROP,
    MAX_HEIGHT,
    ROUGH,
    STAIRS,
    STAIRS_LANDING,
    TerrainParams,
    grid,
    heightmap,
)

ZERO = np.zeros(12)
NO_COMMAND = np.zeros(3)


@pytest.fixture(scope="module")
def spec():
    return load_robot_spec("a1")


@pytest.fixture(scope="module")
def sim(spec):
    robot = SimRobot(spec)
    yield robot
    robot.close()


@pytest.fixture(scope="module")
def env():
    environment = LocomotionEnv("a1", episode_seconds=100.0, joint_noise=0.0)
    yield environment
    environment.close()


def start(sim: SimRobot, task: Task, seed: int | None = 0) -> SimRobot:
    sim.apply_task(task)
    sim.reset(None if seed is None else np.random.default_rng(seed))
    return sim


def hold(sim: SimRobot, num_steps: int, targets: np.ndarray | None = None, gain: float = 1.0) -> None:
    targets = sim.spec.array("default_pose") if targets is None else targets
    for _ in range(num_steps):
        sim.step(targets, gain * sim.spec.kp, sim.spec.kd)


@contextlib.contextmanager
def hanging(sim: SimRobot):
    """Pin the trunk 0.6 m up so the legs swing freely."""
    sim.client.resetBasePositionAndOrientation(sim.body, [0, 0, 0.6], [0, 0, 0, 1])
    constraint = sim.client.createConstraint(
        sim.body, -1, -1, -1, pybullet.JOINT_FIXED, [0, 0, 0], [0, 0, 0], [0, 0, 0.6]
    )
    try:
        yield
    finally:
        sim.client.removeConstraint(constraint)


def link(sim: SimRobot, name: str) -> int:
    names = {sim.client.getJointInfo(sim.body, j)[12].decode(): j for j in range(sim.client.getNumJoints(sim.body))}
    return names[name]


def foot_loads(sim: SimRobot) -> dict[str, float]:
    """Normal force (N) on each foot from the ground."""
    loads = dict.fromkeys(("FR", "FL", "RR", "RL"), 0.0)
    feet = {link(sim, f"{leg}_toe"): leg for leg in loads}
    for contact in sim.client.getContactPoints(sim.body):
        if contact[3] in feet:
            loads[feet[contact[3]]] += contact[9]
    return loads


def yaw(sim: SimRobot) -> float:
    return pybullet.getEulerFromQuaternion(sim.client.getBasePositionAndOrientation(sim.body)[1])[2]


# -- nominal is unchanged ---------------------------------------------------------------------------


def test_reset_episodes_repeat_exactly():
    """Saved-state resets plus deterministic contact ordering: the same seed and actions give the
    same episode, including the first one after building the world (evaluation and resume rely on it)."""

    def episode(env: LocomotionEnv) -> np.ndarray:
        env.reset(seed=0)
        return np.array([env.step(np.full(12, 0.1))[0] for _ in range(50)])

    env = LocomotionEnv("a1", episode_seconds=10.0, joint_noise=0.05)
    first, second = episode(env), episode(env)
    env.close()
    fresh = LocomotionEnv("a1", episode_seconds=10.0, joint_noise=0.05)
    again = episode(fresh)
    fresh.close()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, again)


# -- bodies and contact -----------------------------------------------------------------------------


def test_link_mass_scale_scales_legs_not_base_and_lowers_the_stance(sim):
    leg = link(sim, "FR_upper")
    nominal_mass, _, nominal_inertia = sim.client.getDynamicsInfo(sim.body, leg)[:3]
    start(sim, Task())
    hold(sim, 30)
    nominal_height = sim.base_position()[2]
    start(sim, Task(link_mass_scale=2.5))
    hold(sim, 30)
    assert sim.client.getDynamicsInfo(sim.body, leg)[0] == pytest.approx(2.5 * nominal_mass)
    np.testing.assert_allclose(sim.client.getDynamicsInfo(sim.body, leg)[2], 2.5 * np.array(nominal_inertia))
    assert sim.client.getDynamicsInfo(sim.body, -1)[0] == pytest.approx(sim.base_mass)
    assert sim.base_position()[2] < nominal_height - 0.01
    start(sim, Task())
    assert sim.client.getDynamicsInfo(sim.body, leg)[0] == pytest.approx(nominal_mass)


def test_payload_com_offset_moves_the_load_between_legs(sim):
    def front_share(**offset: float) -> tuple[float, float]:
        start(sim, Task(**offset))
        hold(sim, 60)
        loads = foot_loads(sim)
        total = sum(loads.values())
        return (loads["FR"] + loads["FL"]) / total, (loads["FL"] + loads["RL"]) / total

    nominal_front, nominal_left = front_share()
    forward_front, _ = front_share(payload_com_x=0.05)
    backward_front, _ = front_share(payload_com_x=-0.05)
    _, left_left = front_share(payload_com_y=0.04)
    # Statics: moving the 4.7 kg trunk's weight 5 cm on a ~12 kg robot with 0.37 m between hips shifts ~5%.
    assert forward_front > nominal_front + 0.03
    assert backward_front < nominal_front - 0.03
    assert left_left > nominal_left + 0.03


def test_spinning_friction_stops_a_twist_sooner(sim):
    def yaw_rate(spinning: float) -> float:
        start(sim, Task(spinning_friction=spinning))
        hold(sim, 10)
        sim.client.resetBaseVelocity(sim.body, [0, 0, 0], [0, 0, 4.0])
        hold(sim, 10)
        return abs(sim.client.getBaseVelocity(sim.body)[1][2])

    assert yaw_rate(0.1) < 0.5 * yaw_rate(0.0)


def test_rolling_friction_shortens_a_slide(sim):
    def slide(rolling: float) -> float:
        start(sim, Task(rolling_friction=rolling))
        hold(sim, 10)
        before = sim.base_position()[1]
        sim.client.resetBaseVelocity(sim.body, [0, 1.5, 0], [0, 0, 0])  # sideways shove: the round feet roll
        hold(sim, 25)
        return sim.base_position()[1] - before

    assert slide(0.1) < 0.5 * slide(0.0)


def test_restitution_bounces_the_trunk(sim):
    def rebound(restitution: float) -> float:
        start(sim, Task(restitution=restitution))
        sim.client.resetBasePositionAndOrientation(sim.body, [0, 0, 0.6], [1, 0, 0, 0])  # falls on its back
        speeds = []
        for _ in range(40):
            sim.step(sim.spec.array("default_pose"), 0.0, 0.0)
            speeds.append(sim.client.getBaseVelocity(sim.body)[0][2])
        return max(speeds)

    assert rebound(0.0) < 0.5
    assert rebound(0.9) > 2.0  # hits at ~3.4 m/s


def test_ground_properties_apply_to_every_ground_body(sim):
    start(sim, Task(terrain=1, terrain_amplitude=0.05, friction=0.3, spinning_friction=0.02, restitution=0.1))
    assert len(sim.terrain.bodies) == 2
    for body in sim.terrain.bodies:
        info = sim.client.getDynamicsInfo(body, -1)
        assert (info[1], info[5], info[7]) == pytest.approx((0.3, 0.1, 0.02))
    start(sim, Task())


# -- motors -----------------------------------------------------------------------------------------


def test_motor_strength_spread_is_per_joint_and_fixed_by_the_seed(sim):
    start(sim, Task(motor_strength=0.8, motor_strength_spread=0.3, seed=11))
    strength = sim.per_joint_strength()
    start(sim, Task(motor_strength=0.8, motor_strength_spread=0.3, seed=11))
    np.testing.assert_array_equal(sim.per_joint_strength(), strength)
    pattern = np.random.default_rng(11).uniform(-1.0, 1.0, 12)
    np.testing.assert_allclose(strength, 0.8 * (1.0 + 0.3 * pattern))
    assert np.all((strength >= 0.8 * 0.7) & (strength <= 0.8 * 1.3)) and np.ptp(strength) > 0.1
    start(sim, Task(motor_strength=0.8, motor_strength_spread=0.3, seed=12))
    assert not np.allclose(sim.per_joint_strength(), strength)
    # A target far away saturates every motor: |tau_j| = strength_j * limit_j.
    start(sim, Task(motor_strength=0.8, motor_strength_spread=0.3, seed=11))
    sim.step(sim.spec.array("default_pose") + 2.0, sim.spec.kp, 0.0, substeps=1)
    np.testing.assert_allclose(np.abs(sim.last_torque), strength * 33.5)
    start(sim, Task())
    np.testing.assert_array_equal(sim.per_joint_strength(), np.ones(12))


@pytest.mark.parametrize(
    "task",
    [
        Task(),
        Task(motor_strength=0.8, motor_strength_spread=0.3, seed=11, kp_scale=1.1, kd_scale=0.9, joint_damping=0.2),
    ],
    ids=["nominal", "strength, gains and damping"],
)
def test_the_motor_torque_is_the_pd_law_exactly(sim, task):
    """tau = strength * clip(kp_scale kp (q* - q) - kd_scale kd dq, -limit, limit), as numpy computes it, bit for
    bit, for one gain or one per joint, with targets past the limits (clipped) and inside them."""
    start(sim, task)
    rng = np.random.default_rng(5)
    limit = sim.spec.array("torque_limit")
    for kp, kd in [(sim.spec.kp, sim.spec.kd), (rng.uniform(10, 60, 12), rng.uniform(0.5, 2.0, 12))]:
        for _ in range(5):
            q, dq = sim.joint_states()
            target = sim.spec.array("default_pose") + rng.normal(0.0, 0.4, 12)
            sim.step(target, kp, kd, substeps=1)
            kp_eff, kd_eff = np.asarray(kp) * task.kp_scale, np.asarray(kd) * task.kd_scale
            want = sim.per_joint_strength() * np.clip(kp_eff * (target - q) - kd_eff * dq, -limit, limit)
            np.testing.assert_array_equal(sim.last_torque, want)


def step_response(sim: SimRobot, task: Task, num_steps: int = 14) -> tuple[np.ndarray, ...]:
    """Thigh torque, true angle and read angle per physics step after a 0.3 rad step in one target.

    The robot hangs, settled, so that the response does not depend on when the step starts.
    """
    start(sim, task)
    default = sim.spec.array("default_pose")
    target = default.copy()
    target[1] += 0.3
    torque, true, read = [], [], []
    with hanging(sim):
        hold(sim, 40)
        for _ in range(num_steps):
            sim.step(target, sim.spec.kp, sim.spec.kd, substeps=1)
            torque.append(sim.last_torque[1])
            true.append(sim.joint_states()[0][1])
            read.append(sim.read_state(NO_COMMAND, sim.spec.sim_timestep).joint_pos[1])
    return np.array(torque), np.array(true), np.array(read)


def test_latency_delays_command_and_reading_by_whole_physics_steps(sim):
    torque, true, read = step_response(sim, Task())
    np.testing.assert_array_equal(read, true)
    assert torque[0] == pytest.approx(40.0 * 0.3, abs=0.5)  # kp * step, at once
    for latency, delay in ((0.015, 3), (0.02, 4), (0.012, 2)):  # round(latency / 0.005) physics steps
        delayed_torque, delayed_true, delayed_read = step_response(sim, Task(latency=latency))
        np.testing.assert_allclose(delayed_torque[delay:], torque[:-delay], atol=1e-3)
        assert np.all(np.abs(delayed_torque[:delay]) < 0.5)  # still holding the old target
        np.testing.assert_allclose(delayed_true[delay:], true[:-delay], atol=1e-5)
        assert np.all(np.abs(delayed_true[:delay] - delayed_true[0]) < 1e-3)  # not moving yet
        # The reading is `delay` steps older again: the robot sees its response 2 * delay steps late.
        np.testing.assert_allclose(delayed_read[2 * delay :], true[: -2 * delay], atol=1e-5)
        assert np.all(np.abs(delayed_read[: 2 * delay] - delayed_read[0]) < 1e-3)
    state = sim.read_state(NO_COMMAND, sim.spec.sim_timestep)
    assert state.time == pytest.approx(sim.sim_time - 0.01)


def test_latency_keeps_base_velocity_and_falls_current(env):
    env.set_task(Task(latency=0.04))
    env.reset(seed=0)
    for _ in range(5):
        env.step(ZERO)
    state = env.state
    env.set_task(Task())
    client, body = env.sim.client, env.sim.body
    quat = client.getBasePositionAndOrientation(body)[1]
    velocity = rotate_to_body(np.asarray(quat), np.asarray(client.getBaseVelocity(body)[0]))
    np.testing.assert_allclose(state.base_vel, velocity, atol=1e-9)
    assert state.time == pytest.approx(env.sim.sim_time - 0.04)


def test_control_jitter_varies_the_physics_steps_per_control_step(sim):
    def counts(task: Task, seed: int) -> np.ndarray:
        start(sim, task, seed)
        steps = []
        for _ in range(300):
            before = sim._physics_steps
            sim.step(sim.spec.array("default_pose"), sim.spec.kp, sim.spec.kd)
            steps.append(sim._physics_steps - before)
        return np.array(steps)

    assert set(counts(Task(), 0)) == {4}
    jittered = counts(Task(control_jitter=0.005), 0)  # one physics step of standard deviation
    assert jittered.min() >= 1 and len(set(jittered)) >= 4
    assert jittered.mean() == pytest.approx(4.0, abs=0.2)
    assert jittered.std() == pytest.approx(1.04, abs=0.15)  # std of round(N(0, 1)) = sqrt(1 + 1/12)
    np.testing.assert_array_equal(counts(Task(control_jitter=0.005), 0), jittered)  # the reset seed fixes it


def test_joint_damping_slows_the_joints_and_stays_stable(sim):
    def thigh_speeds(damping: float) -> np.ndarray:
        start(sim, Task(joint_damping=damping))
        target = sim.spec.array("default_pose")
        target[1] += 0.5
        speeds = []
        with hanging(sim):
            for _ in range(40):
                sim.step(target, sim.spec.kp, sim.spec.kd, substeps=1)
                speeds.append(sim.joint_states()[1][1])
        return np.abs(speeds)

    peaks = [thigh_speeds(damping).max() for damping in (0.0, 0.5, 2.0)]
    assert peaks[0] > peaks[1] + 1.0 > peaks[2] + 2.0
    # Heavy damping on a light calf does not oscillate (an explicit -b dq term at 200 Hz would).
    start(sim, Task(joint_damping=2.0))
    calf = []
    with hanging(sim):
        for _ in range(30):
            sim.step(sim.spec.array("default_pose"), 0.0, 0.0, substeps=1)
            calf.append(sim.joint_states()[1][2])
    assert np.max(np.abs(calf[5:])) < 3.0


def test_joint_coulomb_friction_holds_hanging_legs_with_motors_off(sim):
    def sag(coulomb: float) -> float:
        start(sim, Task(joint_coulomb=coulomb))
        with hanging(sim):
            for _ in range(25):
                sim.step(sim.spec.array("default_pose"), 0.0, 0.0)
        return float(np.max(np.abs(sim.joint_states()[0] - sim.spec.array("default_pose"))))

    assert sag(0.0) > 0.5  # the legs swing down under gravity
    assert sag(1.5) < 1e-3  # more than a leg's ~1 N m of gravity torque: static friction holds
    assert sag(0.3) > 0.05  # less: they slide


# -- sensors ----------------------------------------------------------------------------------------


def test_sensor_noise_has_the_task_std_and_leaves_the_physics_alone(sim):
    task = Task(noise_joint_pos=0.01, noise_joint_vel=0.5, noise_gyro=0.05, noise_gravity=0.02)
    start(sim, task, seed=3)
    true_q, true_dq = sim.joint_states()
    clean = start(sim, Task(), seed=3).read_state(NO_COMMAND, 0.02)
    start(sim, task, seed=3)
    readings = [sim.read_state(NO_COMMAND, 0.02) for _ in range(1500)]
    q = np.array([r.joint_pos for r in readings]) - true_q
    dq = np.array([r.joint_vel for r in readings]) - true_dq
    gyro = np.array([r.gyro for r in readings]) - clean.gyro
    gravity = np.array([rotate_to_body(r.quat, np.array([0.0, 0.0, -1.0])) for r in readings])
    gravity -= rotate_to_body(clean.quat, np.array([0.0, 0.0, -1.0]))
    assert q.std() == pytest.approx(0.01, rel=0.05) and abs(q.mean()) < 0.001
    assert dq.std() == pytest.approx(0.5, rel=0.05)
    assert gyro.std() == pytest.approx(0.05, rel=0.05)
    np.testing.assert_allclose(gravity[:, :2].std(axis=0), 0.02, rtol=0.1)
    assert gravity[:, 2].std() < 0.002  # a tilt moves the horizontal components, to first order
    np.testing.assert_array_equal(sim.joint_states()[0], true_q)
    again = start(sim, task, seed=3).read_state(NO_COMMAND, 0.02)
    np.testing.assert_array_equal(again.joint_pos, readings[0].joint_pos)  # the env's reset seed fixes the noise


def test_joint_offsets_and_gyro_bias_are_drawn_per_reset_and_constant_within(sim):
    task = Task(joint_offset=0.05, gyro_bias=0.1)
    start(sim, task, seed=1)
    offsets = sim.read_state(NO_COMMAND, 0.02).joint_pos - sim.joint_states()[0]
    bias = sim._gyro_bias.copy()
    hold(sim, 5)
    np.testing.assert_allclose(sim.read_state(NO_COMMAND, 0.02).joint_pos - sim.joint_states()[0], offsets)
    start(sim, task, seed=2)
    assert not np.allclose(sim.read_state(NO_COMMAND, 0.02).joint_pos - sim.joint_states()[0], offsets)
    assert not np.allclose(sim._gyro_bias, bias)
    draws = []
    for seed in range(20):
        start(sim, task, seed=seed)
        draws.append(sim._joint_offsets)
    assert np.std(draws) == pytest.approx(0.05, rel=0.15)

    # On the hanger, at rest: the gyro reads the bias; the motors' PD runs on the offset readings, so the
    # *readings* settle where they settle without offsets and the true angles are off by -offset.
    def settled(task: Task) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start(sim, task, seed=2)
        with hanging(sim):
            hold(sim, 40)
            state = sim.read_state(NO_COMMAND, 0.02)
            return state.joint_pos, sim.joint_states()[0], state.gyro

    reading, true, gyro = settled(task)
    offsets, bias = sim._joint_offsets, sim._gyro_bias
    nominal_reading, nominal_true, _ = settled(Task())
    np.testing.assert_allclose(gyro, bias, atol=1e-4)
    np.testing.assert_allclose(reading, nominal_reading, atol=0.005)
    np.testing.assert_allclose(true - nominal_true, -offsets, atol=0.005)
    assert np.abs(offsets).max() > 0.02


# -- pushes -----------------------------------------------------------------------------------------


def test_pushes_add_the_push_speed_every_interval(sim):
    def velocities(task: Task) -> np.ndarray:
        start(sim, task, seed=4)
        result = []
        for _ in range(30):  # 0.15 s in single physics steps
            sim.step(sim.spec.array("default_pose"), sim.spec.kp, sim.spec.kd, substeps=1)
            result.append(sim.client.getBaseVelocity(sim.body)[0])
        return np.array(result)

    calm = velocities(Task())
    pushed = velocities(Task(push_interval_s=0.05, push_velocity=1.0))
    np.testing.assert_array_equal(pushed[:10], calm[:10])  # nothing until t = 0.05 s
    jumps = np.linalg.norm((pushed - calm)[:, :2], axis=1)
    assert jumps[10] == pytest.approx(1.0, abs=0.1)  # the push lands on the step starting at 0.05 s
    assert jumps[9] == 0.0
    second = np.diff(pushed[:, :2], axis=0)[19]  # the next push, 0.05 s later
    assert np.linalg.norm(second) == pytest.approx(1.0, abs=0.1)
    assert sim._next_push == pytest.approx(0.15)  # pushed at 0.05 and 0.10 s; the next one is due


# -- terrain ----------------------------------------------------------------------------------------


def test_stairs_heightmap_by_hand():
    x, y = grid()
    heights = heightmap(TerrainParams(STAIRS, feature=0.3, step_height=0.1), x, y)
    assert heights.shape == (len(y), len(x)) == (121, 321)  # 6 m x 16 m at 5 cm
    column = {round(value, 2): heights[0, i] for i, value in enumerate(x)}
    assert column[0.0] == column[0.45] == column[-0.45] == 0.0  # the landing
    assert column[0.5] == column[0.75] == pytest.approx(0.1)  # first tread: 0.5 <= |x| < 0.8
    assert column[0.8] == column[-0.8] == pytest.approx(0.2)
    assert column[2.75] == pytest.approx(0.8)  # mid-tread of step 8 = 0.5 + 7.5 * 0.3: top of a flight
    assert column[3.05] == pytest.approx(0.7)  # step 9: going down
    assert np.all(heights == heights[0])  # constant along y
    assert STAIRS_LANDING == 0.5


def test_rough_heightmap_is_seeded_and_bounded():
    x, y = grid()
    first = heightmap(TerrainParams(ROUGH, amplitude=0.1, feature=0.5, seed=3), x, y)
    np.testing.assert_array_equal(first, heightmap(TerrainParams(ROUGH, amplitude=0.1, feature=0.5, seed=3), x, y))
    assert not np.array_equal(first, heightmap(TerrainParams(ROUGH, amplitude=0.1, feature=0.5, seed=4), x, y))
    assert first.min() >= 0.0 and first.max() <= 0.1 and first.std() > 0.015
    # Bumps are `feature` wide: neighbours 5 cm apart differ much less than points 1 m apart.
    assert np.abs(np.diff(first, axis=1)).mean() < 0.3 * np.abs(first[:, 20:] - first[:, :-20]).mean()


def test_terrain_params_ignore_unused_fields_and_flat_equivalents():
    assert TerrainParams.from_task(Task(terrain=1, terrain_amplitude=0.0)) == TerrainParams()
    assert TerrainParams.from_task(Task(terrain=2, slope=0.0, terrain_amplitude=0.1)) == TerrainParams()
    assert TerrainParams.from_task(Task(terrain=3, step_height=0.1, seed=5)) == TerrainParams.from_task(
        Task(terrain=3, step_height=0.1, seed=6, slope=0.2)
    )
    assert TerrainParams.from_task(Task(terrain=1, terrain_amplitude=0.1, seed=5)) != TerrainParams.from_task(
        Task(terrain=1, terrain_amplitude=0.1, seed=6)
    )


def test_rough_terrain_lifts_the_feet_unevenly_and_rebuilds_only_on_change(sim):
    rough = Task(terrain=1, terrain_amplitude=0.08, terrain_feature=0.2, seed=1)
    start(sim, rough)
    assert sim.terrain.heightfield is not None and sim.terrain.bodies == [sim.terrain.heightfield, sim.ground]
    spawn_height = sim.base_position()[2]
    assert spawn_height > sim.spec.base_height + 0.03  # above the highest ground near the spawn point
    hold(sim, 30)
    feet = [sim.client.getLinkState(sim.body, link(sim, f"{leg}_toe"))[0][2] for leg in ("FR", "FL", "RR", "RL")]
    assert min(feet) > 0.02 and np.ptp(feet) > 0.02  # standing on bumps, not on z = 0
    ground = [sim.terrain.height(x, y) for x, y in ((0.5, 0.3), (-1.0, 2.0), (3.0, -1.0))]
    assert len(set(ground)) == 3
    assert sim.terrain.build(TerrainParams.from_task(rough)) is False  # same terrain: nothing to do
    heights, first_spawn = sim.terrain._heights, sim.terrain.spawn_height()
    sim.apply_task(Task(terrain=1, terrain_amplitude=0.08, terrain_feature=0.2, seed=1, friction=0.5))
    assert sim.terrain._heights is heights  # a non-terrain change does not rebuild
    sim.reset()
    assert sim.base_position()[2] == pytest.approx(spawn_height, abs=1e-9)  # reset by the re-saved state
    sim.apply_task(Task(terrain=1, terrain_amplitude=0.08, terrain_feature=0.2, seed=2))
    assert sim.terrain._heights is not heights
    sim.reset()  # spawns above the new terrain
    assert sim.base_position()[2] - spawn_height == pytest.approx(sim.terrain.spawn_height() - first_spawn, abs=1e-9)
    assert [sim.terrain.height(x, y) for x, y in ((0.5, 0.3), (-1.0, 2.0), (3.0, -1.0))] != ground
    start(sim, Task())


def test_back_to_flat_parks_the_heightfield_and_restores_the_nominal_physics(spec, sim):
    start(sim, Task(terrain=3, step_height=0.1))
    assert sim.client.getBasePositionAndOrientation(sim.ground)[0][2] == pytest.approx(-CATCH_DROP)
    assert sim.client.getBasePositionAndOrientation(sim.terrain.heightfield)[0][2] == pytest.approx(MAX_HEIGHT / 2)
    start(sim, Task())
    assert sim.terrain.bodies == [sim.ground]
    assert sim.client.getBasePositionAndOrientation(sim.ground)[0] == (0.0, 0.0, 0.0)
    assert sim.client.getBasePositionAndOrientation(sim.terrain.heightfield)[0][2] < -50
    hold(sim, 20)
    fresh = SimRobot(spec)
    hold(fresh, 20)
    # Only Bullet's solver order differs (one more, parked, static body): agreement to ~1e-7 m after 0.4 s.
    np.testing.assert_allclose(sim.base_position(), fresh.base_position(), atol=1e-5)
    fresh.close()


def test_slope_and_back_re_spawns_exactly(spec, sim):
    robot = SimRobot(spec)
    robot.apply_task(Task(terrain=2, slope=0.2))
    robot.reset()
    assert robot.base_position()[2] > spec.base_height + 0.05
    robot.apply_task(Task())
    robot.reset()
    hold(robot, 20)
    fresh = SimRobot(spec)
    hold(fresh, 20)
    np.testing.assert_array_equal(robot.base_position(), fresh.base_position())
    robot.close()
    fresh.close()


def test_a_robot_stands_one_riser_higher_on_a_tread(sim):
    def stance_height(task: Task, x: float) -> float:
        start(sim, Task())
        height = sim.base_position()[2]  # spawn height above flat ground
        start(sim, task)
        sim.client.resetBasePositionAndOrientation(
            sim.body, [x, 0.0, sim.terrain.height(x, 0.0) + height], [0, 0, 0, 1]
        )
        hold(sim, 40)
        return sim.base_position()[2]

    stairs = Task(terrain=3, step_height=0.1, terrain_feature=1.0)  # first tread: 0.5 <= |x| < 1.5 at 0.1 m
    flat = stance_height(Task(), 1.0)
    assert stance_height(stairs, 1.0) == pytest.approx(flat + 0.1, abs=0.005)
    assert stance_height(stairs, -1.0) == pytest.approx(flat + 0.1, abs=0.005)  # stairs go up both ways
    assert stance_height(stairs, 0.0) == pytest.approx(flat, abs=0.005)  # the landing
    start(sim, Task())


def test_slope_makes_a_passive_robot_slide_downhill(sim):
    start(sim, Task(terrain=2, slope=0.3))
    assert sim.terrain.height(1.0, 0.0) == pytest.approx(math.tan(0.3))
    rotation = np.reshape(
        sim.client.getMatrixFromQuaternion(sim.client.getBasePositionAndOrientation(sim.ground)[1]), (3, 3)
    )
    np.testing.assert_allclose(rotation[:, 2], [-math.sin(0.3), 0.0, math.cos(0.3)], atol=1e-9)  # the plane's normal
    start_x = sim.base_position()[0]
    hold(sim, 50)
    grippy = sim.base_position()[0] - start_x
    start(sim, Task(terrain=2, slope=0.3, friction=0.2))
    hold(sim, 50)
    slippery = sim.base_position()[0] - start_x
    assert slippery < -1.0  # slid more than a metre down in 1 s
    assert slippery < grippy - 0.5
    start(sim, Task())


# -- env and task API -------------------------------------------------------------------------------


def test_env_with_every_knob_runs_resets_deterministically_and_observes_the_task():
    task = Task(
        link_mass_scale=1.2,
        payload_com_x=0.02,
        spinning_friction=0.01,
        rolling_friction=0.01,
        restitution=0.1,
        motor_strength_spread=0.1,
        latency=0.01,
        control_jitter=0.002,
        joint_damping=0.1,
        joint_coulomb=0.2,
        noise_joint_pos=0.005,
        noise_joint_vel=0.1,
        noise_gyro=0.02,
        noise_gravity=0.01,
        joint_offset=0.02,
        gyro_bias=0.02,
        push_interval_s=0.2,
        push_velocity=0.3,
        terrain=1,
        terrain_amplitude=0.03,
        seed=9,
    )
    env = LocomotionEnv("a1", task, episode_seconds=1.0, privileged=True)

    def episode(seed: int) -> np.ndarray:
        obs, _ = env.reset(seed=seed)
        trace = [obs]
        for _ in range(20):
            obs, reward, terminated, truncated, _ = env.step(np.full(12, 0.2))
            assert np.all(np.isfinite(obs)) and math.isfinite(reward)
            trace.append(obs)
        return np.concatenate(trace)

    first = episode(5)
    np.testing.assert_array_equal(episode(5), first)
    assert not np.array_equal(episode(6), first)
    assert env.observation_space.shape == (47 + len(task.vector()),)
    np.testing.assert_array_equal(first[47 : 47 + len(task.vector())], task.vector())
    env.close()

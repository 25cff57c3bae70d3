"""Observation/action mapping and reward (controller/mapping.py), with hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pybullet
import pytest

from controller.mapping import (
    OBSERVATION_LAYOUT,
    LocomotionReward,
    ObservationMapping,
    RobotState,
    rotate_to_body,
    upright,
)
from controller.robot import GaitSpec, RobotSpec, load_robot_spec

IDENTITY = np.array([0.0, 0.0, 0.0, 1.0])


@pytest.fixture(scope="module")
def spec() -> RobotSpec:
    return load_robot_spec("a1")


def axis_angle(axis: list[float], angle: float) -> np.ndarray:
    """Quaternion (x, y, z, w) for a rotation of `angle` about unit `axis`."""
    return np.array([*(np.asarray(axis) * math.sin(angle / 2)), math.cos(angle / 2)])


def make_state(num_joints: int = 12, **changes) -> RobotState:
    values = {
        "joint_pos": np.zeros(num_joints),
        "joint_vel": np.zeros(num_joints),
        "quat": IDENTITY.copy(),
        "gyro": np.zeros(3),
    }
    values.update(changes)
    return RobotState(**values)


# -- frames -----------------------------------------------------------------------------------------


def test_rotate_to_body_matches_pybullet_transpose():
    rng = np.random.default_rng(0)
    for _ in range(50):
        quat = rng.normal(size=4)
        quat /= np.linalg.norm(quat)
        vector = rng.normal(size=3)
        matrix = np.array(pybullet.getMatrixFromQuaternion(quat)).reshape(3, 3)  # body -> world
        np.testing.assert_allclose(rotate_to_body(quat, vector), matrix.T @ vector, atol=1e-12)


def test_rotate_to_body_by_hand():
    # Yaw +90 deg: the body x-axis points along world +y, so world +x is body -y.
    yaw = axis_angle([0, 0, 1], math.pi / 2)
    np.testing.assert_allclose(rotate_to_body(yaw, np.array([1.0, 0.0, 0.0])), [0.0, -1.0, 0.0], atol=1e-15)
    # Roll +90 deg about x: the body y-axis points up, so world -z (gravity) is body -y.
    roll = axis_angle([1, 0, 0], math.pi / 2)
    np.testing.assert_allclose(rotate_to_body(roll, np.array([0.0, 0.0, -1.0])), [0.0, -1.0, 0.0], atol=1e-15)
    np.testing.assert_array_equal(rotate_to_body(IDENTITY, np.array([1.0, 2.0, 3.0])), [1.0, 2.0, 3.0])


def test_upright():
    assert upright(IDENTITY) == 1.0
    assert upright(axis_angle([1, 0, 0], math.pi / 2)) == pytest.approx(0.0, abs=1e-15)
    assert upright(axis_angle([0, 1, 0], math.pi)) == pytest.approx(-1.0)
    assert upright(axis_angle([1, 0, 0], math.pi / 3)) == pytest.approx(0.5)  # cos 60 deg
    assert upright(axis_angle([0, 0, 1], 1.0)) == pytest.approx(1.0)  # yaw does not tilt
    rng = np.random.default_rng(1)
    for _ in range(20):
        quat = rng.normal(size=4)
        quat /= np.linalg.norm(quat)
        matrix = np.array(pybullet.getMatrixFromQuaternion(quat)).reshape(3, 3)
        assert upright(quat) == pytest.approx(matrix[2, 2], abs=1e-12)  # world z of the body z-axis


# -- observations -----------------------------------------------------------------------------------


def test_layout_for_a1(spec):
    mapping = ObservationMapping(spec)
    assert mapping.obs_dim == 47  # 3 + 3 + 12 + 12 + 12 + 3 + 2
    assert mapping.act_dim == 12
    rows = {row["name"]: (row["start"], row["size"], row["scale"]) for row in mapping.layout}
    assert rows == {
        "gravity": (0, 3, 1.0),
        "gyro": (3, 3, 0.25),
        "joint_pos": (6, 12, 1.0),
        "joint_vel": (18, 12, 0.05),
        "last_action": (30, 12, 1.0),
        "command": (42, 3, 1.0),
        "gait_phase": (45, 2, 1.0),
    }
    assert [row["name"] for row in mapping.layout] == [name for name, _, _ in OBSERVATION_LAYOUT]


def test_observe_places_scaled_entries_where_layout_says(spec):
    mapping = ObservationMapping(spec)
    default = spec.array("default_pose")
    joint_offset = np.linspace(-0.3, 0.3, 12)
    joint_vel = np.arange(12, dtype=np.float64)
    state = make_state(
        joint_pos=default + joint_offset,
        joint_vel=joint_vel,
        quat=axis_angle([1, 0, 0], math.pi / 2),
        gyro=np.array([4.0, -8.0, 2.0]),
        command=np.array([0.5, -0.25, 0.125]),
    )
    obs = mapping.observe(state)
    assert obs.dtype == np.float32 and obs.shape == (47,)
    parts = {row["name"]: obs[row["start"] : row["start"] + row["size"]] for row in mapping.layout}
    np.testing.assert_allclose(parts["gravity"], [0.0, -1.0, 0.0], atol=1e-7)  # rolled 90 deg
    np.testing.assert_array_equal(parts["gyro"], [1.0, -2.0, 0.5])  # x 0.25
    np.testing.assert_allclose(parts["joint_pos"], joint_offset, atol=1e-7)  # relative to the default pose
    np.testing.assert_allclose(parts["joint_vel"], 0.05 * joint_vel, rtol=1e-7)
    np.testing.assert_array_equal(parts["last_action"], np.zeros(12))
    np.testing.assert_array_equal(parts["command"], [0.5, -0.25, 0.125])
    np.testing.assert_array_equal(parts["gait_phase"], [0.0, 1.0])  # sin 0, cos 0


def test_observe_upright_gravity_and_last_action(spec):
    mapping = ObservationMapping(spec)
    action = np.linspace(-1.0, 1.0, 12)
    mapping.targets(action)
    obs = mapping.observe(make_state(joint_pos=spec.array("default_pose")))
    np.testing.assert_array_equal(obs[0:3], [0.0, 0.0, -1.0])
    np.testing.assert_array_equal(obs[6:18], np.zeros(12))
    np.testing.assert_array_equal(obs[30:42], action.astype(np.float32))
    # One control step of a 2.5 Hz gait at 50 Hz: phase = 2 pi 2.5 / 50 = pi / 10.
    np.testing.assert_allclose(obs[45:47], [0.30901699, 0.95105652], atol=1e-7)


def test_observe_replaces_nonfinite_readings_by_zero(spec):
    mapping = ObservationMapping(spec)
    joint_vel = np.zeros(12)
    joint_vel[3] = np.inf
    obs = mapping.observe(make_state(joint_vel=joint_vel, gyro=np.array([np.nan, 1.0, 0.0])))
    assert np.all(np.isfinite(obs))
    assert obs[3] == 0.0 and obs[4] == 0.25
    assert obs[18 + 3] == 0.0


def test_observe_without_gait_has_zero_phase(spec):
    mapping = ObservationMapping(spec.replace(gait=GaitSpec()))
    mapping.targets(np.zeros(12))
    obs = mapping.observe(make_state())
    np.testing.assert_array_equal(obs[45:47], [0.0, 0.0])


def test_layout_hash_tracks_meaning(spec):
    base = ObservationMapping(spec).layout_hash
    assert base == ObservationMapping(load_robot_spec("a1")).layout_hash
    moved = list(spec.default_pose)
    moved[0] = 0.1
    assert ObservationMapping(spec.replace(default_pose=moved)).layout_hash != base
    assert ObservationMapping(spec.replace(control_rate_hz=100.0)).layout_hash != base


# -- actions ----------------------------------------------------------------------------------------


def test_targets_zero_action_follows_gait_by_hand(spec):
    mapping = ObservationMapping(spec)
    targets = mapping.targets(np.zeros(12))
    # Step 0, phase 0. Legs FR, RL have offset 0; FL, RR offset pi.
    # thigh: 0.9 + 0.3 cos(phi); calf: -1.8 - 0.5 max(0, sin(phi)) = -1.8 at phi in {0, pi}.
    expected = np.array([0.0, 1.2, -1.8, 0.0, 0.6, -1.8, 0.0, 0.6, -1.8, 0.0, 1.2, -1.8])
    np.testing.assert_allclose(targets, expected, atol=1e-12)
    assert mapping.step_count == 1
    # Quarter period later (step 5 of 20 per cycle, phi = pi/2): FR calf lifts by 0.5, FL calf not.
    for _ in range(4):
        mapping.targets(np.zeros(12))
    assert mapping.phase() == pytest.approx(math.pi / 2)
    targets = mapping.targets(np.zeros(12))
    assert targets[1] == pytest.approx(0.9) and targets[2] == pytest.approx(-2.3)
    assert targets[4] == pytest.approx(0.9) and targets[5] == pytest.approx(-1.8)
    assert mapping.step_count == 6


def test_targets_scale_and_clip_to_limits(spec):
    flat = spec.replace(gait=GaitSpec())
    mapping = ObservationMapping(flat)
    action = np.zeros(12)
    action[0], action[1] = 0.5, -3.0  # the -3 is clipped to -1 first
    targets = mapping.targets(action)
    assert targets[0] == pytest.approx(0.1)  # 0 + 0.2 * 0.5
    assert targets[1] == pytest.approx(0.7)  # 0.9 + 0.2 * (-1)
    np.testing.assert_array_equal(mapping.last_action[:2], [0.5, -1.0])
    # A large action scale pushes the targets past the joint limits, which clip them.
    wide = ObservationMapping(flat.replace(action_scale=2.0))
    targets = wide.targets(np.array([1.0, 1.0, -1.0] * 4))
    np.testing.assert_allclose(targets[:3], [0.8, 2.9, -2.69])  # hip upper 0.8, calf lower -2.69
    assert np.all(targets >= flat.array("joint_lower")) and np.all(targets <= flat.array("joint_upper"))


def test_targets_replace_nonfinite_actions_and_count_them(spec):
    mapping = ObservationMapping(spec)
    reference = ObservationMapping(spec)
    for bad in (np.nan, np.inf, -np.inf):
        action = np.full(12, 0.5)
        action[7] = bad
        targets = mapping.targets(action)
        np.testing.assert_array_equal(targets, reference.targets(np.zeros(12)))
        assert np.all(np.isfinite(targets))
        np.testing.assert_array_equal(mapping.last_action, np.zeros(12))
    assert mapping.nonfinite_actions == 3
    assert mapping.step_count == 3  # the gait keeps going
    mapping.targets(np.zeros(12))
    assert mapping.nonfinite_actions == 3


def test_reset_restarts_phase_and_last_action(spec):
    mapping = ObservationMapping(spec)
    first = mapping.targets(np.full(12, 0.3))
    mapping.targets(np.full(12, 0.3))
    mapping.reset()
    assert mapping.step_count == 0 and mapping.phase() == 0.0
    np.testing.assert_array_equal(mapping.last_action, np.zeros(12))
    np.testing.assert_array_equal(mapping.targets(np.full(12, 0.3)), first)


def test_is_fallen(spec):
    mapping = ObservationMapping(spec)
    assert not mapping.is_fallen(make_state())
    assert mapping.is_fallen(make_state(fallen=True))
    assert not mapping.is_fallen(make_state(quat=axis_angle([1, 0, 0], math.radians(59))))  # cos 59 > 0.5
    assert mapping.is_fallen(make_state(quat=axis_angle([0, 1, 0], math.radians(61))))


# -- reward -----------------------------------------------------------------------------------------


def test_reward_by_hand():
    state = make_state(
        base_vel=np.array([0.5, 0.0, 0.1]),
        command=np.array([1.0, 0.0, 0.0]),
        gyro=np.array([0.1, 0.2, 0.3]),
        joint_torque=np.full(12, 2.0),
    )
    reward = LocomotionReward()(state, np.full(12, 0.5), np.zeros(12))
    # lin: 1.0 exp(-0.25 / 0.25)            = 0.36787944
    # yaw: 0.5 exp(-0.09 / 0.25)            = 0.34883817
    # vz: 0.5 * 0.1^2                        = 0.005
    # tilt: 0.02 * (0.01 + 0.04)             = 0.001
    # rate: 0.02 * 12 * 0.25                 = 0.06
    # torque: 1e-4 * 12 * 4                  = 0.0048
    assert reward == pytest.approx(0.36787944 + 0.34883817 - 0.005 - 0.001 - 0.06 - 0.0048, abs=1e-8)
    assert reward == pytest.approx(0.6459176042, abs=1e-9)


def test_reward_perfect_tracking_and_no_torque_term():
    state = make_state(base_vel=np.array([0.7, -0.1, 0.0]), command=np.array([0.7, -0.1, 0.4]))
    state.gyro = np.array([0.0, 0.0, 0.4])
    assert LocomotionReward()(state, np.zeros(12), np.zeros(12)) == pytest.approx(1.5)  # 1.0 + 0.5
    custom = LocomotionReward(lin_vel=2.0, yaw_rate=0.0)
    assert custom(state, np.ones(12), np.ones(12)) == pytest.approx(2.0)


def test_roll_pitch_round_trip_and_imu_tilt_correction() -> None:
    from controller.mapping import quat_conjugate, quat_from_roll_pitch, quat_multiply, roll_pitch
    from controller.robot import load_robot_spec
    from deploy.messages import Mode, State
    from deploy.robot import RobotEnv
    from deploy.robot_states import Calibration

    for roll, pitch in ((0.03, -0.02), (-0.4, 0.3), (0.0, 0.0)):
        assert np.allclose(roll_pitch(quat_from_roll_pitch(roll, pitch)), (roll, pitch))
    mount = quat_from_roll_pitch(0.03, -0.02)
    assert np.allclose(quat_multiply(mount, quat_conjugate(mount)), [0, 0, 0, 1])
    body_rate = np.array([0.1, -0.2, 0.3])
    spec = load_robot_spec("a1")
    env = RobotEnv("loop://", spec, calibration=Calibration(imu_tilt=np.array([0.03, -0.02])))
    message = State(
        0, 0.0, Mode.DAMPING, 0, spec.default_pose, np.zeros(12), np.zeros(12),
        mount, rotate_to_body(mount, body_rate), np.zeros(3),
    )  # fmt: skip
    state = env.robot_state(message)
    assert np.allclose(state.quat, [0, 0, 0, 1], atol=1e-6)  # a level body reads level again
    assert np.allclose(state.gyro, body_rate, atol=1e-6)

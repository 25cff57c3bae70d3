"""Every shipped robot spec loads, stands, walks open loop and makes a valid Gymnasium env."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from controller.errors import ConfigError
from controller.mapping import upright
from controller.robot import ROBOTS_DIR, GaitSpec, load_robot_spec
from sim.env import LocomotionEnv

ROBOTS = sorted(path.stem for path in ROBOTS_DIR.glob("*.yaml"))


def test_the_three_robots_ship():
    assert {"a1", "laikago", "mini_cheetah"} <= set(ROBOTS)


@pytest.mark.parametrize("robot", ROBOTS)
def test_passes_gymnasium_env_checker(robot):
    env = LocomotionEnv(robot, episode_seconds=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    env.close()
    assert [str(w.message) for w in caught if "infinity" not in str(w.message)] == []


@pytest.mark.parametrize("robot", ROBOTS)
def test_stands_for_two_seconds_on_zero_actions(robot):
    spec = load_robot_spec(robot).replace(gait=GaitSpec())  # no trot: zero actions hold the default pose
    env = LocomotionEnv(spec, episode_seconds=2.0, joint_noise=0.0)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs[:3], [0.0, 0.0, -1.0], atol=1e-6)  # spawned level, in the trunk frame
    heights, terminated, truncated = [], False, False
    while not (terminated or truncated):
        obs, _, terminated, truncated, _ = env.step(np.zeros(spec.num_joints))
        heights.append(env.sim.base_position()[2])
    state = env.state
    env.close()
    assert truncated and not terminated and len(heights) == 100
    assert upright(state.quat) > 0.99
    assert np.ptp(heights[-25:]) < 0.005  # settled, not sagging or bouncing
    assert spec.base_height - 0.1 < np.mean(heights[-25:]) < spec.base_height + 0.05
    assert np.max(np.abs(state.joint_pos - spec.array("default_pose"))) < 0.2  # PD sag under the weight


@pytest.mark.parametrize("robot", ROBOTS)
def test_open_loop_gait_walks_forward(robot):
    spec = load_robot_spec(robot)
    assert spec.gait.frequency_hz > 0
    env = LocomotionEnv(spec, episode_seconds=3.0, joint_noise=0.0)
    env.reset(seed=0)
    speeds, terminated = [], False
    for _ in range(150):
        _, _, terminated, _, _ = env.step(np.zeros(spec.num_joints))
        speeds.append(env.state.base_vel[0])
        assert not terminated
    x = env.sim.base_position()[0]
    env.close()
    assert x > 0.4  # metres forward in 3 s
    assert np.mean(speeds[50:]) > 0.15  # the body-frame forward axis is the walking direction


def test_laikago_spawns_rotated_and_reads_in_the_trunk_frame():
    spec = load_robot_spec("laikago")
    assert spec.base_orientation_rpy == pytest.approx([np.pi / 2, 0.0, np.pi / 2])
    env = LocomotionEnv(spec, episode_seconds=1.0, joint_noise=0.0)
    env.reset(seed=0)
    client, body = env.sim.client, env.sim.body
    urdf_quat = client.getBasePositionAndOrientation(body)[1]
    np.testing.assert_allclose(urdf_quat, client.getQuaternionFromEuler(spec.base_orientation_rpy), atol=1e-9)
    np.testing.assert_allclose(env.state.quat, [0, 0, 0, 1], atol=1e-9)
    client.resetBaseVelocity(body, [0.5, 0.0, 0.0], [0.0, 0.0, 0.3])  # world +x and a yaw rate
    state = env.sim.read_state(np.zeros(3), 0.02)
    env.close()
    np.testing.assert_allclose(state.base_vel, [0.5, 0.0, 0.0], atol=1e-9)  # forward, not sideways
    np.testing.assert_allclose(state.gyro, [0.0, 0.0, 0.3], atol=1e-9)


def test_base_orientation_is_optional_and_keeps_old_fingerprints():
    spec = load_robot_spec("a1")
    assert spec.base_orientation_rpy == [0.0, 0.0, 0.0]
    assert spec.fingerprint() == "52c758382635b59a"  # as before the field existed
    assert spec.replace(base_orientation_rpy=[0.0, 0.0, 0.1]).fingerprint() != spec.fingerprint()
    with pytest.raises(ConfigError, match="base_orientation_rpy"):
        spec.replace(base_orientation_rpy=[0.0, 0.0])

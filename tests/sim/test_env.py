"""Gymnasium locomotion env (sim/env.py): API contract, time limits, falls, live task switching."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from controller.mapping import RobotState
from sim.env import LocomotionEnv
from sim.tasks import Task

ZERO = np.zeros(12)
UPSIDE_DOWN = [1.0, 0.0, 0.0, 0.0]  # 180 deg about x, (x, y, z, w)


@pytest.fixture
def env():
    env = LocomotionEnv("a1", episode_seconds=2.0, joint_noise=0.0)
    yield env
    env.close()


def run_steps(env: LocomotionEnv, num_steps: int, action: np.ndarray = ZERO) -> list[tuple]:
    return [env.step(action) for _ in range(num_steps)]


def standing(env: LocomotionEnv, task: Task, num_steps: int = 50) -> tuple[float, float]:
    """Reset under `task`, hold zero actions; mean base height after settling and max |torque|."""
    env.set_task(task)
    env.reset(seed=0)
    heights, torques = [], []
    for _ in range(num_steps):
        env.step(ZERO)
        heights.append(env.sim.base_position()[2])
        torques.append(np.max(np.abs(env.state.joint_torque)))
    return float(np.mean(heights[20:])), float(np.max(torques))


# -- API --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("privileged", [False, True])
def test_passes_gymnasium_env_checker(privileged):
    env = LocomotionEnv("a1", episode_seconds=1.0, privileged=privileged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    env.close()
    # The only accepted complaint: the observation Box is unbounded (the policy normalizes it).
    unexpected = [str(w.message) for w in caught if "infinity" not in str(w.message)]
    assert unexpected == []


def test_spaces_reset_and_step_values(env):
    assert env.observation_space.shape == (47,)
    assert env.action_space.shape == (12,)
    assert np.all(env.action_space.low == -1.0) and np.all(env.action_space.high == 1.0)
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and obs in env.observation_space
    assert info["task"] == Task().to_dict()
    assert isinstance(env.state, RobotState)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs in env.observation_space
    assert isinstance(reward, float) and np.isfinite(reward)
    assert (terminated, truncated) == (False, False)
    assert info["base_vel"].shape == (3,)
    np.testing.assert_array_equal(env.state.command, [0.5, 0.0, 0.0])  # the task's command_vx


def test_reset_seed_fixes_the_joint_noise():
    env = LocomotionEnv("a1", episode_seconds=1.0, joint_noise=0.05)
    first, _ = env.reset(seed=5)
    run_steps(env, 3)
    again, _ = env.reset(seed=5)
    other, _ = env.reset(seed=6)
    env.close()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.max(np.abs(first[6:18])) <= 0.05  # joint_pos - default within the noise


def test_privileged_observation_appends_the_task():
    env = LocomotionEnv("a1", episode_seconds=1.0, privileged=True)
    task = Task(friction=0.4, added_mass=1.5, command_vx=0.25)
    obs, _ = env.reset(seed=0, options={"task": task})
    env.close()
    assert obs.shape == (47 + len(Task().vector()),)
    np.testing.assert_array_equal(obs[47:], task.vector())
    np.testing.assert_array_equal(
        obs[47:53], np.float32([0.4, 1.5, 1.0, 1.0, 1.0, 0.25])
    )  # the original six lead, in order
    assert obs[42] == np.float32(0.25)  # the command entry follows the task too


# -- episode end ------------------------------------------------------------------------------------


def test_time_limit_truncates_without_terminating():
    env = LocomotionEnv("a1", episode_seconds=1.0, joint_noise=0.0)
    assert env.max_steps == 50  # 1 s at 50 Hz
    env.reset(seed=0)
    results = run_steps(env, 50)
    env.close()
    flags = [(terminated, truncated) for _, _, terminated, truncated, _ in results]
    assert flags[:49] == [(False, False)] * 49
    assert flags[49] == (False, True)


def test_collapse_terminates():
    env = LocomotionEnv("a1", episode_seconds=5.0, joint_noise=0.0)
    env.set_task(Task(motor_strength=0.05, kp_scale=0.05))  # legs too weak to carry the trunk
    env.reset(seed=0)
    num_steps, terminated, truncated = 0, False, False
    while not (terminated or truncated):
        _, _, terminated, truncated, _ = env.step(ZERO)
        num_steps += 1
    state = env.state
    env.close()
    assert terminated and not truncated
    assert num_steps < 100  # well before the 250-step time limit
    assert state.fallen  # the trunk touches the ground


def test_tipping_over_terminates_even_at_the_time_limit():
    env = LocomotionEnv("a1", episode_seconds=0.02, joint_noise=0.0)  # a single control step
    env.reset(seed=0)
    env.sim.client.resetBasePositionAndOrientation(env.sim.body, [0, 0, 0.5], UPSIDE_DOWN)
    _, _, terminated, truncated, _ = env.step(ZERO)
    env.close()
    assert (terminated, truncated) == (True, False)  # a fall is not a time-out: no bootstrapping


# -- tasks on a live env ----------------------------------------------------------------------------


def test_set_task_applies_now_and_survives_reset(env):
    env.reset(seed=0)
    run_steps(env, 5)
    task = Task(friction=0.1, added_mass=3.0)
    env.set_task(task)  # no reset: the running world changes
    client, sim = env.sim.client, env.sim
    assert env.get_task() == task
    assert client.getDynamicsInfo(sim.ground, -1)[1] == pytest.approx(0.1)
    assert client.getDynamicsInfo(sim.body, -1)[0] == pytest.approx(sim.base_mass + 3.0)
    env.reset(seed=1)
    assert env.get_task() == task
    assert client.getDynamicsInfo(sim.ground, -1)[1] == pytest.approx(0.1)
    assert client.getDynamicsInfo(sim.body, -1)[0] == pytest.approx(sim.base_mass + 3.0)
    env.reset(seed=1, options={"task": Task()})
    assert client.getDynamicsInfo(sim.body, -1)[0] == pytest.approx(sim.base_mass)


def test_low_friction_slides_further_after_a_push(env):
    def slide(friction: float) -> float:
        env.set_task(Task(friction=friction))
        env.reset(seed=0)
        run_steps(env, 10)  # settle on the feet
        start = env.sim.base_position()
        env.sim.client.resetBaseVelocity(env.sim.body, [0.0, 1.5, 0.0], [0.0, 0.0, 0.0])  # sideways shove
        run_steps(env, 25)
        return float(env.sim.base_position()[1] - start[1])

    icy, grippy = slide(0.1), slide(1.0)
    assert icy > grippy + 0.1


def test_added_mass_changes_base_mass_and_lowers_stance(env):
    nominal_height, _ = standing(env, Task())
    assert env.sim.client.getDynamicsInfo(env.sim.body, -1)[0] == pytest.approx(env.sim.base_mass)
    loaded_height, _ = standing(env, Task(added_mass=10.0))
    assert env.sim.client.getDynamicsInfo(env.sim.body, -1)[0] == pytest.approx(env.sim.base_mass + 10.0)
    assert loaded_height < nominal_height - 0.01


def test_motor_strength_lowers_the_torque_reached(env):
    _, nominal_torque = standing(env, Task())
    weak_height, weak_torque = standing(env, Task(motor_strength=0.3))
    np.testing.assert_array_equal(env.sim.last_torque, env.state.joint_torque)
    # tau = strength * clip(PD, -limit, limit): never above 0.3 * 33.5 N m.
    assert weak_torque <= 0.3 * 33.5 + 1e-9
    assert nominal_torque > 15.0
    assert weak_torque < 0.6 * nominal_torque


def test_kp_scale_changes_the_sag(env):
    soft, _ = standing(env, Task(kp_scale=0.5))
    nominal, _ = standing(env, Task())
    stiff, _ = standing(env, Task(kp_scale=2.0))
    assert soft < nominal - 0.01
    assert stiff > nominal + 0.01


def test_a_reset_robot_does_not_read_as_fallen_from_before_the_reset():
    """restoreState keeps the last step's contact points: a collapsed robot, reset to its stance, read as
    fallen until the next step (the emulator's held robot reported it to the host after a Reset)."""
    env = LocomotionEnv("a1", Task(friction=0.2), episode_seconds=10.0)
    try:
        env.reset(seed=0)
        robot, spec = env.sim, env.sim.spec
        damping = np.full(spec.num_joints, spec.damping_kd)
        for _ in range(100):  # motors damping only: the trunk comes down onto the ground
            robot.step(np.zeros(spec.num_joints), np.zeros(spec.num_joints), damping)
        assert robot.trunk_on_ground()
        env.reset(seed=1)
        assert not robot.trunk_on_ground() and not env.state.fallen
    finally:
        env.close()

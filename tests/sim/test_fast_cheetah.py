"""Fast half-cheetah velocity task (sim/fast_cheetah.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from controller.errors import ConfigError
from sim.fast_cheetah import CheetahTask, CheetahTaskDistribution, HalfCheetahVelEnv

# An open-loop gait that runs forward (~4.5 m in 80 steps) on the nominal cheetah: found by a random search over
# sine phases at period 13 steps. Any change of the dynamics below moves it less far.
GAIT_PERIOD = 13
GAIT_PHASES = np.array([0.29, 2.82, 2.19, 4.5, 2.52, 3.07])


def _gait(num_steps: int) -> np.ndarray:
    steps = np.arange(num_steps)[:, None]
    return np.sin(2 * np.pi * steps / GAIT_PERIOD + GAIT_PHASES)


def _rollout(env: HalfCheetahVelEnv, actions: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    obs, _ = env.reset(seed=seed)
    observations, rewards, infos = [obs], [], []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        infos.append(info)
        assert not terminated
    return np.array(observations), np.array(rewards), infos


@pytest.fixture
def env():
    env = HalfCheetahVelEnv(reset_noise=0.0)
    yield env
    env.close()


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is")  # unbounded by design
@pytest.mark.parametrize("privileged", [False, True])
def test_check_env(privileged):
    task = CheetahTask(target_velocity=2.0, mass_scale=1.2, friction=0.5, motor_strength=0.9)
    env = HalfCheetahVelEnv(task, privileged=privileged)
    try:
        check_env(env, skip_render_check=True)
        obs, info = env.reset(seed=0)
        assert obs.shape == env.observation_space.shape == ((21,) if privileged else (17,))
        assert obs.dtype == np.float32
        assert info["task"] == {"target_velocity": 2.0, "mass_scale": 1.2, "friction": 0.5, "motor_strength": 0.9}
        if privileged:
            np.testing.assert_array_equal(obs[17:], np.array([2.0, 1.2, 0.5, 0.9], dtype=np.float32))
    finally:
        env.close()


def test_same_seed_same_trajectory_and_truncation():
    env = HalfCheetahVelEnv(max_episode_steps=30)  # with reset noise
    actions = np.random.default_rng(0).uniform(-1, 1, size=(30, 6))
    try:
        first = _rollout(env, actions, seed=3)
        env.set_task(CheetahTask(mass_scale=2.0))  # a different task in between must leave no trace
        _rollout(env, actions, seed=3)
        env.set_task(CheetahTask())
        second = _rollout(env, actions, seed=3)
        other = _rollout(env, actions, seed=4)
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
        assert not np.array_equal(first[0][0], other[0][0])  # the reset noise depends on the seed
        env.reset(seed=0)
        flags = [env.step(np.zeros(6))[3] for _ in range(30)]
        assert flags == [False] * 29 + [True]
    finally:
        env.close()


def test_each_dynamics_parameter_changes_the_run(env):
    gait = _gait(80)

    def distance(task: CheetahTask) -> float:
        env.set_task(task)
        return _rollout(env, gait, seed=0)[2][-1]["x"]

    nominal = distance(CheetahTask())
    assert nominal > 3.0  # the gait runs forward
    assert distance(CheetahTask(mass_scale=2.0)) < 0.5 * nominal  # heavier: slower for the same actions
    assert distance(CheetahTask(friction=0.1)) < 0.5 * nominal  # slippery: the feet slide
    assert distance(CheetahTask(motor_strength=0.6)) < 0.8 * nominal  # weaker motors: slower
    # A task given through reset options persists; the nominal run repeats exactly after other tasks.
    env.reset(seed=0, options={"task": CheetahTask(mass_scale=2.0)})
    env.reset(seed=1)
    assert env.get_task() == CheetahTask(mass_scale=2.0)
    assert distance(CheetahTask()) == nominal


def test_target_velocity_changes_reward_only(env):
    gait = _gait(40)
    env.set_task(CheetahTask(target_velocity=0.0))
    still_obs, still_rewards, infos = _rollout(env, gait, seed=0)
    env.set_task(CheetahTask(target_velocity=3.0))
    fast_obs, fast_rewards, _ = _rollout(env, gait, seed=0)
    np.testing.assert_array_equal(fast_obs, still_obs)
    # r = -|v - v*| - c |a|^2, with v the mean forward speed over the step
    velocity = np.array([info["velocity"] for info in infos])
    control = 0.05 * np.sum(gait**2, axis=1)
    np.testing.assert_allclose(still_rewards, -np.abs(velocity) - control, rtol=1e-12)
    np.testing.assert_allclose(fast_rewards, -np.abs(velocity - 3.0) - control, rtol=1e-12)
    np.testing.assert_allclose(velocity[1:], np.diff([info["x"] for info in infos]) / env.dt, rtol=1e-9)


def test_task_round_trip_and_errors():
    task = CheetahTask(target_velocity=1.5, mass_scale=0.8, friction=1.1, motor_strength=1.2)
    assert CheetahTask.from_dict(task.to_dict()) == task
    np.testing.assert_array_equal(task.vector(), np.array([1.5, 0.8, 1.1, 1.2], dtype=np.float32))
    for key, value in (("mass_scale", 0.0), ("friction", -0.1), ("motor_strength", 9.0), ("target_velocity", 1e9)):
        with pytest.raises(ConfigError, match=f"task.{key}"):
            CheetahTask(**{key: value})
    with pytest.raises(ConfigError, match="task.mass_scale"):
        CheetahTask(mass_scale=float("nan"))
    with pytest.raises(ConfigError, match="unknown config key 'task.damping'"):
        CheetahTask.from_dict({"damping": 1.0})
    with pytest.raises(ConfigError, match="tasks.gravity"):
        CheetahTaskDistribution.from_dict({"gravity": {"low": 1.0, "high": 2.0}})
    with pytest.raises(ConfigError, match="tasks.mass_scale"):
        CheetahTaskDistribution.from_dict({"mass_scale": {"low": -1.0, "high": 2.0}})
    with pytest.raises(ConfigError, match="tasks.friction"):
        CheetahTaskDistribution.from_dict({"friction": {"low": 2.0, "high": 1.0}})
    with pytest.raises(ConfigError, match="tasks.target_velocity.width"):
        CheetahTaskDistribution.from_dict({"target_velocity": {"low": 0.0, "width": 1.0}})
    with pytest.raises(ConfigError, match="max_episode_steps"):
        HalfCheetahVelEnv(max_episode_steps=0)
    with pytest.raises(ConfigError, match="timestep"):
        HalfCheetahVelEnv(timestep=0.0)
    env = HalfCheetahVelEnv()
    try:
        with pytest.raises(TypeError, match="CheetahTask"):
            env.set_task({"mass_scale": 1.0})
        env.reset(seed=0)
        with pytest.raises(ValueError, match="shape"):
            env.step(np.zeros(5))
        with pytest.raises(ValueError, match="finite"):
            env.step(np.full(6, np.nan))
    finally:
        env.close()


def test_distribution_samples_the_yaml_ranges_reproducibly():
    distribution = CheetahTaskDistribution.from_dict(
        {
            "target_velocity": {"low": 0.0, "high": 3.0},
            "mass_scale": {"low": 0.5, "high": 2.0, "log": True},
            "friction": [0.4, 1.2],
        }
    )
    tasks = distribution.sample_tasks(300, np.random.default_rng(7))
    assert tasks == distribution.sample_tasks(300, np.random.default_rng(7))
    velocity = np.array([t.target_velocity for t in tasks])
    mass = np.array([t.mass_scale for t in tasks])
    assert velocity.min() >= 0.0 and velocity.max() <= 3.0
    assert mass.min() >= 0.5 and mass.max() <= 2.0
    assert 0.35 < np.mean(mass < 1.0) < 0.65  # log-uniform: half below the geometric centre sqrt(0.5 * 2)
    assert {t.friction for t in tasks} == {0.4, 1.2}
    assert {t.motor_strength for t in tasks} == {1.0}  # not named: stays nominal
    assert CheetahTaskDistribution.from_dict(distribution.to_dict()) == distribution
    default = CheetahTaskDistribution.from_dict(None)
    assert set(default.ranges) == {"target_velocity", "mass_scale", "friction", "motor_strength"}
    assert len(default.sample_tasks(3, np.random.default_rng(0))) == 3


def test_steps_per_second(record_property):
    """Reports the speed (no timed assert: CPUs are shared); a fast task runs thousands of steps a second."""
    env = HalfCheetahVelEnv(max_episode_steps=1000)
    try:
        env.reset(seed=0)
        actions = np.random.default_rng(0).uniform(-1, 1, size=(500, 6))
        start = time.perf_counter()
        for action in actions:
            env.step(action)
        steps_per_s = len(actions) / (time.perf_counter() - start)
    finally:
        env.close()
    record_property("steps_per_s", round(steps_per_s))
    print(f"HalfCheetahVelEnv: {steps_per_s:,.0f} steps/s")

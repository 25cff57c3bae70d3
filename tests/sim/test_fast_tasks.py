"""Fast point-navigation task (sim/fast_tasks.py)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from controller.errors import ConfigError
from sim.fast_tasks import PointNavEnv, PointNavTask, PointNavTaskDistribution


def _rollout(env: PointNavEnv, actions: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        assert not terminated
    return np.array(observations), np.array(rewards)


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is")  # unbounded by design
@pytest.mark.parametrize("privileged", [False, True])
def test_check_env(privileged):
    env = PointNavEnv(PointNavTask(0.0, 1.0, 2.0), privileged=privileged)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape == ((7,) if privileged else (4,))
    assert info["task"] == {"goal_x": 0.0, "goal_y": 1.0, "damping": 2.0}
    if privileged:
        np.testing.assert_array_equal(obs[4:], [0.0, 1.0, 2.0])


def test_one_step_by_hand():
    env = PointNavEnv(PointNavTask(goal_x=1.0, goal_y=0.0, damping=2.0), dt=0.1, force_gain=4.0, start_noise=0.0)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(np.array([1.0, -0.5]))
    # v = 0 + 0.1 * (4 * [1, -0.5] - 2 * 0) = [0.4, -0.2]; p = 0.1 * v = [0.04, -0.02]
    np.testing.assert_allclose(obs, [0.04, -0.02, 0.4, -0.2], rtol=1e-6)
    distance = math.hypot(1.0 - 0.04, 0.02)
    assert reward == pytest.approx(-distance - 0.01 * 1.25)
    assert info["distance"] == pytest.approx(distance)
    # Second step with zero action: v = 0.4 * (1 - 0.1 * 2) = 0.32 along x.
    obs, *_ = env.step(np.zeros(2))
    np.testing.assert_allclose(obs[2:], [0.32, -0.16], rtol=1e-6)
    # Out-of-range actions are clipped to [-1, 1].
    env.reset(seed=0)
    clipped, *_ = env.step(np.array([5.0, -5.0]))
    np.testing.assert_allclose(clipped[2:], [0.4, -0.4], rtol=1e-6)


def test_truncates_at_horizon_and_is_deterministic_per_seed():
    env = PointNavEnv(max_episode_steps=5)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(5, 2))
    first = _rollout(env, actions, seed=3)
    second = _rollout(env, actions, seed=3)
    other = _rollout(env, actions, seed=4)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0][0], other[0][0])  # the start jitter depends on the seed
    env.reset(seed=0)
    flags = [env.step(np.zeros(2))[3] for _ in range(5)]
    assert flags == [False, False, False, False, True]


def test_set_task_changes_dynamics_and_reward():
    env = PointNavEnv(start_noise=0.0)
    push = np.tile([1.0, 0.0], (10, 1))
    env.set_task(PointNavTask(goal_x=1.0, goal_y=0.0, damping=0.5))
    slippery_obs, toward = _rollout(env, push, seed=0)
    env.set_task(PointNavTask(goal_x=1.0, goal_y=0.0, damping=4.0))
    sticky_obs, _ = _rollout(env, push, seed=0)
    # Friction: the same pushes carry the point less far on high-damping ground.
    assert sticky_obs[-1, 0] < 0.7 * slippery_obs[-1, 0]
    assert env.get_task().damping == 4.0
    # Goal: pushing toward the goal beats pushing away from it; only the reward changed.
    env.set_task(PointNavTask(goal_x=-1.0, goal_y=0.0, damping=0.5))
    away_obs, away = _rollout(env, push, seed=0)
    np.testing.assert_array_equal(away_obs, slippery_obs)
    assert toward.sum() > away.sum() + 5.0
    # A task given through reset options also persists.
    env.reset(seed=0, options={"task": PointNavTask(0.0, 2.0, 1.0)})
    env.reset(seed=1)
    assert env.get_task() == PointNavTask(0.0, 2.0, 1.0)
    with pytest.raises(TypeError, match="PointNavTask"):
        env.set_task({"goal_x": 1.0})


def test_distribution_samples_on_the_arc_reproducibly():
    distribution = PointNavTaskDistribution(radius_low=0.5, radius_high=1.5, angle_low=0.0, angle_high=math.pi / 2)
    tasks = distribution.sample_tasks(200, np.random.default_rng(7))
    assert tasks == distribution.sample_tasks(200, np.random.default_rng(7))
    radii = np.array([math.hypot(t.goal_x, t.goal_y) for t in tasks])
    angles = np.array([math.atan2(t.goal_y, t.goal_x) for t in tasks])
    damping = np.array([t.damping for t in tasks])
    assert radii.min() >= 0.5 and radii.max() <= 1.5
    assert angles.min() >= 0.0 and angles.max() <= math.pi / 2 + 1e-12
    assert damping.min() >= 0.5 and damping.max() <= 4.0
    # Log-uniform damping: about half the draws fall below the geometric centre sqrt(0.5 * 4).
    assert 0.35 < np.mean(damping < math.sqrt(2.0)) < 0.65
    assert PointNavTaskDistribution.from_dict(distribution.to_dict()) == distribution


def test_task_round_trip_and_errors():
    task = PointNavTask(goal_x=0.5, goal_y=-0.25, damping=3.0)
    assert PointNavTask.from_dict(task.to_dict()) == task
    np.testing.assert_array_equal(task.vector(), np.array([0.5, -0.25, 3.0], dtype=np.float32))
    with pytest.raises(ConfigError, match="damping"):
        PointNavTask(damping=-1.0)
    with pytest.raises(ConfigError, match="goal_x"):
        PointNavTask(goal_x=float("nan"))
    with pytest.raises(ConfigError, match="unknown config key 'task.friction'"):
        PointNavTask.from_dict({"friction": 1.0})
    with pytest.raises(ConfigError, match="angle_low"):
        PointNavTaskDistribution(angle_low=2.0, angle_high=1.0)
    with pytest.raises(ConfigError, match="damping_low"):
        PointNavTaskDistribution(damping_low=0.0)
    with pytest.raises(ConfigError, match="max_episode_steps"):
        PointNavEnv(max_episode_steps=0)


def test_steps_are_fast():
    env = PointNavEnv(max_episode_steps=1000)
    env.reset(seed=0)
    action = np.array([0.3, -0.2])
    start = time.perf_counter()
    for _ in range(1000):
        env.step(action)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"1000 steps took {elapsed:.3f} s"  # thousands of steps per second, even on a busy box

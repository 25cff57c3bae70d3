"""The on-robot adapter's inner step (`deploy.adapt_gradient.adapt_fast_weights`, what `metactl adapt`
runs for MAML, Meta-SGD and the learned optimizer) improves the return on held-out fast tasks.

Each learner is meta-trained on the point task as sim/fast_suite.py's quick budget does (about
10 s), then adapted from K = 5 sampled episodes fed in process as the robot's `Episode`s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from controller.adaptation import Episode
from controller.learners import actor_parameter_names, build_learner
from controller.meta_trainer import MAMLConfig, MAMLTrainer
from controller.policies import GaussianMLPPolicy
from deploy.adapt_gradient import adapt_fast_weights
from sim.fast_tasks import PointNavEnv, PointNavTaskDistribution

TRAIN_TASKS = PointNavTaskDistribution(angle_low=0.0, angle_high=math.pi, damping_low=0.5, damping_high=4.0)
HELD_OUT = PointNavTaskDistribution(angle_low=0.0, angle_high=1.25 * math.pi, damping_low=0.5, damping_high=6.0)


def meta_train(algorithm: str, seed: int = 0):
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(4, 2, hidden=(32, 32), init_log_std=-0.5, normalize=False)
    learner = build_learner(algorithm, policy, step_size=0.02, parameter_names=actor_parameter_names(policy))
    config = MAMLConfig(
        meta_batch_size=8,
        episodes_per_task=10,
        max_episode_steps=PointNavEnv().max_episode_steps,
        outer_learning_rate=3e-3,
        rule_learning_rate={"meta_sgd": 3e-2, "learned_optimizer": 1e-2}.get(algorithm),
        outer_steps=3,
    )
    trainer = MAMLTrainer(learner, PointNavEnv, TRAIN_TASKS.sample_tasks, config, seed=seed)
    trainer.train(30)
    trainer.close()
    return learner, config


def run(env: PointNavEnv, policy: GaussianMLPPolicy, seed: int, rng: np.random.Generator | None) -> Episode:
    """One episode; sampled actions (recorded unclipped, as the robot runtime does) when `rng` is given."""
    episode = Episode()
    obs, _ = env.reset(seed=seed)
    while True:
        with torch.no_grad():
            dist = policy.distribution(torch.as_tensor(obs, dtype=torch.float32))
        action = dist.mean.numpy()
        if rng is not None:
            action = action + dist.stddev.numpy() * rng.standard_normal(action.shape)
        episode.obs.append(np.asarray(obs, np.float32))
        episode.actions.append(action.astype(np.float32))
        obs, reward, terminated, truncated, _ = env.step(np.clip(action, -1.0, 1.0))
        episode.rewards.append(float(reward))
        if terminated or truncated:
            return episode


def with_weights(learner, fast) -> GaussianMLPPolicy:
    from deploy.export_meta import actor_with

    return actor_with(learner, fast)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd", "learned_optimizer"])
def test_inner_step_from_five_episodes_gains_on_held_out_tasks(algorithm: str) -> None:
    learner, config = meta_train(algorithm)
    rng = np.random.default_rng(7)
    tasks = HELD_OUT.sample_tasks(12, rng)
    env = PointNavEnv()
    before, after = [], []
    for index, task in enumerate(tasks):
        env.set_task(task)
        initial = {name: value.detach() for name, value in learner.fast_parameters().items()}
        collected = [run(env, learner.module, 1000 * index + k, rng) for k in range(5)]
        fast, _, stats = adapt_fast_weights(learner, initial, None, collected, config)
        assert stats["inner_steps"] == 1.0
        adapted = with_weights(learner, fast)
        seeds = [10_000 + 1000 * index + e for e in range(3)]
        before.append(np.mean([run(env, learner.module, s, None).total_return for s in seeds]))
        after.append(np.mean([run(env, adapted, s, None).total_return for s in seeds]))
    gain = float(np.mean(after) - np.mean(before))
    print(f"{algorithm}: before {np.mean(before):.2f}, after {np.mean(after):.2f}, gain {gain:.2f}")
    assert gain > 1.0, f"{algorithm}: mean return {np.mean(before):.2f} -> {np.mean(after):.2f}"

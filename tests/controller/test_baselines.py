"""Baselines (controller/baselines.py): domain-randomized PPO, oracle, fine-tune all, fine-tune head."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from controller.baselines import (
    FinetuneConfig,
    HeadTrunkPolicy,
    MultiTaskPPOConfig,
    MultiTaskPPOTrainer,
    Rollout,
    evaluate_adaptation,
    finetune,
    finetune_head,
    ppo_batch,
    run_episodes,
)
from controller.errors import ConfigError
from controller.policies import GaussianMLPPolicy
from controller.ppo import PPOConfig
from sim.fast_tasks import PointNavEnv, PointNavTask, PointNavTaskDistribution

torch.set_num_threads(1)

DISTRIBUTION = PointNavTaskDistribution()
HELD_OUT = DISTRIBUTION.sample_tasks(32, np.random.default_rng(1234))
NUM_ITERATIONS = 80


def _constant_value_policy(value: float) -> GaussianMLPPolicy:
    policy = GaussianMLPPolicy(2, 1, hidden=(4,), normalize=False)
    with torch.no_grad():
        policy.critic[-1].weight.zero_()
        policy.critic[-1].bias.fill_(value)
    return policy


def test_ppo_batch_bootstraps_on_truncation_not_termination():
    policy = _constant_value_policy(2.0)
    obs = np.zeros((2, 2), np.float32)
    rollout = Rollout(
        obs, np.zeros((2, 1), np.float32), np.zeros(2), np.array([1.0, 2.0]), np.zeros(2, np.float32), False
    )
    # gamma 0.5, lam 1, V = 2: delta = [1 + 1 - 2, 2 + 0.5 * 2 - 2] = [0, 1]; A = [0 + 0.5 * 1, 1] = [0.5, 1].
    batch = ppo_batch(policy, [rollout], gamma=0.5, lam=1.0)
    torch.testing.assert_close(batch["advantages"], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(batch["returns"], torch.tensor([2.5, 3.0]))
    rollout.terminated = True  # no bootstrap: delta_1 = 2 - 2 = 0, so A = [0, 0]
    torch.testing.assert_close(ppo_batch(policy, [rollout], 0.5, 1.0)["advantages"], torch.zeros(2))


def test_run_episodes_sets_tasks_and_records_whole_episodes():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(4, 2)
    envs = [PointNavEnv(max_episode_steps=3) for _ in range(2)]
    tasks = [PointNavTask(1.0, 0.0, 1.0), PointNavTask(-1.0, 0.0, 1.0)]
    rollouts = run_episodes(policy, envs, tasks, [0, 1], torch.Generator().manual_seed(0))
    assert [env.get_task() for env in envs] == tasks
    assert [len(rollout.rewards) for rollout in rollouts] == [3, 3] and not rollouts[0].terminated
    assert rollouts[0].obs.shape == (3, 4) and rollouts[0].actions.shape == (3, 2)
    with pytest.raises(ValueError, match="one seed"):
        run_episodes(policy, envs, tasks, [0])


def test_head_trunk_split_and_what_each_finetune_moves():
    torch.manual_seed(0)
    policy = HeadTrunkPolicy(4, 2, hidden=(16, 16))
    assert policy.head_parameter_names() == ["actor.4.weight", "actor.4.bias"]
    obs = torch.randn(5, 4)
    torch.testing.assert_close(policy.head(policy.trunk(policy.normalize(obs))), policy(obs))
    envs = [PointNavEnv(max_episode_steps=10) for _ in range(2)]
    episodes = run_episodes(policy, envs, [PointNavTask(0.0, 1.0, 1.0)] * 2, [0, 1], torch.Generator().manual_seed(0))
    before = {name: value.clone() for name, value in policy.state_dict().items()}
    config = FinetuneConfig(ppo=PPOConfig(learning_rate=1e-2, epochs=2, num_minibatches=1, target_kl=None))
    everything = {name for name, _ in policy.named_parameters()}
    head = {"actor.4.weight", "actor.4.bias"}
    for adapted, expected in (
        (finetune_head(policy, episodes, config), head),
        (finetune(policy, episodes, config), everything),
    ):
        moved = {name for name, value in adapted.state_dict().items() if not torch.equal(value, before[name])}
        assert moved == expected
        assert not moved & {"normalizer.mean", "normalizer.var", "normalizer.count"}
    for name, value in policy.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[name])


def test_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="hidden"):
        HeadTrunkPolicy(4, 2, hidden=())
    with pytest.raises(ConfigError, match="gamma"):
        FinetuneConfig(gamma=1.5)
    with pytest.raises(ConfigError, match="num_envs"):
        MultiTaskPPOConfig(num_envs=0)
    with pytest.raises(ConfigError, match="nope"):
        finetune(HeadTrunkPolicy(4, 2), [], parameter_names=["nope"])


def test_multitask_trainer_resumes_bit_for_bit():
    config = MultiTaskPPOConfig(num_envs=4, ppo=PPOConfig(num_minibatches=2))

    def trainer() -> MultiTaskPPOTrainer:
        torch.manual_seed(0)
        env_fn = functools.partial(PointNavEnv, max_episode_steps=5)
        return MultiTaskPPOTrainer(GaussianMLPPolicy(4, 2), env_fn, DISTRIBUTION.sample_tasks, config, seed=3)

    straight = trainer()
    assert straight.train(2)[-1]["num_updates"] > 0
    first = trainer()
    first.train(1)
    resumed = trainer()
    resumed.load_state_dict(first.state_dict())
    resumed.train(1)
    for name, value in straight.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[name], value), name


def _train(policy: torch.nn.Module, privileged: bool) -> torch.nn.Module:
    config = MultiTaskPPOConfig(num_envs=16, ppo=PPOConfig(learning_rate=1e-3))
    env_fn = functools.partial(PointNavEnv, privileged=privileged)
    MultiTaskPPOTrainer(policy, env_fn, DISTRIBUTION.sample_tasks, config, seed=0).train(NUM_ITERATIONS)
    return policy


@pytest.fixture(scope="module")
def domain_randomized() -> HeadTrunkPolicy:
    torch.manual_seed(0)
    return _train(HeadTrunkPolicy(4, 2), privileged=False)


def _paired(after: np.ndarray, before: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-task difference."""
    difference = after - before
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(len(difference)))


def test_oracle_beats_domain_randomized_at_k0(domain_randomized):
    torch.manual_seed(0)
    oracle = _train(GaussianMLPPolicy(7, 2), privileged=True)
    oracle_returns = evaluate_adaptation(oracle, functools.partial(PointNavEnv, privileged=True), HELD_OUT, 0)
    randomized_returns = evaluate_adaptation(domain_randomized, PointNavEnv, HELD_OUT, 0)
    mean, error = _paired(oracle_returns, randomized_returns)
    report = f"oracle {oracle_returns.mean():.2f}, domain-randomized {randomized_returns.mean():.2f}"
    assert mean - 3.0 * error > 0.0, report


@pytest.mark.parametrize("method", ["all", "head"])
def test_finetuning_with_k_episodes_is_not_worse_than_k0(domain_randomized, method):
    adapt = finetune if method == "all" else finetune_head
    before = evaluate_adaptation(domain_randomized, PointNavEnv, HELD_OUT, 0, num_eval_episodes=2)
    after = evaluate_adaptation(domain_randomized, PointNavEnv, HELD_OUT, 3, num_eval_episodes=2, adapt=adapt)
    mean, error = _paired(after, before)
    # Not worse: the paired one-sided 97.5% bound on the change stays above 0.
    assert mean + 2.0 * error > 0.0, f"K=0 {before.mean():.2f}, K=3 {after.mean():.2f} ({mean:+.2f} +- {error:.2f})"

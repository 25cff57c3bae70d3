"""MAMLTrainer's env pool (a fixed set of copies switched between tasks), its non-finite guard, and the
Gaussian actor's log-std clamp."""

from __future__ import annotations

import pytest
import torch

from controller.errors import ConfigError
from controller.maml import MAML
from controller.meta_trainer import MAMLConfig, MAMLTrainer
from controller.policies import LOG_STD_RANGE, GaussianMLPPolicy
from sim.fast_tasks import PointNavEnv, PointNavTaskDistribution

DISTRIBUTION = PointNavTaskDistribution()
CONFIG = MAMLConfig(meta_batch_size=3, episodes_per_task=2, max_episode_steps=20, outer_steps=2)


class CountingFactory:
    """Builds point envs and counts them."""

    def __init__(self) -> None:
        self.envs: list[PointNavEnv] = []

    def __call__(self) -> PointNavEnv:
        self.envs.append(PointNavEnv())
        return self.envs[-1]


def _trainer(num_envs: int | None, seed: int = 0, step_size: float = 0.02) -> tuple[MAMLTrainer, CountingFactory]:
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(4, 2, hidden=(16,), normalize=False)
    factory = CountingFactory()
    trainer = MAMLTrainer(
        MAML(policy, step_size), factory, DISTRIBUTION.sample_tasks, CONFIG, seed=seed, num_envs=num_envs
    )
    return trainer, factory


def _parameters(trainer: MAMLTrainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.learner.state_dict().items()}


def test_a_pool_smaller_than_the_batch_builds_only_its_copies_and_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        trainer, factory = _trainer(num_envs=4)  # 3 tasks x 2 episodes = 6 per batch: waves of 4 and 2
        history = trainer.train(2)
        assert len(factory.envs) == 4
        batches, _ = trainer.sample(DISTRIBUTION.sample_tasks(3, trainer.rng), 1)
        assert [episodes.obs.shape[0] for task in batches for episodes in task] == [2] * 6
        runs.append((history, _parameters(trainer)))
        trainer.close()
    (history_a, params_a), (history_b, params_b) = runs
    assert [row["post_return"] for row in history_a] == [row["post_return"] for row in history_b]
    for name, value in params_a.items():
        torch.testing.assert_close(params_b[name], value, rtol=0, atol=0)


def test_a_pool_as_large_as_the_batch_equals_one_copy_per_episode() -> None:
    per_episode, _ = _trainer(num_envs=None)
    pooled, factory = _trainer(num_envs=6)
    expected, got = per_episode.train(2), pooled.train(2)
    assert len(factory.envs) == 6
    assert [row["post_return"] for row in got] == [row["post_return"] for row in expected]
    for name, value in _parameters(per_episode).items():
        torch.testing.assert_close(_parameters(pooled)[name], value, rtol=0, atol=0)


def test_num_envs_must_be_a_positive_int() -> None:
    with pytest.raises(ConfigError, match="num_envs must be a positive int or None, got 0"):
        _trainer(num_envs=0)


def test_a_non_finite_inner_step_names_the_iteration() -> None:
    trainer, _ = _trainer(num_envs=2, step_size=float("inf"))
    with pytest.raises(FloatingPointError, match="meta-iteration 1: the parameters after inner step 0 on task 0"):
        trainer.step()


def test_gaussian_log_std_is_clamped_where_the_distribution_is_built() -> None:
    policy = GaussianMLPPolicy(3, 2, hidden=(4,), normalize=False)
    obs = torch.zeros(5, 3)
    low, high = LOG_STD_RANGE
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([1e6, -1e6]))
    for dist in (policy.distribution(obs), policy._distribution_and_value(obs)[0]):
        torch.testing.assert_close(dist.stddev[0], torch.tensor([high, low]).exp())
    _, entropy, _ = policy.evaluate(obs, torch.zeros(5, 2))
    assert torch.isfinite(entropy).all()
    with torch.no_grad():
        policy.log_std.fill_(-1.0)  # inside the range: unchanged, and the gradient flows
    policy.distribution(obs).log_prob(torch.ones(5, 2)).sum().backward()
    assert policy.log_std.grad is not None and torch.all(policy.log_std.grad != 0)

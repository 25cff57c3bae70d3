from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from controller.errors import ConfigError
from controller.mlsh_policy import MLSHPolicy
from controller.policies import CategoricalMLPPolicy, GaussianMLPPolicy
from controller.ppo import PPOConfig, compute_gae, discount_cumsum, ppo_update


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny networks: intra-op threads only contend on a shared CPU (seen: 6x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Three steps, gamma 0.9, lambda 0.8: step 0 continues, step 1 is truncated (next_values[1] = 4.0
# is V of the final observation, bootstrapped), step 2 terminates (next_values[2] = 7.0 ignored).
#   delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4
#   delta_1 = 2 + 0.9 * 4.0 - 1.0 = 4.6
#   delta_2 = 3 + 0         - 1.5 = 1.5
#   A_2 = 1.5;  A_1 = 4.6 (cut by the truncation: A_2 belongs to the next episode)
#   A_0 = 1.4 + 0.9 * 0.8 * 4.6 = 4.712
#   returns = A + V = [5.212, 5.6, 3.0]
GAE_CASE = {
    "rewards": [1.0, 2.0, 3.0],
    "values": [0.5, 1.0, 1.5],
    "next_values": [1.0, 4.0, 7.0],
    "terminated": [False, False, True],
    "truncated": [False, True, False],
}
GAE_ADVANTAGES = [4.712, 4.6, 1.5]
GAE_RETURNS = [5.212, 5.6, 3.0]


def test_gae_by_hand_numpy() -> None:
    arrays = {key: np.array(value) for key, value in GAE_CASE.items()}
    advantages, returns = compute_gae(**arrays, gamma=0.9, lam=0.8)
    assert isinstance(advantages, np.ndarray)
    np.testing.assert_allclose(advantages, GAE_ADVANTAGES, rtol=1e-12)
    np.testing.assert_allclose(returns, GAE_RETURNS, rtol=1e-12)


def test_gae_by_hand_torch_keeps_type() -> None:
    arrays = {key: torch.tensor(value) for key, value in GAE_CASE.items()}
    advantages, returns = compute_gae(**arrays, gamma=0.9, lam=0.8)
    assert isinstance(advantages, Tensor) and advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, torch.tensor(GAE_ADVANTAGES))
    torch.testing.assert_close(returns, torch.tensor(GAE_RETURNS))


def test_gae_lambda_one_without_dones_is_discounted_return() -> None:
    rewards = np.array([1.0, 2.0, 3.0])
    values = np.array([0.3, -0.2, 0.1])
    next_values = np.array([-0.2, 0.1, 2.0])
    zeros = np.zeros(3)
    advantages, returns = compute_gae(rewards, values, next_values, zeros, zeros, gamma=0.5, lam=1.0)
    # Bootstrapped Monte Carlo return: r_0 + 0.5 r_1 + 0.25 r_2 + 0.125 V(s_3) = 1 + 1 + 0.75 + 0.25
    np.testing.assert_allclose(returns, [3.0, 4.0, 4.0])
    np.testing.assert_allclose(advantages, returns - values)


def test_gae_time_major_columns_are_independent_streams() -> None:
    rng = np.random.default_rng(0)
    arrays = {key: rng.normal(size=(6, 3)) for key in ("rewards", "values", "next_values")}
    arrays["terminated"] = rng.random((6, 3)) < 0.2
    arrays["truncated"] = rng.random((6, 3)) < 0.2
    advantages, returns = compute_gae(**arrays, gamma=0.99, lam=0.95)
    for column in range(3):
        single = compute_gae(**{key: value[:, column] for key, value in arrays.items()}, gamma=0.99, lam=0.95)
        np.testing.assert_allclose(advantages[:, column], single[0])
        np.testing.assert_allclose(returns[:, column], single[1])


def test_gae_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="next_values"):
        compute_gae(np.zeros(3), np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3), 0.9, 0.9)


def test_discount_cumsum_by_hand() -> None:
    # [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3]
    np.testing.assert_allclose(discount_cumsum(np.array([1.0, 2.0, 3.0]), 0.5), [2.75, 3.5, 3.0])
    torch.testing.assert_close(discount_cumsum(torch.tensor([1.0, 2.0, 3.0]), 0.5), torch.tensor([2.75, 3.5, 3.0]))


@pytest.mark.parametrize(
    ("field", "value"),
    [("clip_ratio", 0.0), ("epochs", 0), ("num_minibatches", 2.5), ("target_kl", -1.0), ("value_coef", -0.1)],
)
def test_ppo_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"PPOConfig.{field}"):
        PPOConfig(**{field: value})


class _TableEvaluate(nn.Module):
    """evaluate(obs, actions) whose log-probs and values are free parameters indexed by obs (row ids)."""

    def __init__(self, log_probs: list[float], values: list[float]) -> None:
        super().__init__()
        self.log_probs = nn.Parameter(torch.tensor(log_probs))
        self.values = nn.Parameter(torch.tensor(values))

    def forward(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.log_probs[obs], torch.full(obs.shape, 0.25), self.values[obs]


@pytest.mark.parametrize("value_clip", [None, 0.5])
def test_ppo_update_losses_and_gradients_by_hand(value_clip: float | None) -> None:
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.9])
    table = _TableEvaluate([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0])
    batch = {
        "obs": torch.arange(4),
        "actions": torch.zeros(4),
        "log_probs": -torch.log(ratios),  # ratio = exp(0 - old_log_prob)
        "advantages": torch.tensor([1.0, 1.0, -1.0, -1.0]),
        "returns": torch.tensor([2.0, 2.0, 1.0, -1.0]),
        "values": torch.zeros(4),
    }
    config = PPOConfig(
        epochs=1,
        num_minibatches=1,
        target_kl=None,
        normalize_advantages=False,
        max_grad_norm=None,
        entropy_coef=0.1,
        value_clip=value_clip,
    )
    optimizer = torch.optim.SGD(table.parameters(), lr=1.0)
    stats = ppo_update(table, table.parameters(), optimizer, batch, config)

    # min(r A, clip(r, 0.8, 1.2) A) = [min(1.5, 1.2), min(0.5, 0.8), -1.1, -0.9] = [1.2, 0.5, -1.1, -0.9]
    assert stats["policy_loss"] == pytest.approx(-(1.2 + 0.5 - 1.1 - 0.9) / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)  # |r - 1| > 0.2 for 1.5 and 0.5
    kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.9)) / 4
    assert stats["approx_kl"] == pytest.approx(kl, rel=1e-5)
    assert stats["entropy"] == pytest.approx(0.25)
    assert stats["epochs_run"] == 1.0 and stats["num_updates"] == 1.0
    # Squared errors (V - R)^2 = [1, 0, 1, 1]; with clip 0.5 around V_old = 0 the clipped values are
    # [0.5, 0.5, 0, 0] with errors [2.25, 2.25, 1, 1], and the max is taken per sample.
    assert stats["value_loss"] == pytest.approx(0.75 if value_clip is None else 6.5 / 4)

    # One SGD step of lr 1. Policy: d/dlp of -r A / 4 where unclipped, 0 where the clip is active.
    torch.testing.assert_close(table.log_probs.detach(), torch.tensor([0.0, 0.125, -0.275, -0.225]))
    # Value: V -= 0.5 * d/dV mean((V - R)^2) = (V - R) / 4, or 0 where the saturated clipped error wins.
    expected_values = [1.25, 2.0, 0.25, -0.25] if value_clip is None else [1.0, 2.0, 0.25, -0.25]
    torch.testing.assert_close(table.values.detach(), torch.tensor(expected_values))


def test_ppo_update_validates_batch() -> None:
    table = _TableEvaluate([0.0] * 4, [0.0] * 4)
    optimizer = torch.optim.SGD(table.parameters(), lr=0.1)
    batch = {"obs": torch.arange(4), "actions": torch.zeros(4), "log_probs": torch.zeros(4), "returns": torch.zeros(4)}
    with pytest.raises(ValueError, match="advantages"):
        ppo_update(table, table.parameters(), optimizer, batch, PPOConfig())
    batch["advantages"] = torch.zeros(4)
    with pytest.raises(ValueError, match="values"):
        ppo_update(table, table.parameters(), optimizer, batch, PPOConfig(value_clip=0.2))
    with pytest.raises(ValueError, match="num_minibatches=8"):
        ppo_update(table, table.parameters(), optimizer, batch, PPOConfig(num_minibatches=8))
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        ppo_update(
            lambda obs, act: (table.log_probs[obs], torch.zeros(2), table.values[obs][:, None]),
            table.parameters(),
            optimizer,
            batch,
            PPOConfig(num_minibatches=2),
        )
    batch["returns"] = torch.zeros(3)
    with pytest.raises(ValueError, match="returns"):
        ppo_update(table, table.parameters(), optimizer, batch, PPOConfig())


def _bandit_batch(policy: nn.Module, obs: Tensor, reward_fn, generator: torch.Generator) -> dict[str, Tensor]:
    """One step per episode: returns are the rewards and advantages r - V(s)."""
    with torch.no_grad():
        actions, log_probs, values = policy.act(obs, generator=generator)
    rewards = reward_fn(actions)
    return {"obs": obs, "actions": actions, "log_probs": log_probs, "advantages": rewards - values, "returns": rewards}


def _train_continuous_bandit(seed: int, num_updates: int, target_kl: float | None = 0.02) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = GaussianMLPPolicy(1, 1, hidden=(16,), normalize=False)
    config = PPOConfig(learning_rate=3e-3, target_kl=target_kl)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.learning_rate)
    obs = torch.ones(64, 1)
    for _ in range(num_updates):
        batch = _bandit_batch(policy, obs, lambda actions: -((actions[:, 0] - 0.7) ** 2), generator)
        ppo_update(policy.evaluate, policy.parameters(), optimizer, batch, config, generator)
    return policy


def test_ppo_continuous_bandit_converges_to_best_action() -> None:
    policy = _train_continuous_bandit(seed=0, num_updates=150)
    with torch.no_grad():
        mean = policy(torch.ones(1, 1)).item()
    assert mean == pytest.approx(0.7, abs=0.05)
    assert policy.log_std.item() < -1.0  # exploration shrank from its initial std exp(-1)


def test_ppo_update_is_deterministic_given_generator() -> None:
    first = _train_continuous_bandit(seed=3, num_updates=5)
    second = _train_continuous_bandit(seed=3, num_updates=5)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_ppo_early_stops_on_kl() -> None:
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(1, 1, hidden=(8,), normalize=False)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    generator = torch.Generator().manual_seed(0)
    batch = _bandit_batch(policy, torch.ones(64, 1), lambda actions: -((actions[:, 0] - 0.7) ** 2), generator)
    config = PPOConfig(epochs=5, num_minibatches=4, target_kl=1e-4)
    stats = ppo_update(policy.evaluate, policy.parameters(), optimizer, batch, config, generator)
    # The first minibatch sees ratio 1 (KL 0) and steps; the big step then trips the KL check.
    assert stats["num_updates"] == 1.0 and stats["epochs_run"] == 1.0
    assert stats["approx_kl"] > 0.0


def test_ppo_categorical_bandit_picks_best_arm() -> None:
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(1)
    policy = CategoricalMLPPolicy(1, 3, hidden=(16,), normalize=False)
    config = PPOConfig(learning_rate=3e-3)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.learning_rate)
    arm_means = torch.tensor([0.2, 1.0, 0.5])
    obs = torch.ones(64, 1)
    for _ in range(60):
        batch = _bandit_batch(
            policy, obs, lambda actions: arm_means[actions] + 0.1 * torch.randn(64, generator=generator), generator
        )
        ppo_update(policy.evaluate, policy.parameters(), optimizer, batch, config, generator)
    with torch.no_grad():
        probabilities = torch.softmax(policy(torch.ones(1, 1)), dim=-1)[0]
    assert probabilities.argmax().item() == 1
    assert probabilities[1].item() > 0.9


def test_ppo_trains_mlsh_master_and_one_subpolicy_via_tuple_obs() -> None:
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(2)
    policy = MLSHPolicy(1, 1, num_subpolicies=3, sub_hidden=(8,), master_hidden=(8,))
    for index, sub in enumerate(policy.subpolicies):  # sub-policy k acts around k / 2
        with torch.no_grad():
            sub.actor[-1].bias.fill_(index / 2)
    obs = torch.ones(64, 1)
    config = PPOConfig(learning_rate=1e-2)

    def reward(actions: Tensor) -> Tensor:
        return -((actions[:, 0] - 1.0) ** 2)

    # Master: one macro-step per episode; its reward is what the chosen sub-policy earns.
    master_optimizer = torch.optim.Adam(policy.master.parameters(), lr=config.learning_rate)
    for _ in range(40):
        with torch.no_grad():
            options, log_probs, values = policy.master.act(obs, epsilon=0.1, generator=generator)
            actions, _, _ = policy.sub_act(obs, options, generator=generator)
        rewards = reward(actions)
        batch = {"obs": obs, "actions": options, "log_probs": log_probs, "advantages": rewards - values}
        batch["returns"] = rewards
        ppo_update(policy.master.evaluate, policy.master.parameters(), master_optimizer, batch, config, generator)
    with torch.no_grad():
        assert policy.master(torch.ones(1, 1)).argmax().item() == 2

    # Sub-policies: options travel with the observations, so minibatches keep them aligned.
    before = [[p.detach().clone() for p in sub.parameters()] for sub in policy.subpolicies]
    options = torch.zeros(64, dtype=torch.int64)
    sub_optimizer = torch.optim.Adam(policy.subpolicies.parameters(), lr=config.learning_rate)
    for _ in range(5):
        with torch.no_grad():
            actions, log_probs, values = policy.sub_act(obs, options, generator=generator)
        rewards = reward(actions)
        batch = {"obs": (obs, options), "actions": actions, "log_probs": log_probs, "returns": rewards}
        batch["advantages"] = rewards - values
        ppo_update(
            lambda obs_and_options, act: policy.sub_evaluate(*obs_and_options, act),
            policy.subpolicies.parameters(),
            sub_optimizer,
            batch,
            config,
            generator,
        )
    changed = [
        any(not torch.equal(a, b) for a, b in zip(old, sub.parameters()))
        for old, sub in zip(before, policy.subpolicies)
    ]
    assert changed == [True, False, False]

"""The MLSH trainer's rollout and update fast paths compute what `MLSHPolicy` defines.

Proposed as tests/controller/test_mlsh.py (the trainer's own file has no test module yet).
"""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pytest
import torch

from controller import mlsh, rollout
from controller.mlsh_config import MLSHConfig
from controller.mlsh_policy import MLSHPolicy
from controller.policies import LOG_STD_RANGE
from controller.rundir import RunDir


def _policy(num_subpolicies: int) -> MLSHPolicy:
    torch.manual_seed(0)
    policy = MLSHPolicy(47, 12, num_subpolicies=num_subpolicies, sub_hidden=(64, 64), master_hidden=(32, 32))
    with torch.no_grad():  # away from the init, so every layer and both normalizers matter
        for parameter in policy.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        policy.sub_normalizer.update(torch.randn(500, 47) * 3 + 1)
        policy.master.update_normalizer(torch.randn(500, 47) * 2)
    return policy


def _trainer(policy: MLSHPolicy) -> mlsh.MLSHTrainer:
    import gymnasium as gym

    from sim.env import LocomotionEnv

    envs = gym.vector.SyncVectorEnv(
        [lambda: LocomotionEnv("a1", episode_seconds=0.5)] * 2, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    return mlsh.MLSHTrainer(policy, envs, lambda rng: None, MLSHConfig(), RunDir(tempfile.mkdtemp()), seed=0)


@pytest.mark.parametrize("num_subpolicies", [1, 4])
def test_rollout_networks_match_the_policy(num_subpolicies: int) -> None:
    policy = _policy(num_subpolicies)
    obs, options = torch.randn(300, 47) * 2, torch.randint(num_subpolicies, (300,))
    with torch.inference_mode():
        mean, value = rollout.RolloutNetworks(policy).sub(obs, options.numpy())
    want_mean, _, want_value = policy.sub_act(obs, options, deterministic=True)
    torch.testing.assert_close(mean, want_mean.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value, want_value.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_subpolicies", [1, 4])
def test_sub_evaluate_matches_policy_with_gradients(num_subpolicies: int) -> None:
    policy = _policy(num_subpolicies)
    trainer = object.__new__(mlsh.MLSHTrainer)  # only `policy` is used
    trainer.policy = policy
    obs, options = torch.randn(300, 47) * 2, torch.randint(num_subpolicies, (300,))
    actions = torch.randn(300, 12)
    got = trainer._sub_evaluate((obs, options), actions)
    want = policy.sub_evaluate(obs, options, actions)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    parameters = list(policy.subpolicies.parameters())
    got_grads = torch.autograd.grad(sum(x.sum() for x in got), parameters, allow_unused=True)
    want_grads = torch.autograd.grad(sum(x.sum() for x in want), parameters, allow_unused=True)
    for a, b in zip(got_grads, want_grads):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gaussian_log_prob_by_hand() -> None:
    # One action dim, mean 1, sigma e^0.5, action 2: -0.5 (1 / e^0.5)^2 - 0.5 - 0.5 log(2 pi).
    want = -0.5 * math.exp(-1.0) - 0.5 - 0.5 * math.log(2 * math.pi)
    got = rollout.gaussian_log_prob(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[0.5]]))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_master_choice_frequencies_match_epsilon_greedy_probabilities() -> None:
    policy = _policy(4)
    obs = torch.randn(1, 47).expand(40_000, 47)
    uniforms = np.random.default_rng(0).random((40_000, 3))
    with torch.inference_mode():
        options, log_probs, _ = rollout.RolloutNetworks(policy).choose(obs, uniforms, epsilon=0.1)
    probs = policy.master.distribution(obs[:1]).probs[0].detach().numpy()
    frequencies = np.bincount(options, minlength=4) / len(options)
    np.testing.assert_allclose(frequencies, 0.9 * probs + 0.1 / 4, atol=0.01)  # ~4 standard errors
    np.testing.assert_allclose(log_probs, np.log(probs)[options], rtol=1e-5)


def test_collect_tiles_macro_steps_and_stores_consistent_values() -> None:
    trainer = _trainer(_policy(4))
    obs, _ = trainer.envs.reset(seed=0)
    torch.manual_seed(0)
    _, rollout = trainer._collect(obs, 60)  # 25-step episodes: several ends inside the rollout
    trainer.envs.close()
    decided, closed = rollout["decided"], rollout["closed"]
    assert decided[0].all() and closed[-1].all() and rollout["truncated"][-1].all()
    for e in range(2):
        starts, ends = np.flatnonzero(decided[:, e]), np.flatnonzero(closed[:, e])
        np.testing.assert_array_equal(starts[1:], ends[:-1] + 1)  # macro-steps tile the time axis
        assert np.diff(np.append(starts, 60)).max() <= trainer.macro_steps
        for start, end in zip(starts, ends):  # one option per macro-step
            assert (rollout["option"][start : end + 1, e] == rollout["option"][start, e]).all()
    done = rollout["terminated"] | rollout["truncated"]
    # The last step is flagged truncated for the rollout cut, so its real episode ends are unknown here.
    assert done[:-1].sum() <= len(rollout["finished_returns"]) <= done[:-1].sum() + 2
    # V(next obs) of a step equals V(obs) of the next one when no episode ended and the option is kept.
    keep = ~done[:-1] & (rollout["option"][1:] == rollout["option"][:-1])
    np.testing.assert_allclose(rollout["next_value"][:-1][keep], rollout["value"][1:][keep], rtol=1e-5, atol=1e-5)


def test_a_drifted_sub_policy_log_std_is_clamped_on_every_path() -> None:
    policy = _policy(2)
    low, high = LOG_STD_RANGE
    with torch.no_grad():
        policy.subpolicies[0].log_std.fill_(-1e6)
        policy.subpolicies[1].log_std.fill_(1e6)
    obs, options, actions = torch.randn(40, 47), torch.arange(40) % 2, torch.randn(40, 12)
    trainer = object.__new__(mlsh.MLSHTrainer)  # only `policy` is used
    trainer.policy = policy
    got = trainer._sub_evaluate((obs, options), actions)
    want = policy.sub_evaluate(obs, options, actions)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    bound = torch.where(options[:, None] == 0, low, high).expand(40, 12).exp()
    torch.testing.assert_close(policy._chosen_distribution(obs, options)[0].stddev, bound)
    torch.testing.assert_close(rollout.RolloutNetworks(policy).log_std, torch.tensor([[low] * 12, [high] * 12]))

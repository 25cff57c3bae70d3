from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from torch import nn

from controller.errors import ConfigError
from controller.mlsh_policy import MLSHPolicy
from controller.policies import CategoricalMLPPolicy, GaussianMLPPolicy


def _fit_normalizer(policy_normalizer: nn.Module, obs_dim: int, seed: int = 0) -> None:
    """Give a normalizer statistics far from the prior, so normalizing twice or never would show."""
    generator = torch.Generator().manual_seed(seed)
    policy_normalizer.update(torch.randn(256, obs_dim, generator=generator) * 3.0 + 2.0)


def _set_constant_output(policy: GaussianMLPPolicy, value: float, log_std: float) -> None:
    """Make a Gaussian policy's mean `value` everywhere and its std exp(log_std)."""
    with torch.no_grad():
        policy.actor[-1].weight.zero_()
        policy.actor[-1].bias.fill_(value)
        policy.log_std.fill_(log_std)


def test_gaussian_log_prob_and_entropy_by_hand() -> None:
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(4, 2, hidden=(8, 8))
    _fit_normalizer(policy.normalizer, 4)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-0.5, 0.3]))
    obs = torch.randn(5, 4)
    actions = torch.randn(5, 2)

    # Normalization exactly once: the actor sees (obs - mean) / sqrt(var + 1e-8).
    normalized = (obs - policy.normalizer.mean) / torch.sqrt(policy.normalizer.var + 1e-8)
    mean = policy.actor(normalized)
    torch.testing.assert_close(policy(obs), mean)

    # log N(a; mu, sigma) = -(a - mu)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2, summed over dims.
    sigma = torch.tensor([math.exp(-0.5), math.exp(0.3)])
    by_hand = (-((actions - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_prob, entropy, value = policy.evaluate(obs, actions)
    torch.testing.assert_close(log_prob, by_hand)
    torch.testing.assert_close(log_prob, torch.distributions.Normal(mean, sigma).log_prob(actions).sum(-1))
    # Entropy of a Gaussian: 1/2 + log(2 pi)/2 + log sigma per dim.
    per_dim = 0.5 + 0.5 * math.log(2 * math.pi) + torch.log(sigma)
    torch.testing.assert_close(entropy, per_dim.sum().expand(5))
    torch.testing.assert_close(value, policy.critic(normalized).squeeze(-1))
    torch.testing.assert_close(policy.value(obs), value)
    assert log_prob.shape == entropy.shape == value.shape == (5,)


def test_gaussian_act_is_reproducible_and_consistent() -> None:
    torch.manual_seed(1)
    policy = GaussianMLPPolicy(3, 2)
    obs = torch.randn(6, 3)
    with torch.no_grad():
        first = policy.act(obs, generator=torch.Generator().manual_seed(7))
        second = policy.act(obs, generator=torch.Generator().manual_seed(7))
        deterministic, _, _ = policy.act(obs, deterministic=True)
        log_prob, _, value = policy.evaluate(obs, first[0])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.testing.assert_close(first[1], log_prob)
    torch.testing.assert_close(first[2], value)
    torch.testing.assert_close(deterministic, policy(obs))
    assert not torch.allclose(first[0], deterministic)


def test_gaussian_normalizer_optional_and_updates() -> None:
    policy = GaussianMLPPolicy(2, 1, normalize=False)
    assert policy.normalizer is None
    policy.update_normalizer(torch.randn(10, 2))  # no-op, no error
    normalized = GaussianMLPPolicy(2, 1)
    normalized.update_normalizer(torch.full((10, 2), 3.0))
    assert normalized.normalizer.mean[0].item() == pytest.approx(3.0, rel=1e-4)


def test_configs_rebuild_policies_and_are_plain() -> None:
    for policy in (
        GaussianMLPPolicy(3, 2, hidden=(16,), activation="elu", init_log_std=-0.5, normalize=False),
        CategoricalMLPPolicy(3, 4, hidden=[8, 8], activation="relu"),
        MLSHPolicy(3, 2, num_subpolicies=3, macro_steps=5, sub_hidden=(8,), master_hidden=(4,)),
    ):
        rebuilt = type(policy)(**policy.config)
        rebuilt.load_state_dict(policy.state_dict())
        assert rebuilt.config == policy.config
        assert yaml.safe_load(yaml.safe_dump(policy.config)) == policy.config


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="act_dim"):
        GaussianMLPPolicy(3, 0)
    with pytest.raises(ConfigError, match="valid options"):
        CategoricalMLPPolicy(3, 2, activation="sigmoid")
    with pytest.raises(ConfigError, match="macro_steps"):
        MLSHPolicy(3, 2, macro_steps=0)


def test_categorical_act_evaluate_and_epsilon() -> None:
    torch.manual_seed(2)
    policy = CategoricalMLPPolicy(3, 4)
    _fit_normalizer(policy.normalizer, 3)
    with torch.no_grad():
        policy.actor[-1].bias.copy_(torch.tensor([0.0, 3.0, 0.0, -1.0]))
    obs = torch.randn(2000, 3)
    log_softmax = torch.log_softmax(policy.logits(obs), dim=-1)
    with torch.no_grad():
        greedy, greedy_log_prob, _ = policy.act(obs, deterministic=True)
        sampled, sampled_log_prob, value = policy.act(obs, generator=torch.Generator().manual_seed(0))
        uniform, uniform_log_prob, _ = policy.act(obs, epsilon=1.0, generator=torch.Generator().manual_seed(0))
    assert greedy.dtype == torch.int64 and greedy.shape == (2000,)
    torch.testing.assert_close(greedy, log_softmax.argmax(-1))
    torch.testing.assert_close(sampled_log_prob, log_softmax.gather(-1, sampled[:, None]).squeeze(-1))
    # With epsilon = 1 every choice is uniform, yet log_prob stays the policy's own.
    counts = torch.bincount(uniform, minlength=4).float() / 2000
    assert torch.all((counts - 0.25).abs() < 0.05)
    torch.testing.assert_close(uniform_log_prob, log_softmax.gather(-1, uniform[:, None]).squeeze(-1))
    assert (torch.bincount(sampled, minlength=4).argmax()).item() == 1

    log_prob, entropy, evaluated_value = policy.evaluate(obs, sampled)
    torch.testing.assert_close(log_prob, sampled_log_prob)
    torch.testing.assert_close(entropy, -(log_softmax.exp() * log_softmax).sum(-1))
    torch.testing.assert_close(evaluated_value, value)
    with pytest.raises(ValueError, match="epsilon"):
        policy.act(obs, epsilon=1.5)


def _distinct_mlsh(obs_dim: int = 3, act_dim: int = 2, num_subpolicies: int = 4) -> MLSHPolicy:
    """An MLSH policy whose sub-policy k outputs mean k everywhere with log std -k / 2."""
    torch.manual_seed(3)
    policy = MLSHPolicy(obs_dim, act_dim, num_subpolicies=num_subpolicies, sub_hidden=(8,), master_hidden=(8,))
    for index, sub in enumerate(policy.subpolicies):
        _set_constant_output(sub, float(index), -index / 2)
    _fit_normalizer(policy.master.normalizer, obs_dim, seed=1)
    _fit_normalizer(policy.sub_normalizer, obs_dim, seed=2)
    return policy


def test_mlsh_forward_shapes_and_normalizers() -> None:
    policy = _distinct_mlsh()
    obs = torch.randn(5, 3)
    logits, sub_actions = policy(obs)
    assert logits.shape == (5, 4) and sub_actions.shape == (5, 4, 2)
    torch.testing.assert_close(logits, policy.master.actor(policy.master.normalizer(obs)))
    expected = torch.arange(4.0)[None, :, None].expand(5, 4, 2)
    torch.testing.assert_close(sub_actions, expected)
    assert all(sub.normalizer is None for sub in policy.subpolicies)
    assert policy.master.normalizer is not policy.sub_normalizer


def test_mlsh_sub_act_picks_each_rows_subpolicy() -> None:
    policy = _distinct_mlsh()
    obs = torch.randn(6, 3)
    options = torch.tensor([2, 0, 3, 1, 1, 2])
    with torch.no_grad():
        action, log_prob, value = policy.sub_act(obs, options, deterministic=True)
        sampled, sampled_log_prob, _ = policy.sub_act(obs, options, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(action, options[:, None].float().expand(6, 2))
    # At the mean, log N = -log sigma - log(2 pi)/2 per dim, with log sigma = -k/2.
    torch.testing.assert_close(log_prob, 2 * (options.float() / 2 - 0.5 * math.log(2 * math.pi)))
    normalized = policy.sub_normalizer(obs)
    for row, option in enumerate(options.tolist()):
        sub = policy.subpolicies[option]
        torch.testing.assert_close(value[row], sub.critic(normalized[row]).squeeze(-1))
        expected = torch.distributions.Normal(float(option), math.exp(-option / 2)).log_prob(sampled[row]).sum()
        torch.testing.assert_close(sampled_log_prob[row], expected)
    # Spread of the samples follows the chosen sub-policy's std.
    assert (sampled[1] - 0.0).abs().max() > (sampled[2] - 3.0).abs().max()

    log_prob_again, entropy, value_again = policy.sub_evaluate(obs, options, sampled)
    torch.testing.assert_close(log_prob_again, sampled_log_prob)
    torch.testing.assert_close(value_again, value)
    torch.testing.assert_close(entropy, 2 * (0.5 + 0.5 * math.log(2 * math.pi) - options.float() / 2))


def test_mlsh_sub_evaluate_gradients_reach_only_chosen_subpolicies() -> None:
    policy = _distinct_mlsh()
    obs = torch.randn(4, 3)
    options = torch.tensor([0, 2, 2, 0])
    log_prob, entropy, value = policy.sub_evaluate(obs, options, torch.randn(4, 2))
    (log_prob.sum() + entropy.sum() + value.sum()).backward()
    for index, sub in enumerate(policy.subpolicies):
        gradient = sum(p.grad.abs().sum() for p in sub.parameters() if p.grad is not None)
        assert (gradient > 0) == (index in (0, 2))


def test_mlsh_rejects_bad_options() -> None:
    policy = _distinct_mlsh()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        policy.sub_act(torch.zeros(2, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="leading shape"):
        policy.sub_act(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def test_reset_master_changes_only_the_master() -> None:
    policy = _distinct_mlsh()
    master_before = {key: value.clone() for key, value in policy.master.state_dict().items()}
    rest_before = {key: value.clone() for key, value in policy.state_dict().items() if not key.startswith("master.")}
    policy.reset_master(torch.Generator().manual_seed(0))
    master_after = policy.master.state_dict()
    for key in ("actor.0.weight", "actor.2.weight", "critic.0.weight", "normalizer.mean", "normalizer.count"):
        assert not torch.equal(master_before[key], master_after[key]), key
    assert torch.equal(master_after["normalizer.mean"], torch.zeros(3))
    for key, value in policy.state_dict().items():
        if not key.startswith("master."):
            assert torch.equal(value, rest_before[key]), key
    # Same generator seed, same master.
    other = _distinct_mlsh()
    other.reset_master(torch.Generator().manual_seed(0))
    for key, value in other.master.state_dict().items():
        assert torch.equal(value, master_after[key]), key


def test_master_state_dict_round_trip() -> None:
    policy = _distinct_mlsh()
    saved = policy.master_state_dict()
    assert set(saved) == set(policy.master.state_dict())
    assert all(key.startswith(("actor.", "critic.", "normalizer.")) for key in saved)
    obs = torch.randn(5, 3)
    logits = policy.master(obs).detach()

    policy.reset_master()  # the saved copy must not follow the live weights
    assert not torch.allclose(policy.master(obs), logits)
    policy.load_master_state_dict(saved)
    torch.testing.assert_close(policy.master(obs), logits)

    fresh = MLSHPolicy(**policy.config)
    fresh.load_master_state_dict(saved)
    torch.testing.assert_close(fresh.master(obs), logits)
    with pytest.raises(RuntimeError):
        fresh.load_master_state_dict({key: value for key, value in saved.items() if key != "normalizer.var"})


def _export_and_run(policy: nn.Module, output_names: list[str], path: Path, obs_dim: int) -> list[np.ndarray]:
    """Export with a dynamic batch from a batch-3 example, run a batch of 7 in onnxruntime."""
    policy.eval()
    torch.onnx.export(
        policy,
        (torch.randn(3, obs_dim),),
        str(path),
        dynamo=True,
        external_data=False,
        verbose=False,
        input_names=["obs"],
        output_names=output_names,
        dynamic_shapes={"obs": {0: torch.export.Dim("batch")}},
    )
    onnx.checker.check_model(onnx.load(str(path)))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == ["obs"]
    assert [node.name for node in session.get_outputs()] == output_names
    return session.run(None, {"obs": np.random.default_rng(0).normal(size=(7, obs_dim)).astype(np.float32)})


# torch's own exporter trips a pytree deprecation warning; not ours to fix.
EXPORTER_WARNING = "ignore:.*LeafSpec.*:FutureWarning"


@pytest.mark.filterwarnings(EXPORTER_WARNING)
def test_gaussian_onnx_parity(tmp_path: Path) -> None:
    torch.manual_seed(4)
    policy = GaussianMLPPolicy(5, 3)
    _fit_normalizer(policy.normalizer, 5)
    (action,) = _export_and_run(policy, ["action"], tmp_path / "policy.onnx", 5)
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(action, policy(obs).numpy(), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings(EXPORTER_WARNING)
def test_mlsh_onnx_parity(tmp_path: Path) -> None:
    torch.manual_seed(5)
    policy = MLSHPolicy(5, 3, num_subpolicies=3, sub_hidden=(16, 16), master_hidden=(8,))
    _fit_normalizer(policy.master.normalizer, 5, seed=1)
    _fit_normalizer(policy.sub_normalizer, 5, seed=2)
    logits, sub_actions = _export_and_run(policy, ["master_logits", "sub_actions"], tmp_path / "mlsh.onnx", 5)
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32))
    with torch.no_grad():
        expected_logits, expected_actions = policy(obs)
    assert logits.shape == (7, 3) and sub_actions.shape == (7, 3, 3)
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(sub_actions, expected_actions.numpy(), atol=1e-5, rtol=0)

"""controller/rollout.py: the numpy step path computes what the torch rollout networks compute, and a
rollout segment over some env copies equals those copies' columns of a segment over all of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controller import rollout
from controller.mlsh_policy import MLSHPolicy


def _policy(num_subpolicies: int, activation: str) -> MLSHPolicy:
    torch.manual_seed(0)
    policy = MLSHPolicy(47, 12, num_subpolicies=num_subpolicies, macro_steps=3, activation=activation)
    with torch.no_grad():  # away from the init, so every layer and both normalizers matter
        for parameter in policy.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        policy.sub_normalizer.update(torch.randn(500, 47) * 3 + 1)
        policy.master.update_normalizer(torch.randn(500, 47) * 2)
    return policy


@pytest.mark.parametrize(("num_subpolicies", "activation"), [(1, "tanh"), (4, "tanh"), (3, "elu")])
def test_numpy_step_path_matches_the_torch_networks(num_subpolicies: int, activation: str) -> None:
    policy = _policy(num_subpolicies, activation)
    obs = (torch.randn(300, 47) * 4).numpy()  # some rows beyond the normalizer's clip
    options = np.random.default_rng(0).integers(num_subpolicies, size=300)
    with torch.inference_mode():
        nets = rollout.RolloutNetworks(policy)
        want_mean, want_value = nets.sub(torch.from_numpy(obs), options)
        mean, value = nets.sub_numpy(obs, options)
        np.testing.assert_allclose(mean, want_mean.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(value, want_value.numpy(), rtol=1e-6, atol=1e-7)
        for row in (0, 1, 299):  # one row alone, as a worker process computes it: the same
            one_mean, one_value = nets.sub_numpy(obs[row : row + 1], options[row : row + 1])
            np.testing.assert_array_equal(one_mean[0], mean[row])
            np.testing.assert_array_equal(one_value[0], value[row])
    normalized = nets.sub_normalize_numpy(obs)
    np.testing.assert_array_equal(normalized, policy.sub_normalizer(torch.from_numpy(obs)).detach().numpy())


class _ToyEnvs:
    """E independent toy copies: obs moves by the action; an episode ends after 7 steps (truncated)."""

    def __init__(self, columns: list[int]) -> None:
        self.columns = columns
        self.state = np.stack([np.full(47, 0.1 * c, np.float32) for c in columns])
        self.steps = np.zeros(len(columns), np.int64)

    def step(self, actions: np.ndarray):
        self.state = self.state + 0.05 * np.tanh(actions).repeat(4, axis=1)[:, :47]
        self.steps += 1
        reward = -np.abs(self.state).mean(1).astype(np.float64)
        truncated = self.steps % 7 == 0
        final = {int(e): self.state[e].copy() for e in np.flatnonzero(truncated)}
        self.state[truncated] = 0.0
        return self.state.copy(), reward, np.zeros(len(self.columns), bool), truncated, final


@pytest.mark.parametrize("num_subpolicies", [1, 3])
def test_segment_columns_do_not_depend_on_the_other_copies(num_subpolicies: int) -> None:
    policy = _policy(num_subpolicies, "tanh")
    num_steps, num_envs = 20, 3
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(num_steps, num_envs, 12, generator=generator).numpy()
    uniforms = torch.rand(num_steps, num_envs, 3, dtype=torch.float64, generator=generator).numpy()
    uniforms = uniforms if num_subpolicies > 1 else None
    settings = {"macro_steps": 3, "epsilon": 0.2}

    def segment(columns: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        envs = _ToyEnvs(columns)
        with torch.inference_mode():
            return rollout.collect_segment(
                rollout.RolloutNetworks(policy),
                envs.step,
                envs.state.copy(),
                noise[:, columns],
                None if uniforms is None else uniforms[:, columns],
                np.zeros(len(columns)),
                **settings,
            )

    all_obs, everything = segment(list(range(num_envs)))
    assert np.isfinite(everything["episode_return"]).sum() == 2 * num_envs  # ends at steps 7 and 14
    for column in range(num_envs):
        obs, alone = segment([column])
        np.testing.assert_array_equal(obs[0], all_obs[column])
        for key, value in everything.items():
            np.testing.assert_array_equal(alone[key][:, 0], value[:, column], err_msg=key)

"""Rollout fast path for the MLSH trainer: frozen, fused copies of the networks for acting, and
per-option evaluation that runs each row only through its chosen sub-policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from controller.networks import RunningNormalizer
from controller.policies import MLSHPolicy

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(actions; mean, exp(log_std)) summed over the last (action) dimension: [..., A] -> [...]."""
    # log p = -0.5 ((a - mu) / sigma)^2 - log sigma - 0.5 log(2 pi)
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z.square() - log_std - HALF_LOG_2PI).sum(-1)


def by_option(options: np.ndarray, num_options: int, x: Tensor, fn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """`fn(k, rows)` on the rows of `x` [N, ...] whose option is k, for every k; outputs in row order.

    Runs each sub-policy on its own rows only (K times less work than running all K on all rows);
    gradients reach only the sub-policies that were chosen. `options` [N] is a numpy int array.
    """
    if num_options == 1:
        return fn(0, x)
    counts = np.bincount(options, minlength=num_options)
    if np.count_nonzero(counts) == 1:  # one option for every row: nothing to sort
        return fn(int(options[0]), x)
    order = np.argsort(options, kind="stable")
    parts = [fn(k, rows) for k, rows in enumerate(x[torch.from_numpy(order)].split(counts.tolist())) if counts[k]]
    return torch.cat(parts)[torch.from_numpy(np.argsort(order))]


_INPLACE_ACTIVATIONS: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {nn.Tanh: torch.tanh_, nn.ReLU: torch.relu_}
"""Activations applied in place on the fresh matmul output (any other runs as its module)."""


class FusedMLP:
    """Inference-only copy of an actor MLP and a critic MLP of the same shape as one network.

    The first layers are stacked (both read the same input) and deeper ones are block-diagonal, so
    one matmul per layer gives [..., actor outputs | critic outputs].
    """

    def __init__(self, actor: nn.Sequential, critic: nn.Sequential) -> None:
        self.layers: list[tuple[Tensor, Tensor] | Callable[[Tensor], Tensor]] = []
        for actor_layer, critic_layer in zip(actor, critic, strict=True):
            if type(actor_layer) is not type(critic_layer):
                raise ValueError(f"actor and critic differ: {actor_layer} vs {critic_layer}")
            if not isinstance(actor_layer, nn.Linear):
                # The activation, shared by both halves.
                self.layers.append(_INPLACE_ACTIVATIONS.get(type(actor_layer), actor_layer))
                continue
            weights = (actor_layer.weight.detach(), critic_layer.weight.detach())
            weight = torch.block_diag(*weights) if self.layers else torch.cat(weights)
            bias = torch.cat([actor_layer.bias.detach(), critic_layer.bias.detach()])
            self.layers.append((weight.t().contiguous(), bias))

    def __call__(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.addmm(layer[1], x, layer[0]) if isinstance(layer, tuple) else layer(x)
        return x


def frozen_normalizer(normalizer: RunningNormalizer | None) -> Callable[[Tensor], Tensor]:
    """`normalizer.forward` with sqrt(var + eps) computed once: the statistics only move in `_update`."""
    if normalizer is None:
        return lambda x: x
    mean, std, clip = normalizer.mean.clone(), torch.sqrt(normalizer.var + normalizer.epsilon), normalizer.clip
    return lambda x: (x - mean).div_(std).clamp_(-clip, clip)


class RolloutNetworks:
    """Frozen, fused copies of an MLSH policy's networks for one rollout (build and call under inference mode)."""

    def __init__(self, policy: MLSHPolicy) -> None:
        self.num_options = policy.num_subpolicies
        self.act_dim = policy.act_dim
        self.sub_normalize = frozen_normalizer(policy.sub_normalizer)
        self.subpolicies = [FusedMLP(sub.actor, sub.critic) for sub in policy.subpolicies]
        self.log_std = torch.stack([sub.log_std.detach() for sub in policy.subpolicies])  # [K, act_dim]
        self.master_normalize = frozen_normalizer(policy.master.normalizer)
        self.master = FusedMLP(policy.master.actor, policy.master.critic)

    def sub(self, obs: Tensor, options: np.ndarray) -> tuple[Tensor, Tensor]:
        """Action mean [N, act_dim] and value [N] of each row's sub-policy (options [N] int), for raw
        observations [N, obs_dim]."""
        out = by_option(options, self.num_options, self.sub_normalize(obs), lambda k, x: self.subpolicies[k](x))
        return out[:, : self.act_dim], out[:, self.act_dim]

    def choose(self, obs: Tensor, uniforms: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Epsilon-greedy master choice per row, as `CategoricalMLPPolicy.act(obs, epsilon=epsilon)`.

        Args:
            obs: [N, obs_dim] raw observations.
            uniforms: [N, 3] float64 in [0, 1): inverse-CDF draw, explore draw, uniform-option draw.
            epsilon: Share of choices replaced by a uniformly random option.

        Returns:
            option [N] int64, log_prob [N] of the option under the master's own distribution, value [N].
        """
        out = self.master(self.master_normalize(obs))
        log_probs = torch.log_softmax(out[:, : self.num_options], dim=-1).numpy()
        cdf = np.cumsum(np.exp(log_probs.astype(np.float64)), axis=-1)
        cdf /= cdf[:, -1:]  # exactly 1 at the end, so the inverse CDF stays in range
        sampled = (cdf <= uniforms[:, :1]).sum(-1)
        uniform = np.minimum((uniforms[:, 2] * self.num_options).astype(np.int64), self.num_options - 1)
        option = np.where(uniforms[:, 1] < epsilon, uniform, sampled)
        return option, log_probs[np.arange(len(option)), option], out[:, self.num_options].numpy()

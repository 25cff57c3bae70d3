"""Actor-critic policies that carry their own observation normalizer.

Every public method takes raw observations and normalizes them exactly once inside, so the
exported `forward` graph has the normalizer baked in and callers never normalize themselves.
Sampling methods accept an optional `torch.Generator` for reproducible rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal

from controller.errors import ConfigError
from controller.networks import RunningNormalizer, init_mlp_, mlp

POLICY_OUTPUT_GAIN = 0.01
"""Init gain of action-mean and logit layers: near-zero outputs, so the first policy is unbiased."""

VALUE_OUTPUT_GAIN = 1.0
"""Init gain of value heads."""

LOG_STD_RANGE = (-5.0, 2.0)
"""Range the Gaussian actor's log std is clamped to when it builds a distribution (std 0.0067 .. 7.4), so an
outsized update (an inner gradient step) cannot make the distribution degenerate or infinite."""


def check_positive_int(name: str, value: Any) -> None:
    """Raise `ConfigError` naming `name` unless `value` is an int >= 1 (a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


def gaussian_action(dist: Normal, deterministic: bool, generator: torch.Generator | None) -> Tensor:
    """The distribution's mean, or a sample drawn with `generator` (mean + std * standard normal noise)."""
    if deterministic:
        return dist.mean
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype, device=dist.mean.device)
    return dist.mean + dist.stddev * noise


class GaussianMLPPolicy(nn.Module):
    """Diagonal-Gaussian actor with an MLP mean, a state-independent log std and an MLP critic.

    Attributes:
        config: Constructor keyword arguments as a plain dict; `GaussianMLPPolicy(**config)` rebuilds it.
        normalizer: Observation normalizer, or None when `normalize=False`.
        actor: MLP [..., obs_dim] -> [..., act_dim] action mean.
        critic: MLP [..., obs_dim] -> [..., 1] state value.
        log_std: [act_dim] learnable log standard deviation.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        init_log_std: float = -1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("obs_dim", obs_dim)
        check_positive_int("act_dim", act_dim)
        self.config: dict[str, Any] = {
            "obs_dim": obs_dim,
            "act_dim": act_dim,
            "hidden": list(hidden),
            "activation": activation,
            "init_log_std": float(init_log_std),
            "normalize": bool(normalize),
        }
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.normalizer = RunningNormalizer(obs_dim) if normalize else None
        self.actor = mlp(obs_dim, hidden, act_dim, activation, init_output_gain=POLICY_OUTPUT_GAIN)
        self.critic = mlp(obs_dim, hidden, 1, activation, init_output_gain=VALUE_OUTPUT_GAIN)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def normalize(self, obs: Tensor) -> Tensor:
        """[..., obs_dim] raw -> normalized observations (identity without a normalizer)."""
        return obs if self.normalizer is None else self.normalizer(obs)

    def update_normalizer(self, obs: Tensor) -> None:
        """Merge raw observations [..., obs_dim] into the normalizer statistics (no-op without one)."""
        if self.normalizer is not None:
            self.normalizer.update(obs)

    def _distribution_and_value(self, obs: Tensor) -> tuple[Normal, Tensor]:
        normalized = self.normalize(obs)
        return self._gaussian(self.actor(normalized)), self.critic(normalized).squeeze(-1)

    def clamped_log_std(self) -> Tensor:
        """log_std within LOG_STD_RANGE [act_dim]: what every distribution of this policy uses, so a drifting
        parameter can neither collapse the exploration noise nor blow it up."""
        return self.log_std.clamp(*LOG_STD_RANGE)

    def _gaussian(self, mean: Tensor) -> Normal:
        """N(mean, exp(clamped log_std)) with batch shape of `mean` [..., act_dim]."""
        return Normal(mean, self.clamped_log_std().exp().expand_as(mean))

    def distribution(self, obs: Tensor) -> Normal:
        """The action distribution for raw observations [..., obs_dim]; batch shape [..., act_dim]."""
        return self._gaussian(self.actor(self.normalize(obs)))

    def act(
        self, obs: Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Choose actions. Call under `torch.no_grad()` when collecting rollouts.

        Args:
            obs: [..., obs_dim] raw observations.
            deterministic: Return the mean instead of a sample.
            generator: Random source for the sample.

        Returns:
            action [..., act_dim], log_prob [...] (summed over action dims), value [...].
        """
        dist, value = self._distribution_and_value(obs)
        action = gaussian_action(dist, deterministic, generator)
        return action, dist.log_prob(action).sum(-1), value

    def evaluate(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probability, entropy and value of given actions, differentiable (the PPO `evaluate`).

        Args:
            obs: [..., obs_dim] raw observations.
            actions: [..., act_dim] actions.

        Returns:
            log_prob [...], entropy [...] (both summed over action dims), value [...].
        """
        dist, value = self._distribution_and_value(obs)
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1), value

    def value(self, obs: Tensor) -> Tensor:
        """State values [...] for raw observations [..., obs_dim]."""
        return self.critic(self.normalize(obs)).squeeze(-1)

    def forward(self, obs: Tensor) -> Tensor:
        """Deterministic action (the mean) [..., act_dim] for raw observations; the exported graph."""
        return self.actor(self.normalize(obs))


class CategoricalMLPPolicy(nn.Module):
    """Categorical actor (MLP logits) with an MLP critic; the MLSH master.

    Attributes:
        config: Constructor keyword arguments as a plain dict; `CategoricalMLPPolicy(**config)` rebuilds it.
        normalizer: Observation normalizer, or None when `normalize=False`.
        actor: MLP [..., obs_dim] -> [..., num_actions] logits.
        critic: MLP [..., obs_dim] -> [..., 1] state value.
    """

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden: Sequence[int] = (32, 32),
        activation: str = "tanh",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("obs_dim", obs_dim)
        check_positive_int("num_actions", num_actions)
        self.config: dict[str, Any] = {
            "obs_dim": obs_dim,
            "num_actions": num_actions,
            "hidden": list(hidden),
            "activation": activation,
            "normalize": bool(normalize),
        }
        self.obs_dim = obs_dim
        self.num_actions = num_actions
        self.normalizer = RunningNormalizer(obs_dim) if normalize else None
        self.actor = mlp(obs_dim, hidden, num_actions, activation, init_output_gain=POLICY_OUTPUT_GAIN)
        self.critic = mlp(obs_dim, hidden, 1, activation, init_output_gain=VALUE_OUTPUT_GAIN)

    def normalize(self, obs: Tensor) -> Tensor:
        """[..., obs_dim] raw -> normalized observations (identity without a normalizer)."""
        return obs if self.normalizer is None else self.normalizer(obs)

    def update_normalizer(self, obs: Tensor) -> None:
        """Merge raw observations [..., obs_dim] into the normalizer statistics (no-op without one)."""
        if self.normalizer is not None:
            self.normalizer.update(obs)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize actor and critic weights (as at construction) and reset the normalizer."""
        init_mlp_(self.actor, POLICY_OUTPUT_GAIN, generator)
        init_mlp_(self.critic, VALUE_OUTPUT_GAIN, generator)
        if self.normalizer is not None:
            self.normalizer.reset()

    def logits(self, obs: Tensor) -> Tensor:
        """Unnormalized log-probabilities [..., num_actions] for raw observations [..., obs_dim]."""
        return self.actor(self.normalize(obs))

    def distribution(self, obs: Tensor) -> Categorical:
        """The action distribution for raw observations [..., obs_dim]; batch shape [...]."""
        return Categorical(logits=self.logits(obs))

    def act(
        self,
        obs: Tensor,
        deterministic: bool = False,
        epsilon: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Choose actions, optionally epsilon-greedy. Call under `torch.no_grad()` for rollouts.

        Args:
            obs: [..., obs_dim] raw observations.
            deterministic: Take the most likely action instead of sampling.
            epsilon: Probability, per row, of replacing the choice by a uniformly random one (MLSH
                master exploration); applies in deterministic mode too (epsilon-greedy).
            generator: Random source for sampling and for the epsilon draws.

        Returns:
            action [...] (int64), log_prob [...] under the policy's own distribution, value [...].
        """
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        normalized = self.normalize(obs)
        logits = self.actor(normalized)
        dist = Categorical(logits=logits)
        if deterministic:
            action = logits.argmax(dim=-1)
        else:
            flat = torch.multinomial(dist.probs.reshape(-1, self.num_actions), 1, generator=generator)
            action = flat.reshape(logits.shape[:-1])
        if epsilon > 0.0:
            explore = torch.rand(action.shape, generator=generator, device=action.device) < epsilon
            uniform = torch.randint(
                self.num_actions, action.shape, generator=generator, device=action.device, dtype=action.dtype
            )
            action = torch.where(explore, uniform, action)
        return action, dist.log_prob(action), self.critic(normalized).squeeze(-1)

    def evaluate(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probability, entropy and value of given actions, differentiable (the PPO `evaluate`).

        Args:
            obs: [..., obs_dim] raw observations.
            actions: [...] integer actions.

        Returns:
            log_prob [...], entropy [...], value [...].
        """
        normalized = self.normalize(obs)
        dist = Categorical(logits=self.actor(normalized))
        return dist.log_prob(actions.long()), dist.entropy(), self.critic(normalized).squeeze(-1)

    def value(self, obs: Tensor) -> Tensor:
        """State values [...] for raw observations [..., obs_dim]."""
        return self.critic(self.normalize(obs)).squeeze(-1)

    def forward(self, obs: Tensor) -> Tensor:
        """Logits [..., num_actions] for raw observations; the exported graph."""
        return self.logits(obs)

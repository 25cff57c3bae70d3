"""`MLSHPolicy`: a categorical master over K shared Gaussian sub-policies; its `forward` is the exported graph."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Normal

from controller.networks import RunningNormalizer
from controller.policies import CategoricalMLPPolicy, GaussianMLPPolicy, check_positive_int, gaussian_action


class MLSHPolicy(nn.Module):
    """Meta Learning Shared Hierarchies (Frans et al. 2017): a master over K shared sub-policies.

    The master (categorical over K options, with its own normalizer) picks a sub-policy every
    `macro_steps` control steps and is the only part adapted on a new task; the K Gaussian
    sub-policies share one normalizer and are trained across tasks. Rollout logic (when the master
    acts) belongs to the caller; `macro_steps` is carried here so the policy is self-describing.

    Attributes:
        config: Constructor keyword arguments as a plain dict; `MLSHPolicy(**config)` rebuilds it.
        master: CategoricalMLPPolicy over `num_subpolicies` options.
        sub_normalizer: RunningNormalizer shared by all sub-policies.
        subpolicies: K GaussianMLPPolicy(normalize=False).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        num_subpolicies: int = 4,
        macro_steps: int = 10,
        sub_hidden: Sequence[int] = (64, 64),
        master_hidden: Sequence[int] = (32, 32),
        activation: str = "tanh",
        init_log_std: float = -1.0,
    ) -> None:
        super().__init__()
        check_positive_int("obs_dim", obs_dim)
        check_positive_int("act_dim", act_dim)
        check_positive_int("num_subpolicies", num_subpolicies)
        check_positive_int("macro_steps", macro_steps)
        self.config: dict[str, Any] = {
            "obs_dim": obs_dim,
            "act_dim": act_dim,
            "num_subpolicies": num_subpolicies,
            "macro_steps": macro_steps,
            "sub_hidden": list(sub_hidden),
            "master_hidden": list(master_hidden),
            "activation": activation,
            "init_log_std": float(init_log_std),
        }
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.num_subpolicies = num_subpolicies
        self.macro_steps = macro_steps
        self.master = CategoricalMLPPolicy(obs_dim, num_subpolicies, master_hidden, activation, normalize=True)
        self.sub_normalizer = RunningNormalizer(obs_dim)
        self.subpolicies = nn.ModuleList(
            GaussianMLPPolicy(obs_dim, act_dim, sub_hidden, activation, init_log_std, normalize=False)
            for _ in range(num_subpolicies)
        )

    def reset_master(self, generator: torch.Generator | None = None) -> None:
        """Re-initialize the master's weights and normalizer (start of a new task); sub-policies untouched."""
        self.master.reset_parameters(generator)

    def update_normalizer(self, obs: Tensor, master: bool = True, subpolicies: bool = True) -> None:
        """Merge raw observations [..., obs_dim] into the master and/or shared sub-policy normalizer.

        During adaptation only the master's statistics should move: pass `subpolicies=False`.
        """
        if master:
            self.master.update_normalizer(obs)
        if subpolicies:
            self.sub_normalizer.update(obs)

    def _sub_means(self, normalized: Tensor) -> Tensor:
        """Every sub-policy's action mean [..., K, act_dim] for normalized observations [..., obs_dim]."""
        return torch.stack([sub.actor(normalized) for sub in self.subpolicies], dim=-2)

    def _chosen_distribution(self, obs: Tensor, options: Tensor) -> tuple[Normal, Tensor]:
        """The chosen sub-policy's distribution (batch [..., act_dim]) and value [...] for each row."""
        if options.shape != obs.shape[:-1]:
            raise ValueError(
                f"options must have the observations' leading shape {tuple(obs.shape[:-1])}, got {tuple(options.shape)}"
            )
        options = options.long()
        if options.numel() and (int(options.min()) < 0 or int(options.max()) >= self.num_subpolicies):
            raise ValueError(
                f"options must be in [0, {self.num_subpolicies}), got values in "
                f"[{int(options.min())}, {int(options.max())}]"
            )
        # Small K: compute every sub-policy and gather the chosen one per row.
        normalized = self.sub_normalizer(obs)
        means = self._sub_means(normalized)
        log_stds = torch.stack([sub.clamped_log_std() for sub in self.subpolicies], dim=0)
        values = torch.cat([sub.critic(normalized) for sub in self.subpolicies], dim=-1)
        index = options[..., None, None].expand(*options.shape, 1, self.act_dim)
        mean = means.gather(-2, index).squeeze(-2)
        std = log_stds[options].exp()
        value = values.gather(-1, options[..., None]).squeeze(-1)
        return Normal(mean, std), value

    def sub_act(
        self,
        obs: Tensor,
        option: Tensor,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Act with the sub-policy chosen for each row. Call under `torch.no_grad()` for rollouts.

        Args:
            obs: [..., obs_dim] raw observations.
            option: [...] int64 sub-policy index per row, in [0, num_subpolicies).
            deterministic: Return the chosen sub-policy's mean instead of a sample.
            generator: Random source for the sample.

        Returns:
            action [..., act_dim], log_prob [...] (summed over action dims), value [...] of the
            chosen sub-policy's critic.
        """
        dist, value = self._chosen_distribution(obs, option)
        action = gaussian_action(dist, deterministic, generator)
        return action, dist.log_prob(action).sum(-1), value

    def sub_evaluate(self, obs: Tensor, options: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Differentiable log_prob [...], entropy [...] and value [...] under each row's sub-policy.

        Gradients reach only the sub-policies that were chosen. For `ppo_update`, carry the options
        beside the observations (`batch["obs"] = (obs, options)`) and pass
        `lambda obs, act: policy.sub_evaluate(obs[0], obs[1], act)`. Do not call
        `subpolicies[k].evaluate` on raw observations: it would skip the shared normalizer.

        Args:
            obs: [..., obs_dim] raw observations.
            options: [...] sub-policy index per row.
            actions: [..., act_dim] actions.
        """
        dist, value = self._chosen_distribution(obs, options)
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1), value

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """The exported graph: master logits and every sub-policy's deterministic action.

        Args:
            obs: [..., obs_dim] raw observations (each normalizer applied once inside).

        Returns:
            master_logits [..., K], sub_actions [..., K, act_dim].
        """
        return self.master(obs), self._sub_means(self.sub_normalizer(obs))

    def master_state_dict(self) -> dict[str, Tensor]:
        """A detached copy of the adaptable part: master weights and master normalizer."""
        return {key: value.detach().clone() for key, value in self.master.state_dict().items()}

    def load_master_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the adaptable part saved by `master_state_dict` (strict: keys and shapes must match)."""
        self.master.load_state_dict(state_dict, strict=True)

"""Episode batches of the gradient-based meta-learners (MAML, Meta-SGD, learned optimizer): `Episodes`,
the rollout that samples them, reward-to-go with the linear baseline, and the inner-loop loss shared
by the meta-trainer and the test-time inner step (controller/gradient_adaptation.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Normal

from controller.maml import AdaptedModule, dice_objective

if TYPE_CHECKING:  # only for annotations: controller.meta_trainer imports this module
    from controller.meta_trainer import MAMLConfig


@dataclass
class Episodes:
    """Episodes from one task, padded to a common length T (mask 0 after an episode ended)."""

    obs: Tensor
    """[N, T, obs_dim] observations the actions were chosen on."""
    actions: Tensor
    """[N, T, act_dim] sampled (unclipped) actions."""
    rewards: Tensor
    """[N, T] rewards."""
    log_probs: Tensor
    """[N, T] log-probabilities under the sampling policy."""
    mask: Tensor
    """[N, T] 1 for real steps, 0 for padding."""
    advantages: Tensor | None = None
    """[N, T] advantage estimates, filled by the trainer."""

    def episode_returns(self) -> Tensor:
        """[N] undiscounted return of each episode."""
        return (self.rewards * self.mask).sum(dim=1)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go G_t = r_t + gamma * G_{t+1} within each episode; [N, T] -> [N, T]."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def fit_linear_baseline(obs: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Ridge regression of returns on [o, o^2, t, t^2, t^3, 1] (Duan et al. 2016), t = step / 100.

    Args:
        obs: [N, T, obs_dim]; returns, mask: [N, T].
        reg: Ridge coefficient.

    Returns:
        [N, T] fitted values (0 on padding).
    """
    num_episodes, num_steps, _ = obs.shape
    time = (torch.arange(num_steps, dtype=torch.float64) / 100.0).expand(num_episodes, num_steps)[..., None]
    clipped = obs.to(torch.float64).clamp(-10.0, 10.0)
    features = torch.cat([clipped, clipped.square(), time, time**2, time**3, torch.ones_like(time)], dim=-1)
    valid = mask.bool()
    x, y = features[valid], returns.to(torch.float64)[valid]
    coefficients = torch.linalg.solve(x.T @ x + reg * torch.eye(x.shape[1], dtype=torch.float64), x.T @ y)
    return (features @ coefficients).to(returns.dtype) * mask


DistributionFn = Callable[[Tensor], Normal]
"""Raw observations [n, obs_dim] -> diagonal Gaussian over actions [n, act_dim]."""


def rollout(
    groups: Sequence[tuple[DistributionFn, Sequence[Any]]],
    num_steps: int,
    seeds: Sequence[int],
    generator: torch.Generator | None = None,
    deterministic: bool = False,
) -> list[Episodes]:
    """Run one episode per env, each group of envs with its own policy, in plain Python loops.

    Each step makes one batched policy call per group. Envs keep the task they were given; an
    episode ends at termination, truncation or `num_steps`. Actions are clipped to the action space
    before stepping; the unclipped sample is recorded.

    Args:
        groups: (distribution_fn, envs) pairs, e.g. one per task with that task's adapted policy.
        num_steps: Longest episode length.
        seeds: One reset seed per env, in group order.
        generator: Random source for the action noise.
        deterministic: Take the mean action (log_probs are then those of the mean).

    Returns:
        One `Episodes` per group (advantages unset).
    """
    num_envs = sum(len(envs) for _, envs in groups)
    if len(seeds) != num_envs:
        raise ValueError(f"rollout needs one seed per env: {num_envs} envs, got {len(seeds)} seeds")
    seed_iter = iter(int(seed) for seed in seeds)
    results = []
    for distribution_fn, envs in groups:
        obs_now = np.stack([env.reset(seed=next(seed_iter))[0] for env in envs]).astype(np.float32)
        num_envs, obs_dim = obs_now.shape
        obs = np.zeros((num_envs, num_steps, obs_dim), np.float32)
        actions, rewards = None, np.zeros((num_envs, num_steps))
        log_probs, mask = np.zeros((num_envs, num_steps)), np.zeros((num_envs, num_steps))
        alive = np.ones(num_envs, dtype=bool)
        for t in range(num_steps):
            if not alive.any():
                break
            with torch.no_grad():
                dist = distribution_fn(torch.as_tensor(obs_now))
                if not isinstance(dist, Normal):
                    raise TypeError(f"rollout needs a Normal action distribution, got {type(dist).__name__}")
                if deterministic:
                    action = dist.mean
                else:
                    action = dist.mean + dist.stddev * torch.randn(dist.mean.shape, generator=generator)
                log_prob = dist.log_prob(action).sum(-1).numpy()
            action = action.numpy()
            if actions is None:
                actions = np.zeros((num_envs, num_steps, action.shape[-1]), np.float32)
            clipped = np.clip(action, envs[0].action_space.low, envs[0].action_space.high)  # a group shares a space
            for i in np.flatnonzero(alive):
                next_obs, reward, terminated, truncated, _ = envs[i].step(clipped[i])
                obs[i, t], actions[i, t], rewards[i, t] = obs_now[i], action[i], reward
                log_probs[i, t], mask[i, t] = log_prob[i], 1.0
                obs_now[i] = next_obs
                alive[i] = not (terminated or truncated)
        length = int(mask.sum(axis=0).nonzero()[0].max()) + 1
        results.append(
            Episodes(
                *(torch.as_tensor(array[:, :length], dtype=torch.float32) for array in (obs, actions, rewards)),
                *(torch.as_tensor(array[:, :length], dtype=torch.float32) for array in (log_probs, mask)),
            )
        )
    return results


def standardize(values: Tensor, mask: Tensor) -> Tensor:
    """[N, T] `values` at zero mean and unit (population) std over the real steps of `mask`; 0 on padding."""
    valid = values[mask.bool()]
    return (values - valid.mean()) / (valid.std(correction=0) + 1e-8) * mask


def policy_log_probs(clone: AdaptedModule, episodes: Episodes) -> Tensor:
    """[N, T] differentiable log-probabilities of the recorded actions under the clone's fast weights."""
    return clone.call("distribution", episodes.obs).log_prob(episodes.actions).sum(-1) * episodes.mask


def inner_advantages(episodes: Episodes, config: MAMLConfig) -> Episodes:
    """Fill `episodes.advantages` as the inner loop uses them: reward-to-go minus the linear baseline
    (standardized if `config.normalize_inner_advantages`); returns the same object."""
    returns = discounted_returns(episodes.rewards, episodes.mask, config.gamma)
    advantages = returns - fit_linear_baseline(episodes.obs, returns, episodes.mask, config.baseline_reg)
    episodes.advantages = advantages * episodes.mask
    if config.normalize_inner_advantages:
        episodes.advantages = standardize(advantages, episodes.mask)
    return episodes


def inner_loss(clone: AdaptedModule, episodes: Episodes, config: MAMLConfig) -> Tensor:
    """Negative loaded-DiCE surrogate of `episodes` (advantages filled, sampled by an earlier state of `clone`)."""
    log_probs = policy_log_probs(clone, episodes)
    return -dice_objective(log_probs, episodes.advantages, episodes.mask, episodes.log_probs, config.dice_lambda)

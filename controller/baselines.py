"""Baselines for the meta-test: what a meta-learner has to beat, on the tasks it is handed.

- `MultiTaskPPOTrainer`: domain-randomized PPO, a fresh task per episode, no adaptation (K = 0).
  Given an env with privileged observations (the true task parameters), the same trainer gives
  the oracle of the normalized score.
- `finetune`: transfer learning, PPO on all weights of a copy from the same K episodes.
- `HeadTrunkPolicy` with `finetune_head`: a shared trunk and a per-task head (the last layer);
  only the head is fine-tuned.
- `evaluate_adaptation`: K adaptation episodes, an adapt step, then E deterministic episodes per task.

Nothing here knows a simulator: trainers get an env factory and a task sampler.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from controller.errors import ConfigError
from controller.policies import GaussianMLPPolicy
from controller.ppo import PPOConfig, compute_gae, ppo_update

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One episode of a feed-forward Gaussian policy (T steps)."""

    obs: np.ndarray
    """[T, obs_dim] observations the actions were chosen on."""
    actions: np.ndarray
    """[T, act_dim] sampled (unclipped) actions."""
    log_probs: np.ndarray
    """[T] log-probabilities under the sampling policy."""
    rewards: np.ndarray
    """[T] rewards."""
    last_obs: np.ndarray
    """[obs_dim] observation after the last step (bootstrap value on truncation)."""
    terminated: bool
    """Ended in a terminal state (no bootstrap); otherwise truncated."""

    @property
    def total_return(self) -> float:
        return float(np.sum(self.rewards))


def run_episodes(
    policy: nn.Module,
    envs: Sequence[Any],
    tasks: Sequence[Any] | None,
    seeds: Sequence[int],
    generator: torch.Generator | None = None,
    deterministic: bool = False,
    max_episode_steps: int = 1000,
) -> list[Rollout]:
    """One episode per env, in lockstep with one batched `policy.act` call per step.

    Args:
        policy: Has `act(obs [n, obs_dim], deterministic, generator) -> (action, log_prob, value)`.
        envs: Gymnasium envs; with `tasks`, each is switched by `set_task` (through `get_wrapper_attr`).
        tasks: One task per env, or None to keep each env's current task.
        seeds: One reset seed per env.
        generator: Random source for the action noise.
        deterministic: Act with the mean.
        max_episode_steps: Cap on an episode's length (the env's own truncation usually comes first).
    """
    if len(seeds) != len(envs) or (tasks is not None and len(tasks) != len(envs)):
        raise ValueError(f"run_episodes needs one seed (and task) per env: {len(envs)} envs, {len(seeds)} seeds")
    if tasks is not None:
        for env, task in zip(envs, tasks):
            env.get_wrapper_attr("set_task")(task)
    obs_now = np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)]).astype(np.float32)
    steps: list[list[tuple]] = [[] for _ in envs]
    results: list[Rollout | None] = [None] * len(envs)
    alive = np.ones(len(envs), dtype=bool)
    while alive.any():
        with torch.no_grad():
            action, log_prob, _ = policy.act(torch.as_tensor(obs_now), deterministic, generator)
        action, log_prob = action.numpy(), log_prob.numpy()
        for i in np.flatnonzero(alive):
            space = envs[i].action_space
            next_obs, reward, terminated, truncated, _ = envs[i].step(np.clip(action[i], space.low, space.high))
            steps[i].append((obs_now[i].copy(), action[i], log_prob[i], reward))
            obs_now[i] = next_obs
            if terminated or truncated or len(steps[i]) >= max_episode_steps:
                alive[i] = False
                obs, actions, log_probs, rewards = (np.array(column) for column in zip(*steps[i]))
                results[i] = Rollout(obs, actions, log_probs, rewards.astype(np.float64), obs_now[i].copy(), terminated)
    return results


def ppo_batch(policy: nn.Module, rollouts: Sequence[Rollout], gamma: float, lam: float) -> dict[str, Tensor]:
    """The `ppo_update` batch of whole episodes: GAE with the policy's critic, bootstrapping on truncation."""
    if not rollouts:
        raise ValueError("ppo_batch needs at least one episode")
    obs = torch.as_tensor(np.concatenate([rollout.obs for rollout in rollouts]))
    advantages, returns = [], []
    with torch.no_grad():
        values = policy.value(obs).numpy()
        last_values = policy.value(torch.as_tensor(np.stack([rollout.last_obs for rollout in rollouts]))).numpy()
    start = 0
    for rollout, last_value in zip(rollouts, last_values):
        length = len(rollout.rewards)
        value = values[start : start + length]
        start += length
        terminated, truncated = np.zeros(length), np.zeros(length)
        (terminated if rollout.terminated else truncated)[-1] = 1.0
        next_values = np.append(value[1:], 0.0 if rollout.terminated else last_value)
        advantage, ret = compute_gae(rollout.rewards, value, next_values, terminated, truncated, gamma, lam)
        advantages.append(advantage)
        returns.append(ret)
    return {
        "obs": obs,
        "actions": torch.as_tensor(np.concatenate([rollout.actions for rollout in rollouts])),
        "log_probs": torch.as_tensor(np.concatenate([rollout.log_probs for rollout in rollouts]), dtype=torch.float32),
        "advantages": torch.as_tensor(np.concatenate(advantages), dtype=torch.float32),
        "returns": torch.as_tensor(np.concatenate(returns), dtype=torch.float32),
    }


def _check_unit(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{owner}.{name} must be a number in [0, 1], got {value!r}")


@dataclass
class MultiTaskPPOConfig:
    """Domain-randomized PPO: every episode on a freshly sampled task."""

    num_envs: int = 16
    """Episodes per iteration, run in lockstep, each on its own sampled task."""
    max_episode_steps: int = 1000
    """Cap on an episode's length (the env's own truncation usually comes first)."""
    gamma: float = 0.99
    """Discount per step."""
    lam: float = 0.95
    """GAE lambda."""
    update_normalizer: bool = True
    """Merge each iteration's observations into the policy's normalizer after the update."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The PPO update."""

    def __post_init__(self) -> None:
        for name in ("num_envs", "max_episode_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"MultiTaskPPOConfig.{name} must be a positive int, got {value!r}")
        _check_unit("MultiTaskPPOConfig", "gamma", self.gamma)
        _check_unit("MultiTaskPPOConfig", "lam", self.lam)


class MultiTaskPPOTrainer:
    """Trains a feed-forward Gaussian policy on tasks drawn anew for every episode.

    Args:
        policy: A `GaussianMLPPolicy` (or anything with its `act`/`evaluate`/`value`/`update_normalizer`).
        env_fn: Builds one env with `set_task`; one with privileged observations makes the oracle.
        sample_tasks: (num_tasks, rng) -> tasks, e.g. a task distribution's `sample_tasks`.
        config: Hyperparameters.
        seed: Seeds task draws, env resets, action noise and minibatch shuffles (policy init is the caller's).
    """

    def __init__(
        self,
        policy: nn.Module,
        env_fn: Callable[[], Any],
        sample_tasks: Callable[[int, np.random.Generator], Sequence[Any]],
        config: MultiTaskPPOConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.config = config or MultiTaskPPOConfig()
        self.sample_tasks = sample_tasks
        self.envs = [env_fn() for _ in range(self.config.num_envs)]
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=self.config.ppo.learning_rate)
        self.iteration = 0

    def step(self) -> dict[str, float]:
        """One iteration: a fresh task per env, one episode each, one PPO update; returns statistics."""
        start = time.perf_counter()
        config = self.config
        tasks = self.sample_tasks(config.num_envs, self.rng)
        seeds = self.rng.integers(2**31, size=config.num_envs)
        rollouts = run_episodes(self.policy, self.envs, tasks, seeds, self.generator, False, config.max_episode_steps)
        batch = ppo_batch(self.policy, rollouts, config.gamma, config.lam)
        stats = ppo_update(
            self.policy.evaluate, self.policy.parameters(), self.optimizer, batch, config.ppo, self.generator
        )
        if config.update_normalizer:
            self.policy.update_normalizer(batch["obs"])
        self.iteration += 1
        stats.update(iteration=float(self.iteration), mean_return=float(np.mean([r.total_return for r in rollouts])))
        stats["seconds"] = time.perf_counter() - start
        logger.debug("multi-task PPO iteration %s", stats)
        return stats

    def train(self, num_iterations: int) -> list[dict[str, float]]:
        """Run `num_iterations` iterations; one statistics dict each."""
        return [self.step() for _ in range(num_iterations)]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: policy, optimizer, iteration and both random sources."""
        return {
            "policy_config": dict(getattr(self.policy, "config", {})),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])


class HeadTrunkPolicy(GaussianMLPPolicy):
    """A `GaussianMLPPolicy` seen as a shared trunk plus a per-task head: the actor's last Linear.

    Trained like any Gaussian policy (e.g. by `MultiTaskPPOTrainer`); on a new task only the head
    is fine-tuned (`finetune_head`), the trunk, critic, log std and normalizer stay shared.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64), **kwargs: Any) -> None:
        if not list(hidden):
            raise ConfigError("HeadTrunkPolicy needs at least one hidden layer (the trunk), got hidden=[]")
        super().__init__(obs_dim, act_dim, hidden, **kwargs)

    @property
    def trunk(self) -> nn.Sequential:
        """[..., obs_dim] normalized -> [..., hidden[-1]] features (every actor layer but the last)."""
        return self.actor[:-1]

    @property
    def head(self) -> nn.Linear:
        """[..., hidden[-1]] -> [..., act_dim] action mean; the per-task part."""
        return self.actor[-1]

    def head_parameter_names(self) -> list[str]:
        """Names (as in `named_parameters()`) of the head's weight and bias."""
        prefix = f"actor.{len(self.actor) - 1}."
        return [name for name, _ in self.named_parameters() if name.startswith(prefix)]


@dataclass
class FinetuneConfig:
    """PPO on a copy of the policy from the K adaptation episodes."""

    gamma: float = 0.99
    """Discount per step."""
    lam: float = 0.95
    """GAE lambda."""
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(learning_rate=1e-3, epochs=10, num_minibatches=1, target_kl=0.05)
    )
    """Few samples: full-batch steps, a clipped ratio and a KL stop as the trust region."""

    def __post_init__(self) -> None:
        _check_unit("FinetuneConfig", "gamma", self.gamma)
        _check_unit("FinetuneConfig", "lam", self.lam)


def finetune(
    policy: nn.Module,
    episodes: Sequence[Rollout],
    config: FinetuneConfig | None = None,
    parameter_names: Iterable[str] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Fine-tune a copy of `policy` with PPO on the K episodes; the original is left untouched.

    The normalizer statistics are kept as they are (they are not weights, and K episodes of one
    task would skew them).

    Args:
        policy: A Gaussian policy with `evaluate` and `value` (e.g. `GaussianMLPPolicy`).
        episodes: Episodes collected on the new task by `policy` itself (stochastic actions).
        config: Fine-tuning hyperparameters.
        parameter_names: Which of `named_parameters()` to train; default all of them.
        seed: Seeds the minibatch shuffles.

    Returns:
        The fine-tuned copy.
    """
    config = config or FinetuneConfig()
    adapted = copy.deepcopy(policy)
    named = dict(adapted.named_parameters())
    names = list(named) if parameter_names is None else list(parameter_names)
    unknown = [name for name in names if name not in named]
    if unknown or not names:
        raise ConfigError(f"cannot fine-tune parameters {unknown or names}; the policy's parameters are {list(named)}")
    for name, parameter in named.items():
        parameter.requires_grad_(name in names)
    parameters = [named[name] for name in names]
    batch = ppo_batch(adapted, episodes, config.gamma, config.lam)
    ppo = config.ppo
    if len(batch["obs"]) < ppo.num_minibatches:
        ppo = dataclasses.replace(ppo, num_minibatches=len(batch["obs"]))
    optimizer = torch.optim.Adam(parameters, lr=ppo.learning_rate)
    stats = ppo_update(adapted.evaluate, parameters, optimizer, batch, ppo, torch.Generator().manual_seed(seed))
    logger.debug("fine-tuned %d parameter tensors: %s", len(parameters), stats)
    for parameter in named.values():
        parameter.requires_grad_(True)
    return adapted


def finetune_head(
    policy: HeadTrunkPolicy, episodes: Sequence[Rollout], config: FinetuneConfig | None = None, seed: int = 0
) -> HeadTrunkPolicy:
    """`finetune` restricted to the per-task head; trunk, critic and log std stay shared."""
    if not isinstance(policy, HeadTrunkPolicy):
        raise TypeError(f"finetune_head needs a HeadTrunkPolicy, got {type(policy).__name__}")
    return finetune(policy, episodes, config, policy.head_parameter_names(), seed)


Adapt = Callable[[nn.Module, Sequence[Rollout]], nn.Module]
"""(policy, K episodes on the new task) -> policy to evaluate there, e.g. `finetune`."""


def evaluate_adaptation(
    policy: nn.Module,
    env_fn: Callable[[], Any],
    tasks: Sequence[Any],
    num_adaptation_episodes: int,
    num_eval_episodes: int = 1,
    adapt: Adapt | None = None,
    seed: int = 0,
    max_episode_steps: int = 1000,
) -> np.ndarray:
    """Meta-test: per task, K stochastic episodes, `adapt`, then E deterministic episodes.

    Evaluation seeds depend on `seed` and the task index only, not on K, so results for different
    K (and different methods) are paired. With K = 0 or no `adapt` the policy is evaluated as is.

    Returns:
        [num_tasks] mean return of the evaluation episodes.
    """
    checks = (("num_adaptation_episodes", num_adaptation_episodes, 0), ("num_eval_episodes", num_eval_episodes, 1))
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    envs = [env_fn() for _ in range(max(num_adaptation_episodes, num_eval_episodes))]
    results = np.zeros(len(tasks))
    for index, task in enumerate(tasks):
        rng = np.random.default_rng([seed, index])
        eval_seeds = rng.integers(2**31, size=num_eval_episodes)  # drawn first: the same for every K
        adapted = policy
        if num_adaptation_episodes > 0 and adapt is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            adapt_seeds = rng.integers(2**31, size=num_adaptation_episodes)
            episodes = run_episodes(
                policy, envs[:num_adaptation_episodes], [task] * num_adaptation_episodes, adapt_seeds, generator,
                max_episode_steps=max_episode_steps,
            )  # fmt: skip
            adapted = adapt(policy, episodes)
        evaluated = run_episodes(
            adapted, envs[:num_eval_episodes], [task] * num_eval_episodes, eval_seeds, deterministic=True,
            max_episode_steps=max_episode_steps,
        )  # fmt: skip
        results[index] = np.mean([rollout.total_return for rollout in evaluated])
    return results

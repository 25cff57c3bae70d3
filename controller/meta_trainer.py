"""Meta-training loop for the gradient-based meta-learners (MAML, Meta-SGD, learned optimizer):
rollouts on a batch of tasks, K inner adaptation steps through `MetaLearner.clone().adapt`, and a
PPO-clip outer update that replays the inner steps through the graph. Knows no simulator: it is
handed an env factory and a task sampler. The episode batches and the inner loss are in
controller/meta_episodes.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from controller.errors import ConfigError
from controller.maml import AdaptedModule, MetaLearner
from controller.meta_episodes import (
    DistributionFn,
    Episodes,
    inner_advantages,
    inner_loss,
    policy_log_probs,
    rollout,
    standardize,
)

logger = logging.getLogger(__name__)


def _rows(episodes: Episodes, start: int, stop: int) -> Episodes:
    """Episodes `start:stop` (rows) of `episodes`."""
    fields = [episodes.obs, episodes.actions, episodes.rewards, episodes.log_probs, episodes.mask]
    return Episodes(*(field[start:stop] for field in fields))


def _concat(parts: Sequence[Episodes]) -> Episodes:
    """Stack the rows of `parts` (advantages unset), zero-padding every part to the longest."""
    if len(parts) == 1:
        return parts[0]
    length = max(part.mask.shape[1] for part in parts)

    def pad(field: Tensor) -> Tensor:
        padding = [0, 0] * (field.dim() - 2) + [0, length - field.shape[1]]
        return torch.nn.functional.pad(field, padding)

    names = ["obs", "actions", "rewards", "log_probs", "mask"]
    return Episodes(*(torch.cat([pad(getattr(part, name)) for part in parts]) for name in names))


def _all_finite(tensors: Any) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


@dataclass
class MAMLConfig:
    """One meta-iteration: per task, K inner steps each on fresh episodes, then PPO-clip outer steps."""

    meta_batch_size: int = 20
    """Tasks per meta-iteration."""
    episodes_per_task: int = 10
    """Episodes per task before each inner step and after the last."""
    num_inner_steps: int = 1
    """K: inner adaptation steps."""
    max_episode_steps: int = 200
    """Cap on episode length (the env's own truncation usually comes first)."""
    gamma: float = 0.99
    """Discount of the reward-to-go."""
    dice_lambda: float = 1.0
    """Loaded-DiCE dependency discount (1: unbiased meta-gradient)."""
    outer_learning_rate: float = 1e-3
    """Adam step size on the meta-parameters."""
    rule_learning_rate: float | None = None
    """Adam step size on the update rule's own meta-parameters (Meta-SGD step sizes, a learned
    optimizer); None: `outer_learning_rate`."""
    outer_steps: int = 5
    """PPO-clip steps on each meta-batch (each replays the inner steps)."""
    clip_ratio: float = 0.2
    """PPO clip range on the post-update likelihood ratio."""
    max_grad_norm: float | None = 1.0
    """Clip the meta-gradient norm; None disables."""
    baseline_reg: float = 1e-5
    """Ridge coefficient of the linear baseline."""
    normalize_inner_advantages: bool = False
    """Standardize the inner loss's advantages. Off, the inner step's size follows the return's
    scale, so later inner steps shrink as the task gets solved (standardized, every step is full
    size and K > 1 steps overshoot). The outer PPO advantages are always standardized."""
    target_kl: float | None = 0.05
    """Skip the remaining outer steps once the post-update policy's approximate KL to the sampling
    policy exceeds 1.5 * target_kl; None disables."""
    update_normalizer: bool = True
    """Merge each iteration's observations into the policy's normalizer (if it has one)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool" or (field.type.endswith("| None") and value is None):
                continue
            integer = field.type == "int"
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise ConfigError(
                    f"MAMLConfig.{field.name} must be {'an int' if integer else 'a number'}, got {value!r}"
                )
            low_ok = value >= 0 if field.name in ("gamma", "dice_lambda", "baseline_reg") else value > 0
            high_ok = value <= 1 if field.name in ("gamma", "dice_lambda") else math.isfinite(value)
            if not (low_ok and high_ok):
                raise ConfigError(f"MAMLConfig.{field.name} = {value!r} is out of range")


class MAMLTrainer:
    """Meta-trains a `MetaLearner` (MAML, Meta-SGD, a learned optimizer) on tasks it is handed.

    Episodes are finite-horizon: returns are Monte-Carlo reward-to-go with no bootstrap at
    truncation, and the linear baseline's time features absorb the horizon.

    Args:
        learner: The meta-learner; its module needs `distribution(obs) -> Normal`.
        env_fn: Builds one env with `set_task` (reached through `get_wrapper_attr`).
        sample_tasks: (num_tasks, rng) -> tasks, e.g. a task distribution's `sample_tasks`.
        config: Hyperparameters.
        seed: Seeds task draws, env resets and action noise (policy init is the caller's).
        num_envs: Env copies built (once, as needed) and reused for every episode: the episodes of a
            batch run in waves of `num_envs`, each copy switched to its episode's task with
            `set_task`. None: one copy per episode of a meta-batch, all stepped together. Results
            are deterministic for a seed and a given `num_envs`.
    """

    def __init__(
        self,
        learner: MetaLearner,
        env_fn: Callable[[], Any],
        sample_tasks: Callable[[int, np.random.Generator], Sequence[Any]],
        config: MAMLConfig | None = None,
        seed: int = 0,
        num_envs: int | None = None,
    ) -> None:
        if num_envs is not None and (isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1):
            raise ConfigError(f"MAMLTrainer num_envs must be a positive int or None, got {num_envs!r}")
        self.num_envs = num_envs
        self.learner = learner
        self.env_fn = env_fn
        self.sample_tasks = sample_tasks
        self.config = config or MAMLConfig()
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        module_ids = {id(param) for param in learner.module.parameters()}
        rule = [param for param in learner.parameters() if id(param) not in module_ids]
        groups = [{"params": list(learner.module.parameters())}]
        if rule:
            groups.append({"params": rule, "lr": self.config.rule_learning_rate or self.config.outer_learning_rate})
        self.optimizer = torch.optim.Adam(groups, lr=self.config.outer_learning_rate)
        self.iteration = 0
        self._envs: list[Any] = []

    def _pool(self, num_episodes: int) -> list[Any]:
        """The env copies an episode batch runs on (built on first need, kept until `close`)."""
        size = num_episodes if self.num_envs is None else min(self.num_envs, num_episodes)
        while len(self._envs) < size:
            self._envs.append(self.env_fn())
        return self._envs[:size]

    def _rollout_tasks(
        self,
        tasks: Sequence[Any],
        policies: DistributionFn | Sequence[DistributionFn],
        deterministic: bool = False,
    ) -> list[Episodes]:
        """`episodes_per_task` episodes on each task, in waves over the env pool; one `Episodes` per task.

        Args:
            tasks: The tasks; episode j of task i is episode i * episodes_per_task + j of the batch.
            policies: One distribution function for every task (one batched call per step), or one per task.
            deterministic: Mean actions (no noise drawn).
        """
        per_task = self.config.episodes_per_task
        num_episodes = len(tasks) * per_task
        seeds = self.rng.integers(2**31, size=num_episodes)
        generator = None if deterministic else self.generator
        pool = self._pool(num_episodes)
        shared = callable(policies)
        parts: list[list[Episodes]] = [[] for _ in tasks]
        for start in range(0, num_episodes, len(pool)):
            stop = min(start + len(pool), num_episodes)
            envs = pool[: stop - start]
            for env, episode in zip(envs, range(start, stop)):
                env.get_wrapper_attr("set_task")(tasks[episode // per_task])
            # Runs of consecutive episodes of one task: (task index, first episode, end episode).
            runs = [
                (task, max(start, task * per_task), min(stop, (task + 1) * per_task))
                for task in range(start // per_task, (stop - 1) // per_task + 1)
            ]
            if shared:
                (batch,) = rollout(
                    [(policies, envs)], self.config.max_episode_steps, seeds[start:stop], generator, deterministic
                )
                sampled = [_rows(batch, first - start, end - start) for _, first, end in runs]
            else:
                groups = [(policies[task], envs[first - start : end - start]) for task, first, end in runs]
                sampled = rollout(groups, self.config.max_episode_steps, seeds[start:stop], generator, deterministic)
            for (task, _, _), episodes in zip(runs, sampled):
                parts[task].append(episodes)
        return [_concat(task_parts) for task_parts in parts]

    def _check_finite(self, tensors: Any, what: str) -> None:
        """Raise `FloatingPointError` naming the meta-iteration if any of `tensors` holds inf or NaN."""
        if not _all_finite(tensors):
            raise FloatingPointError(
                f"meta-iteration {self.iteration + 1}: {what} is not finite; lower the inner step size "
                "(maml.step_size) or the outer learning rate, or standardize the inner advantages "
                "(normalize_inner_advantages: true)"
            )

    def _finish(self, episodes: Episodes) -> Episodes:
        """Advantages: reward-to-go minus the linear baseline (standardized if so configured)."""
        return inner_advantages(episodes, self.config)

    def inner_loss(self, clone: AdaptedModule, episodes: Episodes) -> Tensor:
        """Negative loaded-DiCE surrogate of `episodes` (sampled by an earlier state of `clone`)."""
        return inner_loss(clone, episodes, self.config)

    def sample(
        self, tasks: Sequence[Any], num_inner_steps: int, deterministic_eval: bool = False
    ) -> tuple[list[list[Episodes]], np.ndarray]:
        """Per task, episodes before each inner step and after the last; adaptation is not recorded.

        Returns:
            episodes[task][k] for k = 0..K, and mean returns [num_tasks, K + 1] of those episodes,
            or of extra deterministic (mean-action) episodes when `deterministic_eval`.
        """
        clones = [self.learner.clone().detach() for _ in tasks]
        batches: list[list[Episodes]] = [[] for _ in tasks]
        returns = np.zeros((len(tasks), num_inner_steps + 1))
        for k in range(num_inner_steps + 1):
            if k == 0:  # every task starts from the module's own weights: one batched call per step
                policies: DistributionFn | list[DistributionFn] = self.learner.module.distribution
            else:
                policies = [functools.partial(clone.call, "distribution") for clone in clones]
            sampled = self._rollout_tasks(tasks, policies)
            for i, episodes in enumerate(sampled):
                batches[i].append(self._finish(episodes))
                returns[i, k] = episodes.episode_returns().mean().item()
            if deterministic_eval:
                evaluated = self._rollout_tasks(tasks, policies, deterministic=True)
                returns[:, k] = [episodes.episode_returns().mean().item() for episodes in evaluated]
            if k < num_inner_steps:
                for i, clone in enumerate(clones):
                    loss = self.inner_loss(clone, batches[i][k])
                    self._check_finite([loss], f"the inner loss of task {i} at inner step {k}")
                    clone.adapt(loss, first_order=True)
                    self._check_finite(clone.params.values(), f"the parameters after inner step {k} on task {i}")
                    clones[i] = clone.detach()
        return batches, returns

    def meta_loss(self, batches: Sequence[Sequence[Episodes]]) -> tuple[Tensor, float]:
        """PPO-clip loss on the post-update episodes, through the replayed inner steps; and approx KL."""
        losses, kls = [], []
        clip = self.config.clip_ratio
        for task_batches in batches:
            clone = self.learner.clone()
            for episodes in task_batches[:-1]:
                clone.adapt(self.inner_loss(clone, episodes))
            post = task_batches[-1]
            log_ratio = policy_log_probs(clone, post) - post.log_probs * post.mask
            ratio = log_ratio.exp()
            # L = -mean_t min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) over real steps
            advantages = standardize(post.advantages, post.mask)
            surrogate = torch.min(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages)
            num_valid = post.mask.sum()
            losses.append(-(surrogate * post.mask).sum() / num_valid)
            kls.append((((ratio - 1.0) - log_ratio) * post.mask).sum().item() / num_valid.item())
        return torch.stack(losses).mean(), float(np.mean(kls))

    def step(self) -> dict[str, float]:
        """One meta-iteration; returns its statistics."""
        start = time.perf_counter()
        config = self.config
        tasks = self.sample_tasks(config.meta_batch_size, self.rng)
        batches, returns = self.sample(tasks, config.num_inner_steps)
        kls, num_updates = [], 0
        for _ in range(config.outer_steps):
            loss, kl = self.meta_loss(batches)
            self._check_finite([loss], "the outer (meta) loss")
            kls.append(kl)
            if config.target_kl is not None and kl > 1.5 * config.target_kl:
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.learner.parameters(), config.max_grad_norm)
            self.optimizer.step()
            num_updates += 1
            self._check_finite(self.learner.parameters(), "the meta-parameters after an outer step")
        update_normalizer = getattr(self.learner.module, "update_normalizer", None)
        if config.update_normalizer and update_normalizer is not None:
            update_normalizer(torch.cat([ep.obs[ep.mask.bool()] for task_batches in batches for ep in task_batches]))
        self.iteration += 1
        return {
            "iteration": float(self.iteration),
            "pre_return": float(returns[:, 0].mean()),
            "post_return": float(returns[:, -1].mean()),
            "outer_loss": loss.item(),
            "initial_approx_kl": kls[0],
            "final_approx_kl": kls[-1],
            "outer_updates": float(num_updates),
            "seconds": time.perf_counter() - start,
        }

    def train(self, num_iterations: int) -> list[dict[str, float]]:
        """Run `num_iterations` meta-iterations; one stats dict each."""
        history = []
        for _ in range(num_iterations):
            history.append(self.step())
            logger.debug("meta-iteration %s", history[-1])
        return history

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: meta-parameters, outer optimizer, iteration and both random sources."""
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])

    def close(self) -> None:
        """Close every env the trainer built."""
        for env in self._envs:
            env.close()
        self._envs.clear()

    def adaptation_returns(
        self, tasks: Sequence[Any], num_inner_steps: int | None = None, deterministic_eval: bool = False
    ) -> np.ndarray:
        """Mean return [num_tasks, K + 1] on each task after k = 0..K inner steps (meta-test)."""
        steps = self.config.num_inner_steps if num_inner_steps is None else num_inner_steps
        return self.sample(tasks, steps, deterministic_eval)[1]

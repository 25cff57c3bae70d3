"""MLSH hyperparameters (`MLSHConfig`, validated when built) and `saved_master_init`, which resolves
a saved `mlsh` config section the same way."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from controller.adaptation import MASTER_INITS
from controller.config import build
from controller.errors import ConfigError
from controller.ppo import PPOConfig


@dataclass
class MLSHConfig:
    """MLSH schedule and optimization."""

    num_task_groups: int = 20
    """Tasks sampled in all; each gets a fresh master and W + U iterations."""
    parallel_groups: int = 1
    """Task groups run side by side, each on an equal block of the env copies with its own task and
    master (one master PPO update each); their steps pool into one sub-policy update per iteration.
    Must divide `num_task_groups` and the sampler's `num_envs`."""
    warmup_iterations: int = 2
    """W: iterations per task that update the master only."""
    joint_iterations: int = 6
    """U: iterations per task that update master and sub-policies."""
    steps_per_iteration: int = 2048
    """Environment steps per iteration, summed over the vector env's copies (and parallel groups)."""
    gamma: float = 0.99
    """Discount per control step (sub-policies)."""
    lam: float = 0.95
    """GAE lambda (sub-policies)."""
    master_gamma: float = 0.9
    """Discount per macro-step (master)."""
    master_lam: float = 0.95
    """GAE lambda per macro-step (master)."""
    master_epsilon: float = 0.1
    """Share of master choices drawn uniformly at random, for exploration."""
    master_init: str = "reset"
    """Where each task group's master starts: "reset" (freshly initialized weights and normalizer,
    as in Frans et al.), "keep" (the previous group's trained master) or "meta" (a meta-learned
    initialization, Reptile-style: every group starts from it, and after the group it moves toward
    the trained master by `master_meta_step`). A new task at meta-test starts the same way."""
    master_meta_step: float = 0.1
    """Reptile step of `master_init: meta`: init <- init + step * (trained master - init), in (0, 1]."""
    reset_master: bool | None = None
    """Deprecated spelling of `master_init` kept for configs written before it: True means "reset",
    False "keep"; resolved into `master_init` (and cleared) when the config is built."""
    master_ppo: PPOConfig = field(default_factory=lambda: PPOConfig(learning_rate=1e-3, num_minibatches=2))
    """PPO on macro-steps for the master."""
    sub_ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO on control steps for the sub-policies."""

    def __post_init__(self) -> None:
        if self.reset_master is not None:
            implied = "reset" if self.reset_master else "keep"
            if self.master_init not in ("reset", implied):
                raise ConfigError(
                    f"mlsh.reset_master = {self.reset_master} contradicts mlsh.master_init = '{self.master_init}'; "
                    "set master_init only"
                )
            warnings.warn(
                f"mlsh.reset_master is deprecated; use mlsh.master_init: {implied}", DeprecationWarning, stacklevel=3
            )
            self.master_init, self.reset_master = implied, None
        if self.master_init not in MASTER_INITS:
            raise ConfigError(f"mlsh.master_init '{self.master_init}' unknown; valid: {', '.join(MASTER_INITS)}")
        step = self.master_meta_step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 1.0:
            raise ConfigError(f"mlsh.master_meta_step must be in (0, 1], got {self.master_meta_step!r}")
        groups = self.parallel_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ConfigError(f"mlsh.parallel_groups must be a positive integer, got {groups!r}")
        if self.num_task_groups % groups:
            raise ConfigError(
                f"mlsh.parallel_groups = {groups} must divide mlsh.num_task_groups = {self.num_task_groups}"
            )

    @property
    def iterations_per_group(self) -> int:
        return self.warmup_iterations + self.joint_iterations


def saved_master_init(mlsh: dict[str, Any] | None) -> str:
    """`master_init` of a saved `mlsh` config section (a run's config.yaml, a bundle's manifest),
    resolved as `MLSHConfig` resolves it (defaults, the deprecated `reset_master`)."""
    return build(MLSHConfig, dict(mlsh or {}), "mlsh").master_init

"""The point suite's fixed setup (sim/fast_suite.py): the training tasks, the held-out splits and
tasks, the training budgets, and the reset seeds every method shares on a held-out task.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from controller.errors import ConfigError
from sim.fast_tasks import PointNavTask, PointNavTaskDistribution

TRAIN_TASKS = PointNavTaskDistribution(angle_low=0.0, angle_high=math.pi, damping_low=0.5, damping_high=4.0)
"""What every method is trained on."""
HELD_OUT_SPLITS = {
    "in range": TRAIN_TASKS,
    "angle outside": dataclasses.replace(TRAIN_TASKS, angle_low=math.pi, angle_high=1.25 * math.pi),
    "damping outside": dataclasses.replace(TRAIN_TASKS, damping_low=4.0, damping_high=6.0),
}
"""Held-out task i is drawn from split i mod 3."""


@dataclass
class SuiteBudget:
    """How much each method trains, and the default meta-test size."""

    num_tasks: int = 30
    """Held-out tasks (a third per split)."""
    eval_episodes: int = 3
    """E: deterministic evaluation episodes per task and K."""
    meta_iterations: int = 30
    """Meta-iterations of MAML, first-order MAML, Meta-SGD and the learned optimizer."""
    meta_batch_size: int = 8
    """Tasks per meta-iteration."""
    episodes_per_task: int = 10
    """Episodes per task before and after the inner step in meta-training."""
    rl2_iterations: int = 40
    """RL^2 iterations."""
    rl2_trials: int = 32
    """RL^2 trials per iteration."""
    ppo_iterations: int = 100
    """Domain-randomized PPO and oracle iterations (16 episodes each)."""
    mlsh_task_groups: int = 16
    """MLSH task groups (6 warm-up + 2 joint iterations each, `train_mlsh`)."""
    mlsh_steps_per_iteration: int = 640
    """MLSH env steps per iteration (32 episodes of 20 steps)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SuiteBudget.{field.name} must be a positive int, got {value!r}")


BUDGETS = {
    "quick": SuiteBudget(),
    "full": SuiteBudget(60, 5, meta_iterations=80, rl2_iterations=150, ppo_iterations=300, mlsh_task_groups=48),
}
"""Named budgets: "quick" (about 100 s on the 2-core machine at load average 7), "full" (about 270 s there)."""


def held_out_tasks(num_tasks: int, seed: int = 0) -> tuple[list[PointNavTask], list[str]]:
    """`num_tasks` held-out tasks and the split of each (task i from split i mod 3)."""
    rng = np.random.default_rng([seed, 1])  # a stream no trainer uses
    names = list(HELD_OUT_SPLITS)
    splits = [names[index % len(names)] for index in range(num_tasks)]
    return [HELD_OUT_SPLITS[split].sample_tasks(1, rng)[0] for split in splits], splits


@dataclass
class TaskSeeds:
    """Random sources of one held-out task's meta-test, the same for every method."""

    evaluation: np.ndarray
    """[E] reset seeds of the evaluation episodes (independent of K)."""
    generator: int
    """Seed of the adaptation's own randomness (action noise, master sampling, minibatches)."""
    adaptation: np.ndarray
    """[K] reset seeds of the adaptation episodes (K = 3's are K = 5's first three)."""


def task_seeds(seed: int, index: int, num_eval_episodes: int, k: int) -> TaskSeeds:
    """The reset seeds of task `index`, drawn in `evaluate_adaptation`'s order (so all methods pair)."""
    rng = np.random.default_rng([seed, index])
    evaluation_seeds = rng.integers(2**31, size=num_eval_episodes)
    return TaskSeeds(evaluation_seeds, int(rng.integers(2**31)), rng.integers(2**31, size=k))

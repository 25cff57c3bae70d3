"""MLSH adapts (issue #4/#6): on movement bandits, a new task's freshly initialized master adapted
from K = 5 episodes with `update_master` beats the same master before adaptation by more than the
spread across training seeds.

Movement bandits (Frans et al. 2017): the point must reach one of two goals, left or right, and does
not see which; distinct tasks need distinct skills. MLSH is trained with the point suite's settings
(`sim.fast_suite.train_mlsh`, 2 sub-policies) for about 30 CPU-seconds per seed (2 seeds); then, per held-out
task, a fresh master (uniform over the sub-policies) is evaluated deterministically before and after
adapting from K sampled episodes (`sim.fast_suite.mlsh_adapted_return`, the suite's MLSH meta-test).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from controller.errors import ConfigError
from sim.fast_suite import mlsh_adapted_return, train_mlsh
from sim.fast_suite_setup import task_seeds
from sim.fast_tasks import PointNavEnv, PointNavTask, PointNavTaskDistribution

BANDITS = PointNavTaskDistribution(angle_low=0.0, angle_high=math.pi, num_angles=2, damping_low=1.0, damping_high=1.0)
"""Two goals, (1, 0) and (-1, 0); damping fixed."""
NUM_SEEDS = 2
NUM_TASK_GROUPS = 45
K = 5
NUM_EVAL_EPISODES = 3
HELD_OUT = [PointNavTask(math.cos(angle), math.sin(angle), 1.0) for angle in BANDITS.angles() for _ in range(6)]
"""Six new tasks per goal, each with its own fresh master and reset seeds."""


def test_movement_bandits_draw_only_the_discrete_goals():
    tasks = BANDITS.sample_tasks(200, np.random.default_rng(0))
    goals = {(round(task.goal_x, 6), round(task.goal_y, 6)) for task in tasks}
    assert goals == {(1.0, 0.0), (-1.0, 0.0)}
    assert {task.damping for task in tasks} == {1.0}
    np.testing.assert_allclose(PointNavTaskDistribution(num_angles=3).angles(), [0.0, math.pi / 2, math.pi])
    assert PointNavTaskDistribution(angle_low=0.5, num_angles=1).angles().tolist() == [0.5]
    assert PointNavTaskDistribution().angles().size == 0  # continuous: the default draw is unchanged
    with pytest.raises(ConfigError, match="num_angles"):
        PointNavTaskDistribution(num_angles=-1)


def pre_and_post_adaptation(seed: int) -> tuple[float, float]:
    trainer = train_mlsh(BANDITS, NUM_TASK_GROUPS, 640, seed, num_subpolicies=2)
    env, before, after = PointNavEnv(), [], []
    for index, task in enumerate(HELD_OUT):
        env.set_task(task)
        seeds = task_seeds(1000 + seed, index, NUM_EVAL_EPISODES, K)
        # Same fresh master and evaluation starts before and after: only the K episodes differ.
        before.append(mlsh_adapted_return(trainer, env, dataclasses.replace(seeds, adaptation=seeds.adaptation[:0])))
        after.append(mlsh_adapted_return(trainer, env, seeds))
    return float(np.mean(before)), float(np.mean(after))


@pytest.mark.slow
def test_adapted_master_beats_the_fresh_master_by_more_than_the_seed_spread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pre, post = np.array([pre_and_post_adaptation(seed) for seed in range(NUM_SEEDS)]).T
    finally:
        torch.set_num_threads(threads)
    gaps = post - pre
    spread = max(np.ptp(pre), np.ptp(post))
    report = f"pre-adaptation {pre.round(2)}, post-adaptation {post.round(2)}, spread across seeds {spread:.2f}"
    print(report)  # shown with `pytest -s`
    assert gaps.min() > 0, report
    assert gaps.mean() > spread, report

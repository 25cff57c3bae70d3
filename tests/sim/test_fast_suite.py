"""Point-task meta-test suite (sim/fast_suite.py, sim/fast_suite_setup.py, sim/fast_suite_report.py): held-out
splits, paired seeds, the normalized score by hand, and a tiny-budget run of every method end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from controller.errors import ConfigError
from sim.fast_suite import META_LEARNERS, REFERENCE, run_suite
from sim.fast_suite_report import normalized_score, summarize
from sim.fast_suite_setup import HELD_OUT_SPLITS, SuiteBudget, held_out_tasks, task_seeds

torch.set_num_threads(1)

METHODS = {
    *META_LEARNERS,
    "RL^2",
    "MLSH (adapt master)",
    "domain-randomized PPO",
    "fine-tune all",
    "fine-tune head",
    *REFERENCE.values(),
}
TINY = SuiteBudget(
    num_tasks=3,
    eval_episodes=1,
    meta_iterations=1,
    meta_batch_size=2,
    episodes_per_task=2,
    rl2_iterations=1,
    rl2_trials=4,
    ppo_iterations=20,
    mlsh_task_groups=1,
    mlsh_steps_per_iteration=160,
)


def test_held_out_tasks_include_values_outside_the_training_ranges():
    tasks, splits = held_out_tasks(9, seed=0)
    assert splits == list(HELD_OUT_SPLITS) * 3
    for task, split in zip(tasks, splits):
        angle = math.atan2(task.goal_y, task.goal_x) % (2 * math.pi)
        assert math.hypot(task.goal_x, task.goal_y) == pytest.approx(1.0)
        assert (math.pi < angle < 1.25 * math.pi) == (split == "angle outside")
        assert (4.0 < task.damping <= 6.0) == (split == "damping outside")
        assert 0.5 <= task.damping <= 6.0
    again, _ = held_out_tasks(9, seed=0)
    assert again == tasks and held_out_tasks(9, seed=1)[0] != tasks


def test_reset_seeds_pair_across_k():
    # Evaluation seeds never depend on K, and K = 3's adaptation seeds are K = 5's first three.
    three, five = task_seeds(0, 4, 2, 3), task_seeds(0, 4, 2, 5)
    np.testing.assert_array_equal(three.evaluation, task_seeds(0, 4, 2, 0).evaluation)
    np.testing.assert_array_equal(three.evaluation, five.evaluation)
    np.testing.assert_array_equal(three.adaptation, five.adaptation[:3])
    assert three.generator == five.generator
    assert not np.array_equal(three.evaluation, task_seeds(0, 5, 2, 3).evaluation)  # another task


def test_normalized_score_by_hand():
    random, oracle = np.array([-20.0, -30.0]), np.array([-10.0, -10.0])
    # (mean R - mean random) / (mean oracle - mean random) = (-15 - -25) / (-10 - -25) = 10 / 15.
    assert normalized_score(np.array([-10.0, -20.0]), random, oracle) == pytest.approx(2 / 3)
    assert normalized_score(np.array([-1.0]), np.array([-5.0]), np.array([-5.0])) is None  # oracle = random
    results = {
        "tasks": [{"split": "in range"}, {"split": "angle outside"}],
        "reference": {"random": "r", "oracle": "o"},
        "methods": {"m": {"0": [-10.0, -20.0]}, "r": {"0": random.tolist()}, "o": {"0": oracle.tolist()}},
    }
    row = summarize(results)["m"]["0"]
    assert row["mean"] == -15.0 and row["std"] == 5.0 and row["normalized"] == pytest.approx(2 / 3)
    assert row["normalized in range"] == pytest.approx(1.0)  # (-10 - -20) / (-10 - -20)
    assert row["normalized angle outside"] == pytest.approx(0.5)  # (-20 - -30) / (-10 - -30)


def test_bad_arguments_raise_naming_the_value(tmp_path):
    with pytest.raises(ConfigError, match="'huge'"):
        run_suite(budget="huge", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="ks"):
        run_suite(ks=(0, 0), budget=TINY, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="num_tasks"):
        SuiteBudget(num_tasks=0)


def test_tiny_suite_reports_every_method_at_every_k(tmp_path):
    results = run_suite(ks=(0, 1, 3), budget=TINY, out_dir=tmp_path, progress=False)
    for name in ("eval.md", "eval.json", "eval.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "eval.json").read_text())["summary"] == results["summary"]
    assert set(results["methods"]) == set(results["summary"]) == METHODS
    for name in METHODS:
        assert set(results["methods"][name]) == set(results["summary"][name]) == {"0", "1", "3"}, name
        assert all(len(returns) == 3 and np.isfinite(returns).all() for returns in results["methods"][name].values())
        if not results["uses_adaptation"][name]:  # evaluated once, reported for every K
            assert results["methods"][name]["0"] == results["methods"][name]["3"], name
    assert [task["split"] for task in results["tasks"]] == list(HELD_OUT_SPLITS)
    summary = results["summary"]
    assert summary[REFERENCE["oracle"]]["0"]["mean"] > summary[REFERENCE["random"]]["0"]["mean"]
    assert summary[REFERENCE["oracle"]]["1"]["normalized"] == 1.0
    assert summary[REFERENCE["random"]]["1"]["normalized"] == 0.0
    # Fine-tuning from zero episodes is the domain-randomized policy itself (same seeds, paired).
    assert results["methods"]["fine-tune all"]["0"] == results["methods"]["domain-randomized PPO"]["0"]
    table = (tmp_path / "eval.md").read_text()
    assert all(f"| {name}" in table for name in METHODS)

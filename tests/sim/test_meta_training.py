"""`metactl train` for maml / meta_sgd / learned_optimizer / rl2: config sections, run directory,
and resume after a crash to the same weights as an uninterrupted run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from controller.errors import ConfigError
from controller.meta_trainer import MAMLTrainer
from controller.rl2 import RL2Trainer
from controller.rundir import load_torch
from sim.training import load_train_config, train

TINY = {
    "maml": [
        "maml.num_iterations=3",
        "maml.hidden=[8]",
        "maml.trainer.meta_batch_size=1",
        "maml.trainer.episodes_per_task=2",
        "maml.trainer.max_episode_steps=10",
        "maml.trainer.outer_steps=1",
    ],
    "rl2": [
        "rl2.num_iterations=3",
        "rl2.hidden_size=8",
        "rl2.trainer.num_trials=2",
        "rl2.trainer.episodes_per_trial=2",
        "rl2.trainer.max_episode_steps=10",
    ],
}


def overrides(algorithm: str) -> list[str]:
    return [f"algorithm={algorithm}", "env.episode_seconds=0.2", *TINY["rl2" if algorithm == "rl2" else "maml"]]


def config_file(algorithm: str) -> str:
    return "configs/a1_rl2.yaml" if algorithm == "rl2" else "configs/a1_maml.yaml"


@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd", "learned_optimizer", "rl2"])
def test_shipped_configs_build(algorithm: str) -> None:
    config = load_train_config(config_file(algorithm), [f"algorithm={algorithm}"])
    assert config.algorithm == algorithm


def test_unknown_key_in_a_section_names_it() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'maml.trainer.inner_steps'"):
        load_train_config("configs/a1_maml.yaml", ["maml.trainer.inner_steps=2"])
    with pytest.raises(ConfigError, match="algorithm 'reptile' unknown; valid: mlsh, maml, meta_sgd"):
        load_train_config("configs/a1_maml.yaml", ["algorithm=reptile"])


@pytest.mark.parametrize("algorithm", ["learned_optimizer", "rl2"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch, algorithm: str) -> None:
    straight = train(config_file(algorithm), overrides(algorithm), run_dir=tmp_path / "straight", progress=False)
    trainer_class = RL2Trainer if algorithm == "rl2" else MAMLTrainer
    step = trainer_class.step
    calls = []

    def crash_on_second_iteration(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(trainer_class, "step", crash_on_second_iteration)
    with pytest.raises(KeyboardInterrupt):
        train(config_file(algorithm), overrides(algorithm), run_dir=tmp_path / "crashed", progress=False)
    monkeypatch.setattr(trainer_class, "step", step)
    assert len((tmp_path / "crashed" / "metrics.csv").read_text().splitlines()) == 2  # header + iteration 1
    resumed = train(config_file(algorithm), overrides(algorithm), run_dir=tmp_path / "crashed", progress=False)

    expected, got = (load_torch(run.checkpoint_path) for run in (straight, resumed))
    assert got["trainer"]["iteration"] == 3 and got["total_steps"] == expected["total_steps"]
    key = "policy" if algorithm == "rl2" else "learner"
    for name, value in expected["trainer"][key].items():
        torch.testing.assert_close(got["trainer"][key][name], value, rtol=0, atol=0)
    rows = (tmp_path / "crashed" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and "episode_return" in rows[0]
    assert (tmp_path / "crashed" / "tensorboard").is_dir()


SHIPPED_SHORT = [
    "maml.num_iterations=1",
    "maml.num_envs=2",
    "maml.trainer.meta_batch_size=1",
    "maml.trainer.episodes_per_task=2",
    "maml.trainer.outer_steps=1",
]
"""Few episodes, but the shipped episode length, step size, inner-loss and outer settings."""


@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd"])
def test_shipped_gradient_configs_keep_parameters_finite(tmp_path: Path, algorithm: str) -> None:
    config = load_train_config(f"configs/a1_{algorithm}.yaml")
    assert config.maml.trainer.normalize_inner_advantages and config.maml.step_size <= 0.01
    run = train(f"configs/a1_{algorithm}.yaml", SHIPPED_SHORT, run_dir=tmp_path / algorithm, progress=False)
    checkpoint = load_torch(run.checkpoint_path)
    learner = checkpoint["trainer"]["learner"]
    assert all(torch.isfinite(value).all() for value in learner.values())
    assert (learner["module.log_std"].abs() < 3.0).all()
    header, row = (run.path / "metrics.csv").read_text().splitlines()
    metrics = dict(zip(header.split(","), map(float, row.split(","))))
    assert all(math.isfinite(value) for value in metrics.values())
    # One inner step of the shipped size changes the return by a plausible amount, not to nothing.
    assert abs(metrics["post_return"] - metrics["pre_return"]) < 0.5 * abs(metrics["pre_return"]) + 10.0

"""`metactl eval` on runs of every non-MLSH algorithm: tiny trained runs, one held-out task, K = 0, 1,
one-second episodes; the Markdown table, JSON and PNG it writes, and the inner step it shares with
the robot adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import deploy.adapt_gradient
import sim.evaluation_meta
from controller.errors import ConfigError
from sim.evaluation import evaluate
from sim.training import train
from tests.sim.test_meta_training import config_file, overrides

ALGORITHMS = ["maml", "meta_sgd", "learned_optimizer", "rl2"]
TASKS = {"tasks": [{"friction": 0.4, "added_mass": 1.0, "motor_strength": 0.9, "command_vx": 0.5}]}


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "heldout.yaml"
    path.write_text(yaml.safe_dump(TASKS))
    return path


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny run per algorithm (the budgets of tests/sim/test_meta_training.py), trained once."""
    root = tmp_path_factory.mktemp("meta_runs")
    return {
        algorithm: train(config_file(algorithm), overrides(algorithm), run_dir=root / algorithm, progress=False).path
        for algorithm in ALGORITHMS
    }


def test_eval_shares_the_robot_adapters_inner_step() -> None:
    assert sim.evaluation_meta.adapt_fast_weights is deploy.adapt_gradient.adapt_fast_weights


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_eval_runs_the_protocol_for_each_algorithm(
    algorithm: str, tiny_runs: dict[str, Path], tasks_file: Path, tmp_path: Path, monkeypatch
) -> None:
    inner_steps = []
    shared = sim.evaluation_meta.adapt_fast_weights

    def counted(*args, **kwargs):
        inner_steps.append(len(args[3]))  # the adaptation episodes
        return shared(*args, **kwargs)

    monkeypatch.setattr(sim.evaluation_meta, "adapt_fast_weights", counted)
    run = tiny_runs[algorithm]
    # The run as its own oracle: enough to check that --oracle composes and the score is computed.
    results = evaluate(
        run, tasks_file, [0, 1], oracle=run, eval_episodes=1, seconds=1.0, out_dir=tmp_path, progress=False
    )

    label = "hidden state" if algorithm == "rl2" else "inner step"
    (name,) = results["methods"]
    assert name.startswith(f"{algorithm} (") and label in name
    assert results["algorithm"] == algorithm
    assert inner_steps == ([] if algorithm == "rl2" else [1])  # K = 1 once, K = 0 takes no step
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert set(stored) >= {"algorithm", "tasks", "ks", "methods", "random", "oracle", "summary"}
    assert set(stored["methods"][name]) == {"0", "1"} and len(stored["methods"][name]["0"]) == 1
    assert set(stored["summary"][name]["1"]) == {"mean", "std", "normalized"}
    table = (tmp_path / "eval.md").read_text().splitlines()
    assert [line.split("|")[2].strip() for line in table if line.startswith(f"| {name} |")] == ["0", "1"]
    assert any(line.startswith("| oracle") for line in table)
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_baseline_must_be_an_mlsh_run(tiny_runs: dict[str, Path], tasks_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--baseline needs an MLSH run"):
        evaluate(tiny_runs["maml"], tasks_file, [0], baseline=tiny_runs["rl2"], out_dir=tmp_path, progress=False)

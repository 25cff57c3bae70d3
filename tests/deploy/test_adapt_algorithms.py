"""Every algorithm with a bundle, end to end through the real CLI against the emulator on a task
outside the training ranges: tiny `metactl train` -> `metactl export` -> `metactl deploy` ->
`metactl adapt` (returns before and after printed; a candidate is kept only if not worse) ->
`metactl adapt --rollback` (the previous bytes exactly)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import yaml

from deploy.bundle import promote
from tests.conftest import ROOT, metactl

HELDOUT = str(ROOT / "configs" / "tasks" / "a1_heldout_slippery.yaml")  # outside every training range
TINY = {
    "maml": [
        "maml.num_iterations=2",
        "maml.hidden=[16]",
        "maml.trainer.meta_batch_size=2",
        "maml.trainer.episodes_per_task=2",
        "maml.trainer.max_episode_steps=50",
        "maml.trainer.outer_steps=1",
    ],
    "rl2": [
        "rl2.num_iterations=2",
        "rl2.hidden_size=16",
        "rl2.trainer.num_trials=2",
        "rl2.trainer.episodes_per_trial=2",
        "rl2.trainer.max_episode_steps=50",
    ],
}
VERSIONED = ("manifest.yaml", "policy.onnx", "adaptation.pt")


def digest(directory: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in VERSIONED
        if (directory / name).exists()
    }


def train_and_export(tmp_path: Path, algorithm: str) -> Path:
    section = "rl2" if algorithm == "rl2" else "maml"
    overrides = [f"algorithm={algorithm}", "env.episode_seconds=1.0", *TINY[section]]
    config = "configs/a1_rl2.yaml" if algorithm == "rl2" else "configs/a1_maml.yaml"
    run_dir = tmp_path / "run"
    metactl("train", config, "--run-dir", str(run_dir), "--quiet", *[x for o in overrides for x in ("--set", o)])
    assert (run_dir / "checkpoints" / "latest.pt").exists() and (run_dir / "metrics.csv").exists()
    bundle = tmp_path / "bundle"
    metactl("export", str(run_dir), "-o", str(bundle))
    return bundle


def returns(stdout: str) -> tuple[float, float]:
    before = float(re.search(r"return before:\s+(-?[\d.]+)", stdout).group(1))
    after = float(re.search(r"return after:\s+(-?[\d.]+)", stdout).group(1))
    return before, after


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["maml", "meta_sgd", "learned_optimizer"])
def test_gradient_bundle_train_export_adapt_rollback(tmp_path: Path, emulator, algorithm: str) -> None:
    bundle = train_and_export(tmp_path, algorithm)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    assert manifest["algorithm"] == algorithm and manifest["adaptable"] == "adaptation.pt"
    robot = emulator("--lockstep", "--task", HELDOUT)

    deployed = metactl("deploy", str(bundle), "--port", robot.port, "--episodes", "1", "--seconds", "1")
    assert "episode 1/1: return" in deployed.stdout

    v0 = digest(bundle)
    adapted = metactl("adapt", str(bundle), "--port", robot.port, "-k", "2", "--seconds", "1")
    before, after = returns(adapted.stdout)
    print(adapted.stdout)
    candidate = bundle / "versions" / "v1"
    assert (candidate / "adaptation.png").exists()
    state = yaml.safe_load((candidate / "manifest.yaml").read_text())
    assert state["history"][-1]["update"]["inner_steps"] == 1.0
    assert digest(candidate)["adaptation.pt"] != v0["adaptation.pt"]  # new fast weights
    current = yaml.safe_load((bundle / "manifest.yaml").read_text())["version"]
    if "kept" in adapted.stdout:  # the printed returns are rounded: a tie on screen can be a rejection
        assert after >= before and current == "v1" and digest(bundle) == digest(candidate)
    else:  # a worse candidate never lands
        assert after <= before and "rejected" in adapted.stdout and current == "v0" and digest(bundle) == v0
        promote(bundle, "v1")  # land it by hand, as a kept adaptation would, to check the rollback
    metactl("adapt", str(bundle), "--rollback")
    assert digest(bundle) == v0  # the exact previous bytes


@pytest.mark.slow
def test_rl2_bundle_reports_adaptation_in_its_hidden_state(tmp_path: Path, emulator) -> None:
    bundle = train_and_export(tmp_path, "rl2")
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    assert manifest["algorithm"] == "rl2" and manifest["policy"]["inputs"] == ["obs", "hidden"]
    robot = emulator("--lockstep", "--task", HELDOUT)
    deployed = metactl("deploy", str(bundle), "--port", robot.port, "--episodes", "2", "--seconds", "1")
    assert "episode 2/2: return" in deployed.stdout

    v0 = digest(bundle)
    adapted = metactl("adapt", str(bundle), "--port", robot.port, "-k", "2", "--seconds", "1")
    print(adapted.stdout)
    returns(adapted.stdout)
    assert re.search(r"adaptation episodes: -?[\d.]+, -?[\d.]+", adapted.stdout)
    assert "hidden state" in adapted.stdout
    assert digest(bundle) == v0 and not (bundle / "versions" / "v1").exists()


@pytest.mark.slow
def test_corrupt_adaptation_state_is_refused_by_the_cli(tmp_path: Path) -> None:
    bundle = train_and_export(tmp_path, "maml")
    state = bundle / "adaptation.pt"
    state.write_bytes(state.read_bytes()[:-64])
    before = digest(bundle)
    refused = metactl("adapt", str(bundle), "--port", "loop://", "-k", "1", check=False)
    assert refused.returncode == 2 and "adaptation.pt is corrupted" in refused.stderr
    assert digest(bundle) == before and not (bundle / "versions" / "v1").exists()
    shutil.copy(bundle / "versions" / "v0" / "adaptation.pt", state)  # the archived copy restores it
    metactl("deploy", str(bundle), "--port", "loop://", check=False)  # loads (then finds no robot)

"""A new task's MLSH master starts as in training, in the meta-test (`metactl eval`) and on the robot
(`metactl adapt`): `start_task_master` and the places that call it."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from controller.adaptation import NEW_MASTER_ADAPT, AdaptConfig, start_task_master
from controller.errors import ConfigError
from controller.mlsh_policy import MLSHPolicy
from deploy.adapt import new_task_master_init
from deploy.bundle import MASTER_INIT, Bundle, load_bundle, load_master_init
from deploy.errors import BundleError
from sim.env import LocomotionEnv
from sim.evaluation import evaluate_method, load_run, rollout
from sim.tasks import Task
from tests.conftest import TINY_OVERRIDES, metactl


def _policy() -> MLSHPolicy:
    torch.manual_seed(0)
    policy = MLSHPolicy(6, 2, num_subpolicies=3, macro_steps=4, sub_hidden=(8,), master_hidden=(8,))
    policy.master.update_normalizer(torch.randn(50, 6) * 3)
    return policy


def test_start_task_master_by_master_init():
    trained = _policy().master
    reset = copy.deepcopy(trained)
    assert start_task_master(reset, "reset", torch.Generator().manual_seed(4)) == NEW_MASTER_ADAPT
    again = copy.deepcopy(trained)
    start_task_master(again, "reset", torch.Generator().manual_seed(4))
    for key, value in reset.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key  # the generator decides the weights
    assert not torch.equal(reset.actor[0].weight, trained.actor[0].weight)
    assert float(reset.normalizer.count) == 1e-4 and not reset.normalizer.mean.any()  # statistics cleared

    kept = copy.deepcopy(trained)
    assert start_task_master(kept, "keep") == AdaptConfig()  # the trained critic is a baseline
    assert torch.equal(kept.actor[0].weight, trained.actor[0].weight)

    meta = copy.deepcopy(trained)
    init = {key: value + 1.0 for key, value in reset.state_dict().items()}
    assert start_task_master(meta, "meta", init_state=init) == NEW_MASTER_ADAPT
    assert torch.equal(meta.actor[0].weight, init["actor.0.weight"])
    with pytest.raises(ConfigError, match="needs the meta-learned master initialization"):
        start_task_master(copy.deepcopy(trained), "meta")
    with pytest.raises(ConfigError, match="master_init 'fresh' unknown"):
        start_task_master(copy.deepcopy(trained), "fresh")


def test_robot_adapter_starts_masters_as_the_bundles_training_did():
    def bundle(mlsh: dict) -> Bundle:
        return Bundle(Path("."), {"training": {"config": {"mlsh": mlsh}}}, None)

    assert new_task_master_init(bundle({"master_init": "reset"})) == "reset"
    assert new_task_master_init(bundle({"master_init": "keep"})) == "keep"
    assert new_task_master_init(bundle({"reset_master": False})) == "keep"  # the deprecated spelling
    assert new_task_master_init(bundle({})) == "reset"  # the training default
    assert new_task_master_init(bundle({"master_init": "meta"})) == "keep"  # exported without its init


def test_eval_k0_is_a_new_tasks_start_master(tiny_run: Path):
    run = load_run(tiny_run)
    assert run.master_init == "reset"  # configs/a1_quick.yaml trains with the default
    env = LocomotionEnv("a1", Task(command_vx=0.5), episode_seconds=1.0)
    try:
        got = evaluate_method(env, run, 0, "adapt", 1, seed=7)
        fresh = copy.deepcopy(run.policy)
        start_task_master(fresh.master, "reset", torch.Generator().manual_seed(7))
        episode = rollout(env, fresh, 7)
        assert got.mean == got.returns[0] == episode.total_return
        # The master's choices in the evaluation episode, as shares per sub-policy.
        chosen = [option for option, chose in zip(episode.options, episode.chose) if chose]
        assert len(got.option_share) == fresh.num_subpolicies and math.isclose(sum(got.option_share), 1.0)
        assert got.option_share == [chosen.count(i) / len(chosen) for i in range(fresh.num_subpolicies)]
        kept = copy.deepcopy(run)
        kept.master_init = "keep"
        assert evaluate_method(env, kept, 0, "adapt", 1, seed=7).mean == rollout(env, run.policy, 7).total_return
    finally:
        env.close()


def test_a_meta_bundle_carries_its_master_init_checked(tmp_path: Path, emulator):
    run_dir, bundle_dir = tmp_path / "run", tmp_path / "bundle"
    overrides = [item for value in [*TINY_OVERRIDES, "mlsh.master_init=meta"] for item in ("--set", value)]
    metactl("train", "configs/a1_quick.yaml", "--run-dir", str(run_dir), "--quiet", *overrides)
    metactl("export", str(run_dir), "-o", str(bundle_dir))
    bundle = load_bundle(bundle_dir)
    assert new_task_master_init(bundle) == "meta"
    init = load_master_init(bundle)
    want = load_run(run_dir).master_init_state
    assert init.keys() == want.keys() and all(torch.equal(init[key], want[key]) for key in want)
    start = copy.deepcopy(load_run(run_dir).policy)
    assert start_task_master(start.master, "meta", init_state=init) == NEW_MASTER_ADAPT
    robot = emulator("--lockstep", "--task", "configs/tasks/a1_heldout_slippery.yaml")
    adapted = metactl("adapt", str(bundle_dir), "--port", robot.port, "-k", "2", "--seconds", "1")
    assert "return after:" in adapted.stdout and "adapting its current master" not in adapted.stderr
    kept = metactl("adapt", str(bundle_dir), "--port", robot.port, "-k", "2", "--seconds", "1", "--keep-master")
    assert "return after:" in kept.stdout
    # One episode gives a started master nothing to compare: refused before the link opens (an unused port).
    refused = metactl("adapt", str(bundle_dir), "--port", str(tmp_path / "no-port"), "-k", "1", check=False)
    assert refused.returncode != 0 and "-k must be at least 2 (got 1)" in refused.stderr
    assert "--keep-master" in refused.stderr and "Traceback" not in refused.stderr

    data = bytearray((bundle_dir / MASTER_INIT).read_bytes())
    data[-10] ^= 0xFF
    (bundle_dir / MASTER_INIT).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="master_init.pt is corrupted"):
        load_master_init(load_bundle(bundle_dir))
    (bundle_dir / MASTER_INIT).unlink()
    with pytest.raises(BundleError, match="lacks its meta-learned master initialization"):
        load_master_init(load_bundle(bundle_dir))

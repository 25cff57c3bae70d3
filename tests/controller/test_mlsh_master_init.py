"""`MLSHConfig.master_init`: reset, keep, or a Reptile-style meta-learned master initialization."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from controller.config import build, to_dict
from controller.errors import ConfigError
from controller.mlsh import MLSHTrainer, reptile_step
from controller.mlsh_config import MLSHConfig
from controller.mlsh_policy import MLSHPolicy
from controller.ppo import PPOConfig
from controller.rundir import RunDir
from sim.fast_tasks import PointNavEnv, PointNavTaskDistribution
from sim.samplers import make_vector_env

TASKS = PointNavTaskDistribution(angle_high=math.pi, num_angles=2, damping_low=1.0, damping_high=1.0)


def _config(**overrides) -> MLSHConfig:
    settings = dict(
        num_task_groups=3,
        warmup_iterations=1,
        joint_iterations=1,
        steps_per_iteration=80,
        master_init="meta",
        master_meta_step=0.5,
        master_ppo=PPOConfig(learning_rate=1e-2, num_minibatches=1, epochs=2),
        sub_ppo=PPOConfig(num_minibatches=2, epochs=2),
    )
    return MLSHConfig(**{**settings, **overrides})


def _trainer(config: MLSHConfig, path) -> MLSHTrainer:
    torch.manual_seed(0)
    policy = MLSHPolicy(4, 2, num_subpolicies=2, macro_steps=5, sub_hidden=(16, 16), master_hidden=(8, 8))
    envs = make_vector_env(PointNavEnv, 2, "inline")
    return MLSHTrainer(policy, envs, lambda rng: TASKS.sample_tasks(1, rng)[0], config, RunDir(path), seed=3)


def _assert_states_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_master_init_validation_and_the_deprecated_reset_master():
    assert MLSHConfig().master_init == "reset"
    with pytest.raises(ConfigError, match="master_init 'fresh' unknown; valid: reset, keep, meta"):
        MLSHConfig(master_init="fresh")
    with pytest.raises(ConfigError, match="master_meta_step"):
        MLSHConfig(master_meta_step=0.0)
    with pytest.warns(DeprecationWarning, match="master_init: keep"):
        old = build(MLSHConfig, {"reset_master": False}, "mlsh")
    assert (old.master_init, old.reset_master) == ("keep", None)
    with pytest.warns(DeprecationWarning):
        # A config saved before master_init existed resolves to today's default: resume sees no change.
        assert to_dict(build(MLSHConfig, {"reset_master": True}, "mlsh")) == to_dict(MLSHConfig())
    with pytest.raises(ConfigError, match="contradicts"):
        MLSHConfig(reset_master=False, master_init="meta")


def test_reptile_step_by_hand():
    init = {"w": torch.tensor([0.0, 2.0]), "count": torch.tensor(10.0, dtype=torch.float64)}
    trained = {"w": torch.tensor([4.0, -2.0]), "count": torch.tensor(30.0, dtype=torch.float64)}
    moved = reptile_step(init, trained, 0.25)
    torch.testing.assert_close(moved["w"], torch.tensor([1.0, 1.0]))  # 0 + 0.25 * 4, 2 + 0.25 * -4
    torch.testing.assert_close(moved["count"], torch.tensor(15.0, dtype=torch.float64))


def test_meta_init_moves_toward_each_trained_master_and_starts_each_group(tmp_path):
    trainer = _trainer(_config(), tmp_path)
    inits, trained = [], []
    started = []
    original_start = trainer.start_master

    def record_start(policy=None, generator=None):
        original_start(policy, generator)
        started.append(trainer.policy.master_state_dict())

    trainer.start_master = record_start
    inits.append(None)

    def on_group_end(t: MLSHTrainer) -> None:
        trained.append(t.policy.master_state_dict())
        inits.append({k: v.clone() for k, v in t.master_init_state.items()})

    try:
        trainer.train(progress=False, on_group_end=on_group_end)
    finally:
        trainer.envs.close()
        trainer.run_dir.close()
    # Group 0 starts from a freshly reset master, which is the first init.
    fresh = copy.deepcopy(trainer.policy)
    fresh.reset_master(torch.Generator().manual_seed(3 * 100_003))
    _assert_states_equal(started[0], fresh.master_state_dict())
    inits[0] = started[0]
    for group in range(3):
        # init_{g+1} = init_g + 0.5 (trained_g - init_g), and group g + 1 starts from init_{g+1}.
        want = {k: v + 0.5 * (trained[group][k] - v) for k, v in inits[group].items()}
        _assert_states_equal(inits[group + 1], want)
        if group + 1 < 3:
            _assert_states_equal(started[group + 1], inits[group + 1])
        assert not torch.equal(trained[group]["actor.0.weight"], inits[group]["actor.0.weight"])  # it trained
    # A meta-test task starts from the latest init, on a copy; the trained policy is untouched.
    before = trainer.policy.master_state_dict()
    trainer.start_master(fresh)
    _assert_states_equal(fresh.master_state_dict(), inits[-1])
    _assert_states_equal(trainer.policy.master_state_dict(), before)


@pytest.mark.parametrize("master_init", ["meta", "keep"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, master_init):
    whole = _trainer(_config(master_init=master_init), tmp_path / "whole")
    try:
        whole.train(progress=False)
    finally:
        whole.envs.close()
        whole.run_dir.close()

    first = _trainer(_config(master_init=master_init, num_task_groups=1), tmp_path / "split")
    try:
        first.train(progress=False)  # stops after group 0's checkpoint, as a killed run would
    finally:
        first.envs.close()
        first.run_dir.close()
    resumed = _trainer(_config(master_init=master_init), tmp_path / "split")
    try:
        assert resumed.resume_if_possible() and resumed.group == 1
        resumed.train(progress=False)
    finally:
        resumed.envs.close()
        resumed.run_dir.close()

    _assert_states_equal(resumed.policy.state_dict(), whole.policy.state_dict())
    if master_init == "meta":
        _assert_states_equal(resumed.master_init_state, whole.master_init_state)
    else:
        assert resumed.master_init_state is None and whole.master_init_state is None
    assert resumed.total_steps == whole.total_steps

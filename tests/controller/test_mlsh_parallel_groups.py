"""MLSH task groups side by side (`MLSHConfig.parallel_groups`): each block of env copies has its own
task and master, the sub-policies learn from all of them, and every backend gives the same run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from controller.errors import ConfigError
from controller.mlsh import MLSHTrainer
from controller.mlsh_config import MLSHConfig
from controller.mlsh_policy import MLSHPolicy
from controller.ppo import PPOConfig
from controller.rundir import RunDir
from sim.fast_tasks import PointNavEnv, PointNavTaskDistribution
from sim.samplers import make_vector_env
from sim.training import load_train_config, train

TASKS = PointNavTaskDistribution(angle_high=math.pi, num_angles=4, damping_low=1.0, damping_high=1.0)
NUM_ENVS = 4


def _config(**overrides) -> MLSHConfig:
    settings = dict(
        num_task_groups=4,
        parallel_groups=2,
        warmup_iterations=1,
        joint_iterations=1,
        steps_per_iteration=160,
        master_ppo=PPOConfig(learning_rate=1e-2, num_minibatches=1, epochs=2),
        sub_ppo=PPOConfig(num_minibatches=2, epochs=2),
    )
    return MLSHConfig(**{**settings, **overrides})


def _trainer(config: MLSHConfig, path, backend: str = "inline", sample_task=None) -> MLSHTrainer:
    torch.manual_seed(0)
    policy = MLSHPolicy(4, 2, num_subpolicies=2, macro_steps=5, sub_hidden=(16, 16), master_hidden=(8, 8))
    envs = make_vector_env(PointNavEnv, NUM_ENVS, backend)
    sample_task = sample_task or (lambda rng: TASKS.sample_tasks(1, rng)[0])
    return MLSHTrainer(policy, envs, sample_task, config, RunDir(path), seed=3)


def _run(trainer: MLSHTrainer, on_group_end=None) -> MLSHTrainer:
    try:
        trainer.train(progress=False, on_group_end=on_group_end)
    finally:
        trainer.envs.close()
        trainer.run_dir.close()
    return trainer


def _assert_states_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_parallel_groups_must_divide_the_task_groups_and_the_env_copies(tmp_path):
    with pytest.raises(ConfigError, match="mlsh.parallel_groups must be a positive integer"):
        MLSHConfig(parallel_groups=0)
    with pytest.raises(ConfigError, match=r"mlsh.parallel_groups = 2 must divide mlsh.num_task_groups = 3"):
        MLSHConfig(num_task_groups=3, parallel_groups=2)
    policy = MLSHPolicy(4, 2, num_subpolicies=2, macro_steps=5)
    envs = make_vector_env(PointNavEnv, 3, "inline")
    try:
        with pytest.raises(ConfigError, match=r"mlsh.parallel_groups = 2 must divide sampler.num_envs = 3"):
            MLSHTrainer(policy, envs, lambda rng: None, _config(), RunDir(tmp_path))
    finally:
        envs.close()
    envs = make_vector_env(PointNavEnv, 2, "process")
    try:
        with pytest.raises(ConfigError, match="use backend inline, worker or ray"):
            MLSHTrainer(policy, envs, lambda rng: None, _config(), RunDir(tmp_path))
    finally:
        envs.close()


def test_each_block_of_copies_runs_its_own_task_and_master(tmp_path):
    trainer = _trainer(_config(num_task_groups=2, master_init="reset"), tmp_path)
    sampled = []

    def sample_task(rng):
        sampled.append(PointNavTaskDistribution().sample_tasks(1, rng)[0])  # continuous: no repeats
        return sampled[-1]

    trainer.sample_task = sample_task
    tasks_seen = []
    _run(trainer, on_group_end=lambda t: tasks_seen.append(t.envs.call("get_task")))
    assert trainer.group == 2 and len(sampled) == 2
    assert sampled[0] != sampled[1]
    assert list(tasks_seen[0]) == [sampled[0], sampled[0], sampled[1], sampled[1]]
    # Two masters, both trained from their own fresh start, and the policy's is the first.
    assert trainer.masters[0] is trainer.policy.master
    assert not torch.equal(trainer.masters[0].actor[0].weight, trainer.masters[1].actor[0].weight)
    assert trainer.run_dir.has_checkpoint()


def test_a_groups_master_learns_from_its_own_copies_only(tmp_path):
    """Warm-up only (sub-policies frozen): changing group 1's task leaves group 0's master as it was."""
    tasks = TASKS.sample_tasks(3, np.random.default_rng(0))
    assert tasks[1] != tasks[2]
    masters = []
    for other in (tasks[1], tasks[2]):
        picks = iter([tasks[0], other])
        config = _config(num_task_groups=2, warmup_iterations=2, joint_iterations=0)
        trainer = _run(_trainer(config, tmp_path / str(len(masters)), sample_task=lambda rng, p=picks: next(p)))
        masters.append([master.state_dict() for master in trainer.masters])
    _assert_states_equal(masters[1][0], masters[0][0])
    assert not torch.equal(masters[1][1]["actor.0.weight"], masters[0][1]["actor.0.weight"])


def test_worker_backend_gives_the_same_run_as_inline(tmp_path):
    inline = _run(_trainer(_config(num_task_groups=2), tmp_path / "inline"))
    worker = _run(_trainer(_config(num_task_groups=2), tmp_path / "worker", backend="worker"))
    _assert_states_equal(worker.policy.state_dict(), inline.policy.state_dict())
    _assert_states_equal(worker.masters[1].state_dict(), inline.masters[1].state_dict())
    assert list(worker.recent_returns) == list(inline.recent_returns) and inline.recent_returns


def test_meta_init_steps_toward_the_mean_of_the_rounds_masters(tmp_path):
    trainer = _trainer(_config(num_task_groups=2, master_init="meta", master_meta_step=0.5), tmp_path)
    starts = []
    original_start = trainer.start_master

    def record_start(policy=None, generator=None):
        original_start(policy, generator)
        starts.append([{k: v.clone() for k, v in master.state_dict().items()} for master in trainer.masters])

    trainer.start_master = record_start
    _run(trainer)
    init = starts[0][0]
    _assert_states_equal(starts[0][1], init)  # both groups start from the same init
    trained = [master.state_dict() for master in trainer.masters]
    for key, value in init.items():
        if value.is_floating_point():
            want = value + 0.5 * ((trained[0][key] + trained[1][key]) / 2 - value)
            torch.testing.assert_close(trainer.master_init_state[key], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("master_init", ["keep", "meta"])
def test_resume_reproduces_an_uninterrupted_parallel_run(tmp_path, master_init):
    whole = _run(_trainer(_config(master_init=master_init), tmp_path / "whole"))
    _run(_trainer(_config(master_init=master_init, num_task_groups=2), tmp_path / "split"))  # a killed run
    resumed = _trainer(_config(master_init=master_init), tmp_path / "split")
    assert resumed.resume_if_possible() and resumed.group == 2
    _run(resumed)
    _assert_states_equal(resumed.policy.state_dict(), whole.policy.state_dict())
    _assert_states_equal(resumed.masters[1].state_dict(), whole.masters[1].state_dict())
    mismatched = _trainer(_config(master_init=master_init, parallel_groups=4), tmp_path / "split")
    try:
        with pytest.raises(ConfigError, match="checkpoint has 2 parallel groups"):
            mismatched.resume_if_possible()
    finally:
        mismatched.envs.close()
        mismatched.run_dir.close()


def test_a1_training_with_parallel_groups_from_the_config(tmp_path):
    overrides = [
        "mlsh.num_task_groups=2",
        "mlsh.parallel_groups=2",
        "mlsh.warmup_iterations=1",
        "mlsh.joint_iterations=1",
        "mlsh.steps_per_iteration=256",
        "env.episode_seconds=1.0",
        "sampler.num_envs=2",
        "sampler.backend=worker",
    ]
    assert load_train_config("configs/a1_quick.yaml", overrides).mlsh.parallel_groups == 2
    run_dir = train("configs/a1_quick.yaml", overrides, run_dir=tmp_path / "run", progress=False)
    rows = run_dir.read_metrics()
    assert len(rows) == 2  # one row per iteration of the single round of two groups
    assert "master/approx_kl" in rows[0] and "sub/approx_kl" in rows[1]
    checkpoint = run_dir.load_checkpoint()
    assert checkpoint["group"] == 2 and len(checkpoint["group_masters"]) == 1

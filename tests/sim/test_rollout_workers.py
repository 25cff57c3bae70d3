"""Sampler backend "worker" (sim/rollout_workers.py): rollouts run in the workers equal those the MLSH
trainer collects itself over the same envs, for the same seed, bit for bit."""

from __future__ import annotations

import functools
import tempfile

import numpy as np
import pytest
import torch

from controller import mlsh
from controller.mlsh_config import MLSHConfig
from controller.mlsh_policy import MLSHPolicy
from controller.rollout import RolloutCollector
from controller.rundir import RunDir
from sim.env import LocomotionEnv
from sim.rollout_workers import RolloutWorkerVectorEnv
from sim.samplers import make_vector_env
from sim.tasks import Task

NUM_ENVS = 2
# 0.5 s at 50 Hz = 25 control steps: episodes end (and autoreset) inside every 30-step rollout.
ENV_FN = functools.partial(LocomotionEnv, "a1", episode_seconds=0.5)


def _policy(num_subpolicies: int) -> MLSHPolicy:
    torch.manual_seed(0)
    policy = MLSHPolicy(47, 12, num_subpolicies=num_subpolicies, macro_steps=4)
    with torch.no_grad():  # away from the init, so the master's choices and both normalizers matter
        for parameter in policy.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        policy.sub_normalizer.update(torch.randn(500, 47) * 3 + 1)
        policy.master.update_normalizer(torch.randn(500, 47) * 2)
    return policy


def _collect(backend: str, num_subpolicies: int, num_steps: int = 30) -> tuple[list[dict], np.ndarray]:
    """Two consecutive `MLSHTrainer._collect` calls (obs and episode returns carried over) on `backend`."""
    envs = make_vector_env(ENV_FN, NUM_ENVS, backend)
    try:
        trainer = mlsh.MLSHTrainer(
            _policy(num_subpolicies), envs, lambda rng: None, MLSHConfig(), RunDir(tempfile.mkdtemp()), seed=0
        )
        assert isinstance(envs, RolloutCollector) == (backend == "worker")
        obs, _ = envs.reset(seed=3)
        torch.manual_seed(1)
        rollouts = []
        for _ in range(2):
            obs, rollout = trainer._collect(obs, num_steps)
            rollouts.append(rollout)
        return rollouts, obs
    finally:
        envs.close()


@pytest.mark.parametrize("num_subpolicies", [1, 3])
def test_worker_rollouts_equal_the_trainers_own(num_subpolicies: int) -> None:
    want, want_obs = _collect("inline", num_subpolicies)
    got, got_obs = _collect("worker", num_subpolicies)
    np.testing.assert_array_equal(got_obs, want_obs)
    for got_rollout, want_rollout in zip(got, want):
        assert got_rollout.keys() == want_rollout.keys()
        for key, value in want_rollout.items():
            if isinstance(value, np.ndarray):
                assert got_rollout[key].dtype == value.dtype, key
                np.testing.assert_array_equal(got_rollout[key], value, err_msg=key)
            else:
                assert got_rollout[key] == value, key
    assert want[0]["finished_returns"] and want[1]["finished_returns"]  # episodes ended inside both
    if num_subpolicies > 1:  # the master decided more than once per copy (macro-steps of 4)
        assert (want[0]["decided"].sum(0) > 1).all()


def _train(backend: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A tiny MLSH run (1 task group: 1 warm-up and 1 joint iteration) on `backend`."""
    envs = make_vector_env(ENV_FN, NUM_ENVS, backend)
    try:
        config = MLSHConfig(num_task_groups=1, warmup_iterations=1, joint_iterations=1, steps_per_iteration=64)
        torch.manual_seed(0)
        policy = MLSHPolicy(47, 12, num_subpolicies=2, macro_steps=4)
        trainer = mlsh.MLSHTrainer(
            policy, envs, lambda rng: Task(command_vx=0.5), config, RunDir(tempfile.mkdtemp()), seed=5
        )
        trainer.train(progress=False)
        return policy.state_dict(), list(trainer.recent_returns)
    finally:
        envs.close()


def test_training_on_workers_matches_training_inline() -> None:
    want_state, want_returns = _train("inline")
    got_state, got_returns = _train("worker")
    assert got_returns == want_returns and want_returns
    for name, value in want_state.items():
        torch.testing.assert_close(got_state[name], value, rtol=0, atol=0, msg=name)


def test_worker_errors_carry_the_workers_traceback() -> None:
    envs = RolloutWorkerVectorEnv([ENV_FN] * NUM_ENVS)
    try:
        with pytest.raises(RuntimeError, match=r"env copy 0:(.|\n)*AttributeError"):
            envs.call("no_such_method")
        envs.reset(seed=0)  # the workers keep serving after an error
    finally:
        envs.close()
    assert all(not process.is_alive() for process in envs.processes)

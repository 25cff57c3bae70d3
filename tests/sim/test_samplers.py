"""Samplers (sim/samplers.py): one VectorEnv interface, same trajectories on inline, process and Ray."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator

import gymnasium as gym
import numpy as np
import pytest

from controller.errors import ConfigError
from sim import training
from sim.env import LocomotionEnv
from sim.samplers import BACKENDS, make_vector_env
from sim.tasks import Task

NUM_ENVS = 2
NUM_STEPS = 60
# 0.5 s at 50 Hz = 25 control steps: every copy truncates (and autoresets) at least twice in 60 steps.
ENV_FN = functools.partial(LocomotionEnv, "a1", episode_seconds=0.5)


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    """Ray is started by the first RayVectorEnv (the local-start path) and shut down here."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    yield
    ray.shutdown()


def make(backend: str) -> gym.vector.VectorEnv:
    return make_vector_env(ENV_FN, NUM_ENVS, backend)


def rollout(envs: gym.vector.VectorEnv, actions: np.ndarray) -> dict[str, np.ndarray]:
    """Reset with seed 123, apply `actions` (steps, num_envs, act_dim); everything stacked per step."""
    obs, _ = envs.reset(seed=123)
    record: dict[str, list] = {"reset_obs": [obs], "obs": [], "reward": [], "terminated": [], "truncated": []}
    record |= {"final_obs": [], "final_mask": [], "final_base_vel": [], "info_keys": []}
    for action in actions:
        obs, reward, terminated, truncated, info = envs.step(action)
        done = terminated | truncated
        final = np.full((envs.num_envs, envs.single_observation_space.shape[0]), np.nan, np.float32)
        final_base_vel = np.full((envs.num_envs, 3), np.nan)
        mask = info.get("_final_obs", np.zeros(envs.num_envs, bool))
        for index in np.flatnonzero(mask):
            final[index] = info["final_obs"][index]
            final_base_vel[index] = info["final_info"]["base_vel"][index]
        np.testing.assert_array_equal(mask, done)  # final_obs exactly on the done rows
        for key, value in (
            ("obs", obs),
            ("reward", reward),
            ("terminated", terminated),
            ("truncated", truncated),
            ("final_obs", final),
            ("final_mask", mask),
            ("final_base_vel", final_base_vel),
            ("info_keys", " ".join(sorted(info))),
        ):
            record[key].append(value)
    return {key: np.asarray(value) for key, value in record.items()}


ACTIONS = np.random.default_rng(7).uniform(-1.0, 1.0, (NUM_STEPS, NUM_ENVS, 12)).astype(np.float32)


def run_backend(backend: str) -> dict[str, np.ndarray]:
    envs = make(backend)
    try:
        return rollout(envs, ACTIONS)
    finally:
        envs.close()


@pytest.fixture(scope="module")
def inline_reference() -> dict[str, np.ndarray]:
    reference = run_backend("inline")
    assert reference["truncated"].sum() >= 2 * NUM_ENVS  # autoreset happened on every copy
    assert reference["obs"].dtype == np.float32 and reference["reward"].dtype == np.float64
    return reference


@pytest.mark.parametrize("backend", ["process", "ray", "worker"])
def test_same_seed_same_trajectories_on_every_backend(
    backend: str, inline_reference: dict[str, np.ndarray], request: pytest.FixtureRequest
) -> None:
    if backend == "ray":
        request.getfixturevalue("ray_runtime")
    result = run_backend(backend)
    for key, value in inline_reference.items():
        np.testing.assert_array_equal(result[key], value, err_msg=f"{backend}: {key}")


def test_int_seed_gives_copy_i_seed_plus_i(ray_runtime: None) -> None:
    single = ENV_FN()
    expected = np.stack([single.reset(seed=123)[0], single.reset(seed=124)[0]])
    single.close()
    envs = make("ray")
    try:
        obs, info = envs.reset(seed=123)
        np.testing.assert_array_equal(obs, expected)
        assert info["_task"].tolist() == [True, True]
        with pytest.raises(ValueError, match="3 seeds for num_envs=2"):
            envs.reset(seed=[1, 2, 3])
    finally:
        envs.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_task_reaches_every_copy(backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "ray":
        request.getfixturevalue("ray_runtime")
    envs = make(backend)
    try:
        task = Task(friction=0.4, added_mass=1.5, command_vx=0.8)
        envs.call("set_task", task)
        assert envs.call("get_task") == (task, task)
        envs.reset(seed=0)  # a task persists across resets
        assert envs.call("get_task") == (task, task)
        assert envs.get_attr("max_steps") == (25, 25)
    finally:
        envs.close()


def test_close_kills_the_ray_actors(ray_runtime: None) -> None:
    import ray

    envs = make("ray")
    actors = list(envs.actors)
    envs.close()
    assert envs.closed and envs.actors == []
    # ray.kill is asynchronous: a call may still be served while the kill is in flight, so poll.
    deadline = time.monotonic() + 10.0
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(actors[0].describe.remote(), timeout=10)
            time.sleep(0.05)


def test_unknown_backend_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'threads' unknown; valid: inline, process, ray"):
        make_vector_env(ENV_FN, 2, "threads")
    with pytest.raises(ConfigError, match="num_envs must be >= 1, got 0"):
        make_vector_env(ENV_FN, 0, "inline")


def test_ray_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]'"):
        make_vector_env(ENV_FN, 1, "ray")


def test_training_config_delegates_to_the_sampler() -> None:
    config = training.TrainConfig(
        sampler=training.SamplerConfig(num_envs=1, backend="inline"), env=training.EnvConfig(episode_seconds=0.5)
    )
    envs = training.make_vector_env(config)
    try:
        assert isinstance(envs, gym.vector.SyncVectorEnv) and envs.num_envs == 1
        assert envs.get_attr("max_steps") == (25,)
    finally:
        envs.close()
    assert training.SamplerConfig(backend="ray").ray_address is None
    with pytest.raises(ConfigError, match="valid: inline, process, ray"):
        training.SamplerConfig(backend="dask")

"""Samplers: N env copies behind one interface, Gymnasium's `VectorEnv`.

Four backends, picked by name, all with SAME_STEP autoreset (a done row's `obs` is already the
first observation of the next episode; the last one is in `info["final_obs"][i]`, flagged by
`info["_final_obs"][i]`), so a trainer written against one runs unchanged on the others:

    inline   gymnasium.vector.SyncVectorEnv   every copy in this process (debugging, tests)
    process  gymnasium.vector.AsyncVectorEnv  one persistent worker process per copy
    ray      RayVectorEnv                     one Ray actor per copy, local or on a cluster
    worker   RolloutWorkerVectorEnv           one worker process per copy that also runs the policy:
                                              a trainer that knows `RolloutCollector` gets a whole
                                              rollout per copy in one message (sim/rollout_workers.py)

The same seed gives the same trajectories on every backend. Ray is imported only for "ray".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

from controller.errors import ConfigError

BACKENDS = ("inline", "process", "ray", "worker")
RAY_OBJECT_STORE_BYTES = 200 * 1024**2
"""Object store of a locally started Ray: observations are tiny, so keep its memory small."""

AUTORESET_MODE = gym.vector.AutoresetMode.SAME_STEP


def make_vector_env(
    env_fn: Callable[[], gym.Env],
    num_envs: int,
    backend: str,
    *,
    ray_address: str | None = None,
    context: str | None = None,
) -> gym.vector.VectorEnv:
    """`num_envs` copies of `env_fn()` stepped together by `backend`.

    Args:
        env_fn: Builds one env; called once per copy, in the worker that steps it (must pickle for
            "process" with a spawn context and for "ray").
        num_envs: Env copies.
        backend: "inline", "process", "ray" or "worker".
        ray_address: Ray cluster to join ("auto", "ray://host:10001", ...); None starts a local
            Ray with one CPU per copy. Ignored when Ray is already initialized.
        context: multiprocessing start method for "process" and "worker" (None: the platform default).

    Returns:
        The vector env; the caller closes it.

    Raises:
        ConfigError: Unknown backend, `num_envs` < 1, or "ray" without Ray installed.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"sampler backend '{backend}' unknown; valid: {', '.join(BACKENDS)}")
    if num_envs < 1:
        raise ConfigError(f"num_envs must be >= 1, got {num_envs}")
    env_fns = [env_fn] * num_envs
    if backend == "inline":
        return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=AUTORESET_MODE)
    if backend == "process":
        return gym.vector.AsyncVectorEnv(env_fns, autoreset_mode=AUTORESET_MODE, context=context)
    if backend == "worker":
        from sim.rollout_workers import RolloutWorkerVectorEnv  # it builds on this module

        return RolloutWorkerVectorEnv(env_fns, context=context)
    return RayVectorEnv(env_fns, ray_address=ray_address)


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise ConfigError("sampler backend 'ray' needs Ray: pip install -e '.[ray]'") from error
    return ray


class EnvWorker:
    """One env, stepped with SAME_STEP autoreset exactly as Gymnasium's async worker does.

    Runs inside a Ray actor (`RayVectorEnv`); plain Python so it is testable without Ray.
    """

    def __init__(self, env_fn: Callable[[], gym.Env]) -> None:
        self.env = env_fn()

    def describe(self) -> tuple[gym.Space, gym.Space, dict[str, Any], str | None]:
        return self.env.observation_space, self.env.action_space, dict(self.env.metadata), self.env.render_mode

    def reset(self, seed: int | None, options: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            reset_obs, reset_info = self.env.reset()
            info = {"final_info": info, "final_obs": obs, **reset_info}
            obs = reset_obs
        return obs, reward, terminated, truncated, info

    def call(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        attribute = self.env.get_wrapper_attr(name)
        return attribute(*args, **kwargs) if callable(attribute) else attribute

    def set_attr(self, name: str, value: Any) -> None:
        self.env.set_wrapper_attr(name, value)

    def close(self) -> None:
        self.env.close()


class RemoteVectorEnv(gym.vector.VectorEnv):
    """Gymnasium VectorEnv over `EnvWorker`s that live elsewhere, one per copy (Ray actors, worker processes).

    A subclass starts its workers, implements `_call_workers` and calls `_describe_workers`; reset,
    step, call and set_attr are shared. Autoreset is SAME_STEP with Gymnasium's info layout.
    """

    def _call_workers(self, method: str, args: Sequence[tuple]) -> list[Any]:
        """`EnvWorker.<method>(*args[i])` on every copy i at once; the results in copy order."""
        raise NotImplementedError

    def _describe_workers(self, num_envs: int, copy: bool) -> None:
        """Read the spaces from the workers (all must match) and set up the batched spaces."""
        self.copy = copy
        self.num_envs = num_envs
        self.autoreset_mode = AUTORESET_MODE
        descriptions = self._call_workers("describe", [()] * num_envs)
        self.single_observation_space, self.single_action_space, self.metadata, self.render_mode = descriptions[0]
        for index, (observation_space, action_space, _, _) in enumerate(descriptions):
            if observation_space != self.single_observation_space or action_space != self.single_action_space:
                self.close()
                raise RuntimeError(f"env copy {index} has other spaces than copy 0; all copies must match")
        self.metadata["autoreset_mode"] = self.autoreset_mode
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._observations = create_empty_array(self.single_observation_space, n=self.num_envs, fn=np.zeros)

    def _gather(self, env_obs: Sequence[Any]) -> Any:
        self._observations = concatenate(self.single_observation_space, env_obs, self._observations)
        return deepcopy(self._observations) if self.copy else self._observations

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset every copy; an int seed gives copy i the seed `seed + i` (as Gymnasium does).

        Returns:
            observations (num_envs, *obs_shape) and the batched infos.
        """
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, int):
            seeds = [seed + index for index in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"got {len(seeds)} seeds for num_envs={self.num_envs}")
        if options is not None and "reset_mask" in options:
            raise ValueError(f"{type(self).__name__} does not support options['reset_mask'] (it autoresets SAME_STEP)")
        results = self._call_workers("reset", [(single_seed, options) for single_seed in seeds])
        infos: dict[str, Any] = {}
        for index, (_, info) in enumerate(results):
            infos = self._add_info(infos, info, index)
        return self._gather([obs for obs, _ in results]), infos

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every copy in parallel; done copies are reset in the same call.

        Args:
            actions: (num_envs, *action_shape).

        Returns:
            observations (num_envs, *obs_shape), rewards (num_envs,) float64, terminations and
            truncations (num_envs,) bool, infos with `final_obs` / `final_info` on done rows.
        """
        results = self._call_workers("step", [(action,) for action in iterate(self.action_space, actions)])
        infos: dict[str, Any] = {}
        for index, result in enumerate(results):
            infos = self._add_info(infos, result[4], index)
        return (
            self._gather([result[0] for result in results]),
            np.array([result[1] for result in results], dtype=np.float64),
            np.array([result[2] for result in results], dtype=np.bool_),
            np.array([result[3] for result in results], dtype=np.bool_),
            infos,
        )

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call method `name` (or read attribute `name`) on every copy; one result per copy."""
        return tuple(self._call_workers("call", [(name, args, kwargs)] * self.num_envs))

    def call_each(self, name: str, args: Sequence[tuple]) -> tuple[Any, ...]:
        """Call method `name` on every copy i with its own positional arguments `args[i]`; one result per copy."""
        if len(args) != self.num_envs:
            raise ValueError(f"got {len(args)} argument tuples for num_envs={self.num_envs}")
        return tuple(self._call_workers("call", [(name, tuple(single), {}) for single in args]))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        """Set attribute `name` on every copy: one value for all, or a list/tuple of num_envs values."""
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"got {len(values)} values for num_envs={self.num_envs}")
        self._call_workers("set_attr", [(name, value) for value in values])

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close()


class RayVectorEnv(RemoteVectorEnv):
    """Gymnasium VectorEnv over Ray actors: one actor (holding one env) per copy.

    `step` sends every copy its action and waits for all of them (`ray.get` over the actors), so
    the copies run in parallel on as many cores (or machines) as Ray has. Autoreset is SAME_STEP
    with Gymnasium's info layout. Ray is initialized here only if it is not already: pass
    `ray_address` to join an existing cluster; a local start gets one CPU per copy and a small
    object store. `close()` kills the actors but leaves Ray running for reuse (`ray.shutdown()`
    or process exit stops it).
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        *,
        ray_address: str | None = None,
        num_cpus_per_env: float = 1.0,
        copy: bool = True,
    ) -> None:
        super().__init__()
        if len(env_fns) < 1:
            raise ConfigError("RayVectorEnv needs at least one env_fn")
        ray = _import_ray()
        self._ray = ray
        if not ray.is_initialized():
            init_kwargs: dict[str, Any] = {"address": ray_address, "include_dashboard": False}
            if ray_address is None and "RAY_ADDRESS" not in os.environ:
                # A fresh local runtime: size it to the copies, not to the machine.
                init_kwargs.update(num_cpus=len(env_fns), object_store_memory=RAY_OBJECT_STORE_BYTES)
            ray.init(**init_kwargs)
        actor_class = ray.remote(num_cpus=num_cpus_per_env)(EnvWorker)
        self.actors = [actor_class.remote(env_fn) for env_fn in env_fns]
        self._describe_workers(len(env_fns), copy)

    def _call_workers(self, method: str, args: Sequence[tuple]) -> list[Any]:
        return self._ray.get([getattr(actor, method).remote(*a) for actor, a in zip(self.actors, args, strict=True)])

    def close_extras(self, **kwargs: Any) -> None:
        """Close every env, then kill its actor (Ray itself keeps running)."""
        actors, self.actors = getattr(self, "actors", []), []
        if not actors or not self._ray.is_initialized():
            return
        try:
            self._ray.get([actor.close.remote() for actor in actors], timeout=10)
        finally:
            for actor in actors:
                self._ray.kill(actor)

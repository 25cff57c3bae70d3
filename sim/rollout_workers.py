"""Sampler backend "worker": one worker process per env copy that also runs the rollout policy.

The "process" backend exchanges one message pair per control step with every worker, and the main
process runs the policy in between while the workers wait. Here each worker holds its env copy and
a copy of the rollout networks: once per iteration the main process sends every worker the policy's
weights, that copy's share of the sampling noise and its running episode return; the worker runs
`collect_segment` on its own copy and answers with the whole segment in one message. The segments
are the columns of the segment the main process would collect over all copies (same seed, same
trajectories), so the trainer sees no difference but the speed.

Between rollouts it is an ordinary Gymnasium VectorEnv (reset, step, call, get_attr, set_attr;
SAME_STEP autoreset), so everything else that drives envs works unchanged.

    main                                  worker i (env copy i)
    ---- ("rollout", weights, noise[:, i], ...) -->
                                          T x (policy -> env.step) on its own copy
    <--- ("ok", (next obs, segment [T, 1, ...], episode return)) ----
"""

from __future__ import annotations

import contextlib
import multiprocessing
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from controller.errors import ConfigError
from controller.mlsh_policy import MLSHPolicy
from controller.policies import CategoricalMLPPolicy
from controller.rollout import RolloutNetworks, StepFn, collect_segment
from sim.samplers import EnvWorker, RemoteVectorEnv

CLOSE_TIMEOUT_S = 10.0
"""How long `close` waits for a worker to exit before terminating it."""


def _single_step(worker: EnvWorker) -> StepFn:
    """`collect_segment`'s step over one env copy (SAME_STEP autoreset through `EnvWorker.step`)."""

    def step(actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        obs, reward, terminated, truncated, info = worker.step(actions[0])
        final_obs = {0: info["final_obs"]} if terminated or truncated else {}
        return (
            np.asarray(obs, np.float32)[None],
            np.array([reward], np.float64),
            np.array([terminated]),
            np.array([truncated]),
            final_obs,
        )

    return step


class _RolloutRunner:
    """The worker's side of `collect_rollout`: a policy rebuilt from the main process's weights."""

    def __init__(self, worker: EnvWorker) -> None:
        self.step = _single_step(worker)
        self.policy: MLSHPolicy | None = None

    def __call__(
        self,
        policy_config: dict[str, Any],
        weights: dict[str, np.ndarray],
        obs: np.ndarray,
        noise: np.ndarray,
        uniforms: np.ndarray | None,
        episode_returns: np.ndarray,
        settings: dict[str, Any],
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        if self.policy is None or self.policy.config != policy_config:
            self.policy = MLSHPolicy(**policy_config)
        self.policy.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()})
        with torch.inference_mode():
            obs, data = collect_segment(
                RolloutNetworks(self.policy), self.step, obs, noise, uniforms, episode_returns, **settings
            )
        return obs, data, episode_returns


def _work(connection: Connection, env_fn: Callable[[], gym.Env]) -> None:
    """A worker process: serve (command, args) messages until "close"; errors go back as tracebacks."""
    torch.set_num_threads(1)  # one core per copy: intra-op threads would only fight the other workers
    worker: EnvWorker | None = None
    try:
        worker = EnvWorker(env_fn)
        runner = _RolloutRunner(worker)
        connection.send(("ok", None))
        while True:
            command, args = connection.recv()
            if command == "close":
                break
            try:
                result = runner(*args) if command == "rollout" else getattr(worker, command)(*args)
                connection.send(("ok", result))
            except Exception:  # noqa: BLE001 - the main process re-raises it with the worker's traceback
                connection.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):  # the main process went away or was interrupted
        pass
    except Exception:  # noqa: BLE001 - building the env failed
        connection.send(("error", traceback.format_exc()))
    finally:
        if worker is not None:
            worker.close()
        connection.close()


class RolloutWorkerVectorEnv(RemoteVectorEnv):
    """One worker process per env copy; `collect_rollout` runs the policy in the workers (a `RolloutCollector`).

    Args:
        env_fns: One env builder per copy, called in its worker (must pickle for a spawn context).
        context: multiprocessing start method (None: the platform default).
        copy: Return copies of the batched observations from reset/step.
    """

    def __init__(
        self, env_fns: Sequence[Callable[[], gym.Env]], *, context: str | None = None, copy: bool = True
    ) -> None:
        super().__init__()
        if len(env_fns) < 1:
            raise ConfigError("RolloutWorkerVectorEnv needs at least one env_fn")
        mp_context = multiprocessing.get_context(context)
        self.connections: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for index, env_fn in enumerate(env_fns):
            parent, child = mp_context.Pipe()
            process = mp_context.Process(target=_work, args=(child, env_fn), name=f"RolloutWorker-{index}", daemon=True)
            process.start()
            child.close()
            self.connections.append(parent)
            self.processes.append(process)
        try:
            self._receive_all()  # every env is built
        except Exception:
            self.close()
            raise
        self._describe_workers(len(env_fns), copy)

    def _receive_all(self) -> list[Any]:
        """One answer from every worker, in copy order; raises the first worker error."""
        results, errors = [], []
        for index, connection in enumerate(self.connections):
            try:
                status, result = connection.recv()
            except EOFError:
                status, result = "error", f"worker {index} exited (exit code {self.processes[index].exitcode})"
            if status == "error":
                errors.append(f"env copy {index}:\n{result}")
            results.append(result)
        if errors:
            raise RuntimeError("rollout worker failed: " + "\n".join(errors))
        return results

    def _call_workers(self, method: str, args: Sequence[tuple]) -> list[Any]:
        for connection, single_args in zip(self.connections, args, strict=True):
            connection.send((method, single_args))
        return self._receive_all()

    def collect_rollout(
        self,
        policy: MLSHPolicy,
        obs: np.ndarray,
        noise: np.ndarray,
        uniforms: np.ndarray | None,
        episode_returns: np.ndarray,
        *,
        macro_steps: int,
        epsilon: float,
        masters: Sequence[CategoricalMLPPolicy] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`collect_segment` over every copy, each copy's columns run in its own worker.

        Args:
            policy: The policy to act with; its weights go to every worker.
            masters: One master per equal, contiguous block of copies (see `RolloutNetworks`); each
                worker gets its block's master in place of the policy's.
            obs: [E, obs_dim] the current observations (those the copies' last reset/step returned).
            noise: [T, E, act_dim]; uniforms: [T, E, 3] or None (see `collect_segment`).
            episode_returns: [E] running episode returns; updated in place.
            macro_steps, epsilon: As `collect_segment`.

        Returns:
            The next observations [E, obs_dim] and the segment, as `collect_segment` over all copies.
        """
        weights = {name: value.numpy() for name, value in policy.state_dict().items()}
        masters = [policy.master] if masters is None else list(masters)
        if self.num_envs % len(masters):
            raise ValueError(f"{self.num_envs} env copies do not split into {len(masters)} equal master blocks")
        block = self.num_envs // len(masters)
        copy_weights = [
            {**weights, **{f"master.{name}": value.numpy() for name, value in master.state_dict().items()}}
            for master in masters
        ]
        settings = {"macro_steps": macro_steps, "epsilon": epsilon}
        args = [
            (
                policy.config,
                copy_weights[index // block],
                obs[index : index + 1],
                np.ascontiguousarray(noise[:, index : index + 1]),
                None if uniforms is None else np.ascontiguousarray(uniforms[:, index : index + 1]),
                episode_returns[index : index + 1].copy(),
                settings,
            )
            for index in range(self.num_envs)
        ]
        results = self._call_workers("rollout", args)
        episode_returns[:] = np.concatenate([returns for _, _, returns in results])
        segments = [segment for _, segment, _ in results]
        data = {key: np.concatenate([segment[key] for segment in segments], axis=1) for key in segments[0]}
        return np.concatenate([next_obs for next_obs, _, _ in results]), data

    def close_extras(self, **kwargs: Any) -> None:
        """Ask every worker to close its env and exit; terminate any that does not within the timeout."""
        connections, self.connections = getattr(self, "connections", []), []
        for connection in connections:
            with contextlib.suppress(OSError):  # a worker that already exited
                connection.send(("close", ()))
        for process in getattr(self, "processes", []):
            process.join(CLOSE_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join()
        for connection in connections:
            connection.close()

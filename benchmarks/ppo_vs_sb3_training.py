"""The two sides benchmarks/ppo_vs_sb3.py compares: each trained on one shared setup, timed, and evaluated.

Ours is the MLSH trainer with one sub-policy and no warm-up, built through `sim.training` from
overrides (`our_config`); SB3 is `PPO("MlpPolicy")` behind `VecNormalize` and `Monitor`, with the
settings taken from the same config. Each training run returns its steps, wall seconds and steps/s
over the training loop alone, CPU time per env step with the critical-path rate (`_cpu_stats`), the
returns of its last training episodes and a deterministic `act`, which `evaluate` runs on the fixed
task. benchmarks/ppo_vs_sb3.py describes the comparison and what it reports.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from controller.mlsh import MLSHTrainer
from controller.rundir import RunDir
from sim import training
from sim.env import LocomotionEnv
from sim.tasks import Task, TaskDistribution

ROBOT = "a1"
ROLLOUT_STEPS = 2048
"""Env steps per PPO iteration, summed over the env copies (SB3: n_steps * n_envs)."""
EPISODE_SECONDS = 5.0
TASK = {"command_vx": 0.5}
"""The fixed task: the nominal robot asked to walk at 0.5 m/s."""
SEED = 0
NUM_RECENT_EPISODES = 10
"""Training episodes averaged for the final training return."""
EVAL_SEED = 10_000


def _worker_cpu_seconds(processes: list[Any]) -> np.ndarray:
    """User + system CPU seconds so far of each live worker process (Linux /proc; 0 elsewhere)."""
    seconds = np.zeros(len(processes))
    for index, process in enumerate(processes):
        try:
            with open(f"/proc/{process.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[index] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return seconds


def _cpu_stats(steps: int, main_seconds: float, worker_seconds: np.ndarray) -> dict[str, float]:
    """CPU per env step (main process; all processes) and the critical-path rate.

    The critical path: the main process and the env workers take turns (every configuration here is
    synchronous: SB3 and the process backend per step, the worker backend per iteration), and the
    workers share the cores, so an idle machine needs at least main + max(busiest worker, all workers
    / cores) seconds. steps / that is what the configuration would reach with the cores to itself and
    free message passing: an upper bound that background load moves far less than wall time.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busiest = max(float(worker_seconds.max(initial=0.0)), float(worker_seconds.sum()) / cores)
    return {
        "main_cpu_us_per_step": 1e6 * main_seconds / steps,
        "cpu_us_per_step": 1e6 * (main_seconds + float(worker_seconds.sum())) / steps,
        "critical_path_steps_per_s": steps / (main_seconds + busiest),
    }


def our_config(total_steps: int, backend: str, num_envs: int, seed: int = SEED) -> training.TrainConfig:
    """Domain-randomized PPO as a training config: MLSH with one sub-policy and one fixed task."""
    overrides = [
        f"seed={seed}",
        f"env.episode_seconds={EPISODE_SECONDS}",
        "tasks=" + json.dumps(TASK),
        "policy.num_subpolicies=1",
        "mlsh.num_task_groups=1",
        "mlsh.warmup_iterations=0",
        f"mlsh.joint_iterations={total_steps // ROLLOUT_STEPS}",
        f"mlsh.steps_per_iteration={ROLLOUT_STEPS}",
        f"sampler.backend={backend}",
        f"sampler.num_envs={num_envs}",
    ]
    return training.load_train_config(None, overrides)


def train_ours(total_steps: int, backend: str, num_envs: int, threads: int, seed: int = SEED) -> dict[str, Any]:
    """Train; steps/s over the training loop (from `train()` to the end of its task group)."""
    config = our_config(total_steps, backend, num_envs, seed)
    distribution = TaskDistribution.from_dict(config.tasks)
    torch.manual_seed(config.seed)
    torch.set_num_threads(threads)
    envs = training.make_vector_env(config)
    with tempfile.TemporaryDirectory() as path:
        run_dir = RunDir(path)
        try:
            policy = training.build_policy(
                config, envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
            )
            trainer = MLSHTrainer(
                policy, envs, lambda rng: distribution.sample_tasks(1, rng)[0], config.mlsh, run_dir, config.seed
            )
            workers = list(getattr(envs, "processes", []))  # process and worker backends
            ended: list[tuple[float, float, float]] = []
            start, cpu_start, workers_start = time.perf_counter(), time.process_time(), _worker_cpu_seconds(workers)
            trainer.train(
                progress=False,
                on_group_end=lambda _: ended.append(
                    (time.perf_counter(), time.process_time(), _worker_cpu_seconds(workers))
                ),
            )
        finally:
            envs.close()
            run_dir.close()
    seconds, cpu_seconds, worker_cpu_seconds = ended[0][0] - start, ended[0][1] - cpu_start, ended[0][2] - workers_start
    cpu = _cpu_stats(trainer.total_steps, cpu_seconds, worker_cpu_seconds)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        option = torch.zeros(1, dtype=torch.long)
        return policy.sub_act(torch.as_tensor(obs, dtype=torch.float32)[None], option, deterministic=True)[0][0].numpy()

    return {
        "steps": trainer.total_steps,
        "seconds": seconds,
        "steps_per_s": trainer.total_steps / seconds,
        **cpu,
        "recent_returns": list(trainer.recent_returns)[-NUM_RECENT_EPISODES:],
        "act": act,
    }


def _sb3_env(episode_seconds: float, task: dict[str, float]) -> Any:
    from stable_baselines3.common.monitor import Monitor

    return Monitor(LocomotionEnv(ROBOT, Task.from_dict(task), episode_seconds=episode_seconds))


def train_sb3(total_steps: int, vec: str, num_envs: int, threads: int, seed: int = SEED) -> dict[str, Any]:
    """The same PPO in SB3; steps/s over `model.learn` (env construction excluded)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    config = our_config(total_steps, "inline", num_envs, seed)
    ppo, mlsh, hidden = config.mlsh.sub_ppo, config.mlsh, list(config.policy.sub_hidden)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    env_fns = [functools.partial(_sb3_env, config.env.episode_seconds, TASK)] * num_envs
    venv = DummyVecEnv(env_fns) if vec == "dummy" else SubprocVecEnv(env_fns)
    # Observation normalization as our policy's normalizer: epsilon 1e-8, clip 10; rewards left raw.
    venv = VecNormalize(venv, norm_obs=True, norm_reward=False, clip_obs=10.0, gamma=mlsh.gamma, epsilon=1e-8)
    try:
        model = PPO(
            "MlpPolicy",
            venv,
            learning_rate=ppo.learning_rate,
            n_steps=ROLLOUT_STEPS // num_envs,
            batch_size=ROLLOUT_STEPS // ppo.num_minibatches,
            n_epochs=ppo.epochs,
            gamma=mlsh.gamma,
            gae_lambda=mlsh.lam,
            clip_range=ppo.clip_ratio,
            ent_coef=ppo.entropy_coef,
            vf_coef=ppo.value_coef,
            max_grad_norm=ppo.max_grad_norm,
            target_kl=ppo.target_kl,
            normalize_advantage=ppo.normalize_advantages,
            policy_kwargs={
                "net_arch": {"pi": hidden, "vf": hidden},
                "activation_fn": torch.nn.Tanh,
                "log_std_init": config.policy.init_log_std,
                "ortho_init": True,
                "optimizer_kwargs": {"eps": 1e-8},  # torch's Adam default, as ours
            },
            seed=seed,
            device="cpu",
            verbose=0,
        )
        workers = list(getattr(venv.venv, "processes", []))  # SubprocVecEnv
        start, cpu_start, workers_start = time.perf_counter(), time.process_time(), _worker_cpu_seconds(workers)
        model.learn(total_timesteps=total_steps)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        cpu = _cpu_stats(model.num_timesteps, cpu_seconds, _worker_cpu_seconds(workers) - workers_start)
    finally:
        venv.close()
    venv.training = False

    def act(obs: np.ndarray) -> np.ndarray:
        return model.predict(venv.normalize_obs(obs.astype(np.float32)), deterministic=True)[0]

    return {
        "steps": model.num_timesteps,
        "seconds": seconds,
        "steps_per_s": model.num_timesteps / seconds,
        **cpu,
        "recent_returns": [info["r"] for info in model.ep_info_buffer][-NUM_RECENT_EPISODES:],
        "act": act,
    }


def evaluate(act: Callable[[np.ndarray], np.ndarray], num_episodes: int) -> list[float]:
    """Deterministic-policy returns on the training task, one episode per reset seed."""
    env = LocomotionEnv(ROBOT, Task.from_dict(TASK), episode_seconds=EPISODE_SECONDS)
    returns = []
    try:
        for episode in range(num_episodes):
            obs, _ = env.reset(seed=EVAL_SEED + episode)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(act(obs))
                total += reward
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    return returns

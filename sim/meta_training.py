"""`metactl train` for the non-MLSH algorithms: MAML, Meta-SGD, the learned optimizer and RL^2.

Each gets its config section (`maml:` for the three gradient-based meta-learners, `rl2:`), a run
directory like MLSH's (resolved config, an atomic checkpoint after every iteration, CSV and
TensorBoard metrics, learning curve) and resumes from its checkpoint. The trainers live in
controller/ and are handed an env factory and a task sampler from here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym

from controller.config import to_dict
from controller.errors import CheckpointError
from controller.learners import LEARNERS, learner_from_spec
from controller.meta_trainer import MAMLConfig, MAMLTrainer
from controller.policies import GaussianMLPPolicy
from controller.rl2 import GRUPolicy, RL2Config, RL2Trainer
from controller.rundir import RunDir

logger = logging.getLogger(__name__)

GRADIENT_ALGORITHMS = LEARNERS
"""Algorithms trained by `MAMLTrainer` (config section `maml`)."""
RECURRENT_ALGORITHMS = ("rl2",)
"""Algorithms trained by `RL2Trainer` (config section `rl2`)."""


@dataclass
class GradientMetaConfig:
    """MAML / Meta-SGD / learned optimizer: the Gaussian actor, the update rule and the schedule."""

    num_iterations: int = 100
    """Meta-iterations (a checkpoint after each)."""
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the actor and the critic."""
    activation: str = "tanh"
    """Hidden activation: tanh, elu or relu."""
    init_log_std: float = -1.0
    """Initial log standard deviation of the Gaussian actions."""
    normalize: bool = True
    """Carry an observation normalizer (baked into the exported graph; not adapted)."""
    step_size: float = 0.002
    """Inner step size (MAML), initial per-coordinate step size (Meta-SGD) or SGD part (learned optimizer).
    The inner loss sums over each episode's steps, so its gradient grows with the episode length: a few
    hundred steps want ~1e-3."""
    first_order: bool = False
    """Drop second-order terms of the meta-gradient."""
    optimizer_hidden_size: int = 16
    """Learned optimizer: GRU state per coordinate."""
    optimizer_output_scale: float = 0.1
    """Learned optimizer: scale of the GRU's part of the update."""
    num_envs: int = 8
    """Env copies (PyBullet worlds) built once and reused for every episode, switched between tasks
    with `set_task`; a meta-batch's episodes run in waves of this many."""
    trainer: MAMLConfig = field(
        default_factory=lambda: MAMLConfig(
            meta_batch_size=8,
            episodes_per_task=4,
            max_episode_steps=500,
            dice_lambda=0.9,
            outer_learning_rate=3e-4,
            normalize_inner_advantages=True,
        )
    )
    """Meta-batch, inner loss and outer PPO settings (`controller.meta_trainer.MAMLConfig`)."""


@dataclass
class RL2TrainConfig:
    """RL^2: the GRU policy and the schedule."""

    num_iterations: int = 100
    """Iterations (a checkpoint after each)."""
    hidden_size: int = 64
    """GRU state size."""
    head_hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden layer widths of the actor and critic heads."""
    activation: str = "tanh"
    """Activation of the encoder and heads."""
    init_log_std: float = -1.0
    """Initial log standard deviation of the Gaussian actions."""
    trainer: RL2Config = field(default_factory=lambda: RL2Config(num_trials=8, episodes_per_trial=3))
    """Trials per iteration and recurrent PPO (`controller.rl2.RL2Config`)."""


class _StepCounter(gym.Wrapper):
    """Counts env steps into a shared one-element list (the trainers build their own envs)."""

    def __init__(self, env: gym.Env, counter: list[int]) -> None:
        super().__init__(env)
        self._counter = counter

    def step(self, action):
        self._counter[0] += 1
        return self.env.step(action)


def gradient_learner_spec(algorithm: str, section: GradientMetaConfig, obs_dim: int, act_dim: int) -> dict[str, Any]:
    """Plain description that rebuilds the learner anywhere (stored in checkpoints and bundles)."""
    policy_config = GaussianMLPPolicy(
        obs_dim, act_dim, section.hidden, section.activation, section.init_log_std, section.normalize
    ).config
    return {
        "algorithm": algorithm,
        "policy_config": policy_config,
        "learner": {
            "step_size": section.step_size,
            "first_order": section.first_order,
            "optimizer_hidden_size": section.optimizer_hidden_size,
            "optimizer_output_scale": section.optimizer_output_scale,
        },
        "inner": to_dict(section.trainer),
    }


class _EnvFactory:
    """Builds step-counted envs, the first from a world already built (to read the spaces), and closes them all."""

    def __init__(self, env_fn: Callable[[], gym.Env], counter: list[int]) -> None:
        self._env_fn = env_fn
        self._counter = counter
        self._spare: gym.Env | None = env_fn()
        self.envs: list[gym.Env] = []
        self.obs_dim = self._spare.observation_space.shape[0]
        self.act_dim = self._spare.action_space.shape[0]

    def __call__(self) -> gym.Env:
        env, self._spare = (self._spare if self._spare is not None else self._env_fn()), None
        self.envs.append(_StepCounter(env, self._counter))
        return self.envs[-1]

    def close(self) -> None:
        for env in [*self.envs, *([self._spare] if self._spare is not None else [])]:
            env.close()
        self.envs.clear()
        self._spare = None


class _Loop:
    """Shared bookkeeping of an iteration loop: metrics rows, steps, wall time, checkpoint, resume."""

    def __init__(self, run_dir: RunDir, counter: list[int]) -> None:
        self.run_dir = run_dir
        self.counter = counter
        self.num_metric_rows = 0
        self.wall_time_s = 0.0

    def resume(self, trainer: Any) -> dict[str, Any] | None:
        if not self.run_dir.has_checkpoint():
            return None
        checkpoint = self.run_dir.load_checkpoint()
        try:
            trainer.load_state_dict(checkpoint["trainer"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{self.run_dir.checkpoint_path} does not fit this run: {error}") from error
        self.counter[0] = int(checkpoint["total_steps"])
        self.num_metric_rows = int(checkpoint["num_metric_rows"])
        self.wall_time_s = float(checkpoint.get("wall_time_s", 0.0))
        self.run_dir.truncate_metrics(self.num_metric_rows)
        logger.info("resumed %s at iteration %d", self.run_dir.path, trainer.iteration)
        return checkpoint

    def run(
        self,
        trainer: Any,
        num_iterations: int,
        return_key: str,
        describe: Callable[[], dict[str, Any]],
        progress: bool,
    ) -> None:
        """Step `trainer` up to `num_iterations`; its `return_key` statistic is logged as episode_return."""
        from tqdm import tqdm

        bar = tqdm(total=num_iterations, initial=trainer.iteration, desc="train", disable=not progress)
        while trainer.iteration < num_iterations:
            start_steps, start = self.counter[0], time.perf_counter()
            stats = trainer.step()
            stats["episode_return"] = stats[return_key]  # what the learning curve plots
            elapsed = time.perf_counter() - start
            self.wall_time_s += elapsed
            stats["steps_per_second"] = (self.counter[0] - start_steps) / max(elapsed, 1e-9)
            self.run_dir.log_metrics(self.counter[0], stats)
            self.num_metric_rows += 1
            self.run_dir.save_checkpoint(
                {
                    **describe(),
                    "trainer": trainer.state_dict(),
                    "total_steps": self.counter[0],
                    "num_metric_rows": self.num_metric_rows,
                    "wall_time_s": self.wall_time_s,
                }
            )
            bar.update(1)
            bar.set_postfix(ret=f"{stats['episode_return']:.1f}")
        bar.close()
        self.run_dir.plot_learning_curve()


def train_gradient(
    algorithm: str,
    section: GradientMetaConfig,
    env_fn: Callable[[], gym.Env],
    sample_tasks: Callable,
    run_dir: RunDir,
    seed: int,
    progress: bool = True,
) -> None:
    """Meta-train MAML, Meta-SGD or the learned optimizer (Gaussian actor) into `run_dir`."""
    counter = [0]
    envs = _EnvFactory(env_fn, counter)
    try:
        spec = gradient_learner_spec(algorithm, section, envs.obs_dim, envs.act_dim)
        learner = learner_from_spec(spec)
        policy = learner.module
        trainer = MAMLTrainer(learner, envs, sample_tasks, section.trainer, seed=seed, num_envs=section.num_envs)
        loop = _Loop(run_dir, counter)
        loop.resume(trainer)

        def describe() -> dict[str, Any]:
            return {"algorithm": algorithm, "learner_spec": spec, "policy_config": policy.config}

        loop.run(trainer, section.num_iterations, "post_return", describe, progress)
    finally:
        envs.close()


def train_rl2(
    section: RL2TrainConfig,
    env_fn: Callable[[], gym.Env],
    sample_tasks: Callable,
    run_dir: RunDir,
    seed: int,
    progress: bool = True,
) -> None:
    """Meta-train an RL^2 GRU policy into `run_dir`."""
    counter = [0]
    envs = _EnvFactory(env_fn, counter)  # RL2Trainer keeps one per trial of an iteration and reuses them
    try:
        policy = GRUPolicy(
            envs.obs_dim,
            envs.act_dim,
            section.hidden_size,
            section.head_hidden,
            section.activation,
            section.init_log_std,
        )
        trainer = RL2Trainer(policy, envs, sample_tasks, section.trainer, seed=seed)
        loop = _Loop(run_dir, counter)
        loop.resume(trainer)
        describe = lambda: {"algorithm": "rl2", "policy_config": policy.config}  # noqa: E731
        loop.run(trainer, section.num_iterations, "last_episode_return", describe, progress)
    finally:
        envs.close()

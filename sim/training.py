"""`metactl train`: YAML config -> envs, task distribution, policy, trainer, run directory."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

from controller.config import apply_overrides, build, load_yaml, to_dict
from controller.errors import ConfigError
from controller.mlsh import MLSHTrainer
from controller.mlsh_config import MLSHConfig
from controller.mlsh_policy import MLSHPolicy
from controller.robot import load_robot_spec
from controller.rundir import RunDir
from sim import samplers
from sim.env import LocomotionEnv
from sim.meta_training import (
    GRADIENT_ALGORITHMS,
    RECURRENT_ALGORITHMS,
    GradientMetaConfig,
    RL2TrainConfig,
    train_gradient,
    train_rl2,
)
from sim.tasks import TaskDistribution

logger = logging.getLogger(__name__)

ALGORITHMS = ("mlsh", *GRADIENT_ALGORITHMS, *RECURRENT_ALGORITHMS)
BACKENDS = samplers.BACKENDS


@dataclass
class EnvConfig:
    """Simulation episode settings."""

    episode_seconds: float = 10.0
    """Time limit of one episode (truncation, bootstrapped)."""
    joint_noise: float = 0.05
    """Uniform noise (rad) on the joint angles at reset."""
    privileged: bool = False
    """Append the true task parameters to the observation (an oracle; cannot be deployed)."""


@dataclass
class SamplerConfig:
    """How environment copies are stepped."""

    num_envs: int = 2
    """Environment copies stepped together (one per core is the sweet spot)."""
    backend: str = "process"
    """'inline' (this process), 'process' (one worker process per copy), 'ray' (one Ray actor per copy) or
    'worker' (one worker process per copy that also runs the policy and returns a whole rollout per
    iteration; same trajectories as the others, fewer messages)."""
    ray_address: str | None = None
    """Ray cluster to join for backend 'ray' ('auto', 'ray://host:10001'); None starts a local Ray."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"sampler.backend '{self.backend}' unknown; valid: {', '.join(BACKENDS)}")
        if self.num_envs < 1:
            raise ConfigError(f"sampler.num_envs must be >= 1, got {self.num_envs}")


@dataclass
class PolicyConfig:
    """MLSH network sizes."""

    num_subpolicies: int = 4
    """K: sub-policies the master chooses among."""
    macro_steps: int = 10
    """N: control steps between master decisions."""
    sub_hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of each sub-policy (actor and critic)."""
    master_hidden: list[int] = field(default_factory=lambda: [32, 32])
    """Hidden layer widths of the master."""
    activation: str = "tanh"
    """Hidden activation: tanh, elu or relu."""
    init_log_std: float = -1.0
    """Initial log standard deviation of the sub-policies' Gaussian actions."""


@dataclass
class TrainConfig:
    """A whole training run."""

    robot: str = "a1"
    """Robot spec name (configs/robots/NAME.yaml) or path."""
    algorithm: str = "mlsh"
    """Meta-learning algorithm."""
    seed: int = 0
    """Seeds tasks, env resets, network init and action sampling."""
    run_dir: str | None = None
    """Where the run is written; default runs/<config file stem>."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Episode settings."""
    tasks: dict[str, Any] = field(default_factory=dict)
    """Task distribution: parameter -> {low, high[, log]} | {choices} | value."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Network shapes."""
    mlsh: MLSHConfig = field(default_factory=MLSHConfig)
    """MLSH schedule and PPO settings."""
    maml: GradientMetaConfig = field(default_factory=GradientMetaConfig)
    """Policy, update rule and schedule of maml, meta_sgd and learned_optimizer."""
    rl2: RL2TrainConfig = field(default_factory=RL2TrainConfig)
    """Policy and schedule of rl2."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Environment stepping."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm '{self.algorithm}' unknown; valid: {', '.join(ALGORITHMS)}")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    data = load_yaml(path) if path is not None else {}
    return build(TrainConfig, apply_overrides(data, overrides or []))


def _make_env(robot: str, env_config: EnvConfig) -> LocomotionEnv:
    return LocomotionEnv(
        robot,
        episode_seconds=env_config.episode_seconds,
        joint_noise=env_config.joint_noise,
        privileged=env_config.privileged,
    )


def make_vector_env(config: TrainConfig) -> gym.vector.VectorEnv:
    sampler = config.sampler
    env_fn = functools.partial(_make_env, config.robot, config.env)
    return samplers.make_vector_env(env_fn, sampler.num_envs, sampler.backend, ray_address=sampler.ray_address)


def build_policy(config: TrainConfig, obs_dim: int, act_dim: int) -> MLSHPolicy:
    p = config.policy
    return MLSHPolicy(
        obs_dim,
        act_dim,
        num_subpolicies=p.num_subpolicies,
        macro_steps=p.macro_steps,
        sub_hidden=tuple(p.sub_hidden),
        master_hidden=tuple(p.master_hidden),
        activation=p.activation,
        init_log_std=p.init_log_std,
    )


def train(
    config_path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    run_dir: str | Path | None = None,
    calibration: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> RunDir:
    """Train (or resume) a run; returns its run directory."""
    config = load_train_config(config_path, overrides)
    distribution = TaskDistribution.from_dict(config.tasks)
    if calibration is not None:
        from calibration.files import load_calibration

        distribution = distribution.recentred(load_calibration(calibration).identified)
        config.tasks = distribution.to_dict()
    stem = Path(config_path).stem if config_path is not None else "default"
    run_dir = RunDir(run_dir or config.run_dir or Path("runs") / stem)
    resolved = to_dict(config)
    resolved["command"] = command
    if run_dir.has_checkpoint():
        # Fill defaults into the saved config first: a field added since the run started is not a change.
        previous = {k: v for k, v in run_dir.read_config().items() if k != "command"}
        if to_dict(build(TrainConfig, previous)) != {k: v for k, v in resolved.items() if k != "command"}:
            raise ConfigError(f"{run_dir.path} holds a run with another config; pick another --run-dir")
    else:
        run_dir.write_config(resolved)
    spec = load_robot_spec(config.robot)
    torch.manual_seed(config.seed)
    torch.set_num_threads(1)
    if config.algorithm != "mlsh":
        try:
            _train_meta(config, distribution, run_dir, progress)
        finally:
            run_dir.close()
        logger.info("trained %s (%s) for %s", spec.name, config.algorithm, run_dir.path)
        return run_dir
    envs = make_vector_env(config)
    try:
        policy = build_policy(config, envs.single_observation_space.shape[0], envs.single_action_space.shape[0])
        trainer = MLSHTrainer(
            policy, envs, lambda rng: distribution.sample_tasks(1, rng)[0], config.mlsh, run_dir, seed=config.seed
        )
        if trainer.resume_if_possible():
            logger.info("resuming %s from task group %d", run_dir.path, trainer.group)
        trainer.train(progress=progress)
    finally:
        envs.close()
        run_dir.close()
    logger.info("trained %s for %s on %d envs", spec.name, run_dir.path, config.sampler.num_envs)
    return run_dir


def _train_meta(config: TrainConfig, distribution: TaskDistribution, run_dir: RunDir, progress: bool) -> None:
    """The gradient-based meta-learners and RL^2: their trainers build their own envs and step them in this
    process (the `sampler` and `policy` sections are MLSH's and do not apply)."""
    env_fn = functools.partial(_make_env, config.robot, config.env)
    if config.algorithm in GRADIENT_ALGORITHMS:
        train_gradient(config.algorithm, config.maml, env_fn, distribution.sample_tasks, run_dir, config.seed, progress)
    else:
        train_rl2(config.rl2, env_fn, distribution.sample_tasks, run_dir, config.seed, progress)

"""The meta-test of the non-MLSH runs (`metactl eval`, sim/evaluation.py dispatches here).

Each method gets K adaptation episodes on the held-out task, then E evaluation episodes with the
deterministic policy, on the same reset seeds as MLSH (adaptation: seed + 1000 + i, evaluation:
seed + i):
- MAML, Meta-SGD, learned optimizer: the K episodes are sampled from the meta-learned actor
  (mean + exp(log_std) * noise, the unclipped sample recorded, as the robot runtime does), then
  `controller.gradient_adaptation.adapt_fast_weights` takes the inner step(s) on them: the same
  function `metactl adapt` runs on the robot. The evaluation episodes take the adapted actor's mean.
- RL^2: one deterministic trial of K + E episodes, the hidden state carried across all of them
  (the adaptation is in the memory); the evaluation return is that of the last E. K = 0 is a fresh
  memory. Like `metactl adapt`, the K episodes are deterministic too: RL^2 explores through its
  memory, not through action noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from controller.adaptation import Episode
from controller.config import build
from controller.errors import ConfigError
from controller.gradient_adaptation import adapt_fast_weights
from controller.learners import LEARNERS, learner_from_spec
from controller.maml import AdaptedModule, MetaLearner
from controller.meta_trainer import MAMLConfig
from controller.rl2 import GRUPolicy
from controller.rl2_rollout import run_trials
from sim.env import LocomotionEnv

GRADIENT_ALGORITHMS = LEARNERS
"""Runs adapted by an inner step of their learned update rule."""
RECURRENT_ALGORITHMS = ("rl2",)
"""Runs adapted in a recurrent policy's hidden state."""
ADAPTATION_LABELS = {
    "mlsh": "adapt master",
    "maml": "inner step",
    "meta_sgd": "inner step, learned step sizes",
    "learned_optimizer": "inner step, learned optimizer",
    "rl2": "hidden state",
}
"""How each algorithm uses the K episodes, for method names in tables and plots."""

_MAX_EPISODE_STEPS = 2**31
"""No cap of our own on an episode: the env's time limit ends it."""


@dataclass
class MetaModel:
    """What the meta-test needs of a gradient-based or RL^2 run."""

    policy: nn.Module
    """The actor evaluated at K = 0: the meta-learner's module, or the GRU policy."""
    learner: MetaLearner | None = None
    """Gradient-based runs: the meta-learner (initialization, update rule, normalizer)."""
    inner: MAMLConfig | None = None
    """Gradient-based runs: the inner-loss settings the run was trained with."""


def load_meta_model(algorithm: str, checkpoint: dict[str, Any], source: str) -> MetaModel:
    """Rebuild the run's model from its checkpoint (written by sim/meta_training.py).

    Raises:
        ConfigError: an algorithm that is not gradient-based or RL^2, or a checkpoint that does not fit it.
    """
    try:
        if algorithm in GRADIENT_ALGORITHMS:
            spec = checkpoint["learner_spec"]
            learner = learner_from_spec(spec)
            learner.load_state_dict(checkpoint["trainer"]["learner"])
            inner = build(MAMLConfig, dict(spec["inner"]), "inner")
            return MetaModel(learner.module.eval(), learner, inner)
        if algorithm in RECURRENT_ALGORITHMS:
            policy = GRUPolicy(**checkpoint["policy_config"])
            policy.load_state_dict(checkpoint["trainer"]["policy"])
            return MetaModel(policy.eval())
    except (KeyError, TypeError, RuntimeError) as error:
        raise ConfigError(f"{source}: the {algorithm} checkpoint does not fit: {error!r}") from error
    valid = ", ".join(("mlsh", *GRADIENT_ALGORITHMS, *RECURRENT_ALGORITHMS))
    raise ConfigError(f"{source}: cannot evaluate algorithm '{algorithm}'; valid: {valid}")


def gaussian_episode(
    env: LocomotionEnv, distribution_fn: Any, seed: int, rng: np.random.Generator | None = None
) -> Episode:
    """One episode of a Gaussian actor: the mean action, or mean + std * N(0, I) from `rng` when given.

    Args:
        distribution_fn: Raw observations [1, obs_dim] -> Normal over actions [1, act_dim].
        rng: Noise source of sampled actions; None: deterministic (the mean).

    Returns:
        The episode; `actions` are as chosen (the unclipped sample), the env steps them clipped.
    """
    episode = Episode()
    obs, _ = env.reset(seed=seed)
    low, high = env.action_space.low, env.action_space.high
    while True:
        with torch.no_grad():
            dist = distribution_fn(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))
        action = dist.mean[0].numpy()
        if rng is not None:
            action = action + dist.stddev[0].numpy() * rng.standard_normal(action.shape)
        episode.obs.append(np.asarray(obs, np.float32))
        episode.actions.append(action.astype(np.float32))
        obs, reward, terminated, truncated, info = env.step(np.clip(action, low, high))
        episode.rewards.append(float(reward))
        if "base_vel" in info:
            episode.forward_velocity.append(float(info["base_vel"][0]))
        if terminated or truncated:
            episode.terminated = bool(terminated)
            return episode


def gradient_returns(
    env: LocomotionEnv, model: MetaModel, k: int, eval_episodes: int, seed: int
) -> tuple[list[float], dict[str, float]]:
    """Evaluation returns after the inner step(s) on K sampled episodes (K = 0: the initialization).

    Returns:
        The E evaluation returns and the inner step's statistics (empty at K = 0).
    """
    learner, inner = model.learner, model.inner
    if learner is None or inner is None:
        raise ValueError("gradient_returns needs a MetaModel with a learner and inner settings")
    distribution = learner.module.distribution
    stats: dict[str, float] = {}
    if k > 0:
        rng = np.random.default_rng(seed)
        episodes = [gaussian_episode(env, distribution, seed + 1000 + i, rng) for i in range(k)]
        fast: dict[str, Tensor] = {name: value.detach() for name, value in learner.fast_parameters().items()}
        fast, rule_state, stats = adapt_fast_weights(learner, fast, None, episodes, inner)
        adapted = AdaptedModule(learner, fast, rule_state)
        distribution = lambda obs: adapted.call("distribution", obs)  # noqa: E731
    returns = [gaussian_episode(env, distribution, seed + i).total_return for i in range(eval_episodes)]
    return returns, stats


def rl2_returns(env: LocomotionEnv, policy: GRUPolicy, k: int, eval_episodes: int, seed: int) -> list[float]:
    """The last E episode returns of one deterministic trial of K + E episodes on the env's task."""
    seeds = np.array([[*(seed + 1000 + i for i in range(k)), *(seed + i for i in range(eval_episodes))]])
    trials = run_trials(
        policy, [env], [env.get_task()], k + eval_episodes, seeds, deterministic=True,
        max_episode_steps=_MAX_EPISODE_STEPS,
    )  # fmt: skip
    return [float(value) for value in trials.episode_returns()[0, k:]]

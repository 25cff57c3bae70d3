"""`metactl adapt` for MAML, Meta-SGD, the learned optimizer (inner steps) and RL^2 (hidden state).

Gradient-based: the K episodes are collected with the sampling policy of the deployed version
(mean + exp(log_std) * noise, from the ONNX graph), then `adapt_fast_weights` takes the inner
step(s) of the bundle's learned update rule on them, exactly the trainer's inner loop
(`MetaLearner.clone().adapt` on `controller.meta_episodes.inner_loss`, first order: no meta-gradient
is needed at test time; it lives in controller/gradient_adaptation.py, which `metactl eval` shares).
The adapted actor becomes the candidate version's policy.onnx, with its fast weights and update-rule
state in adaptation.pt; it is kept only if it evaluates no worse.

RL^2: the K episodes and then the evaluation episodes run as one trial, the hidden state carried
across them; the gain is the return after K episodes of memory against a fresh trial's. Nothing is
written: the adaptation lives in the hidden state.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from controller.config import build
from controller.errors import ConfigError
from controller.gradient_adaptation import adapt_fast_weights, episodes_to_batch
from controller.meta_trainer import MAMLConfig
from deploy.adapt import (
    AdaptResult,
    adaptation_robot,
    candidate_manifest,
    connect_for_adaptation,
    keep_if_not_worse,
    plot_returns,
)
from deploy.bundle import ADAPTATION, Bundle, next_version
from deploy.control import run_episodes
from deploy.errors import BundleError
from deploy.export_meta import load_adaptation, write_gradient_version_to
from deploy.runtime import GaussianRuntime, RL2Runtime

logger = logging.getLogger(__name__)

__all__ = ["adapt_fast_weights", "adapt_gradient", "adapt_rl2", "episodes_to_batch"]


def adapt_gradient(
    bundle: Bundle,
    url: str,
    *,
    num_episodes: int = 3,
    eval_episodes: int = 1,
    seconds: float = 10.0,
    command_vx: float = 0.5,
    calibration=None,
    reset_wait: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AdaptResult:
    """Evaluate, collect K sampled episodes, take the inner step(s), evaluate the candidate, keep if not worse.

    Raises:
        BundleError: a damaged or mismatched adaptation.pt (before the robot moves; nothing written),
            another robot, or no complete episode to learn from.
    """
    bundle_dir = bundle.path
    learner, state = load_adaptation(bundle_dir, bundle.manifest)  # refuse a bad file before anything moves
    try:
        inner_config = build(MAMLConfig, state["spec"]["inner"], "inner")
    except ConfigError as error:
        raise BundleError(f"{bundle_dir / ADAPTATION}: bad inner-loop settings: {error}") from error
    runtime = GaussianRuntime(bundle, rng=np.random.default_rng(seed))
    env = adaptation_robot(bundle, url, seconds, command_vx, calibration, reset_wait)
    label = (lambda text: text) if progress else (lambda text: None)
    try:
        connect_for_adaptation(env, bundle, url)
        before = run_episodes(env, runtime, eval_episodes, progress=label("evaluate before"))
        collected = run_episodes(env, runtime, num_episodes, deterministic=False, progress=label("adapt episodes"))
        usable = [episode for episode in collected if episode.complete and episode.length > 0]
        if len(usable) < len(collected):
            logger.warning("%d of %d episodes had gaps and are left out", len(collected) - len(usable), len(collected))
        if not usable:
            raise BundleError("no complete adaptation episode to learn from (every one had gaps)")
        start = time.perf_counter()
        fast, rule_state, stats = adapt_fast_weights(learner, state["fast"], state["rule_state"], usable, inner_config)
        update_seconds = time.perf_counter() - start
        candidate = next_version(bundle_dir)
        manifest = candidate_manifest(bundle, candidate, len(usable), stats)
        candidate_dir = write_gradient_version_to(
            bundle_dir / "versions" / candidate,
            state["spec"],
            learner,
            fast,
            rule_state,
            state["inner_steps"] + int(stats["inner_steps"]),
            manifest,
        )
        after = run_episodes(env, GaussianRuntime(candidate_dir), eval_episodes, progress=label("evaluate after"))
    finally:
        env.close()
    return keep_if_not_worse(bundle, runtime, candidate, candidate_dir, before, collected, after, update_seconds)


def adapt_rl2(
    bundle: Bundle,
    url: str,
    *,
    num_episodes: int = 3,
    eval_episodes: int = 1,
    seconds: float = 10.0,
    command_vx: float = 0.5,
    calibration=None,
    reset_wait: float | None = None,
    progress: bool = True,
) -> AdaptResult:
    """Before: a fresh trial of E episodes. Then one trial of K + E episodes; after: its last E.

    The bundle is not changed (no version is written); the plot goes to the bundle's adaptation/ folder.
    """
    runtime = RL2Runtime(bundle)
    env = adaptation_robot(bundle, url, seconds, command_vx, calibration, reset_wait)
    label = (lambda text: text) if progress else (lambda text: None)
    try:
        connect_for_adaptation(env, bundle, url)
        runtime.reset_trial()
        before = run_episodes(env, runtime, eval_episodes, progress=label("evaluate before (fresh memory)"))
        runtime.reset_trial()
        collected = run_episodes(env, runtime, num_episodes, progress=label("adapt episodes (one trial)"))
        after = run_episodes(env, runtime, eval_episodes, progress=label("evaluate after (same trial)"))
    finally:
        env.close()
    plot_dir = bundle.path / "adaptation"
    plot_dir.mkdir(exist_ok=True)
    plot = plot_returns(
        plot_dir / "rl2_trial.png",
        [e.total_return for e in before],
        [e.total_return for e in collected],
        [e.total_return for e in after],
    )
    return AdaptResult(
        return_before=float(np.mean([e.total_return for e in before])),
        return_after=float(np.mean([e.total_return for e in after])),
        kept=False,
        version=bundle.version,
        candidate="",
        adaptation_returns=[e.total_return for e in collected],
        before_returns=[e.total_return for e in before],
        after_returns=[e.total_return for e in after],
        update_seconds=0.0,  # no update: the memory is the adaptation
        plot=str(plot),
        algorithm="rl2",
    )

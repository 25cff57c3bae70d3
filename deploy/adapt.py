"""`metactl adapt`: K episodes on the robot -> a new MLSH master, kept only if it is not worse.

Acting uses the ONNX runtime (what runs on the robot); only the update uses torch. The update is
PPO on the master's macro-steps with a tight clip and KL stop, suited to a few hundred decisions.
"""

from __future__ import annotations

import copy
import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from controller.policies import MLSHPolicy
from controller.ppo import PPOConfig, compute_gae, ppo_update
from controller.rundir import load_torch
from deploy.bundle import FULL_POLICY, MASTER, load_bundle, next_version, promote
from deploy.control import Episode, run_episodes
from deploy.errors import BundleError
from deploy.export import load_policy_file, write_version_to
from deploy.protocol import Capability
from deploy.robot import RobotEnv
from deploy.runtime import PolicyRuntime

logger = logging.getLogger(__name__)


@dataclass
class AdaptConfig:
    """Few-episode master update."""

    gamma: float = 0.9
    """Discount per macro-step."""
    lam: float = 0.95
    """GAE lambda per macro-step."""
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(
            learning_rate=3e-3, epochs=20, num_minibatches=1, clip_ratio=0.2, target_kl=0.05, entropy_coef=0.0
        )
    )
    """Trust region: clipped ratio and a KL stop over the few decisions available."""


@dataclass
class AdaptResult:
    return_before: float
    return_after: float
    kept: bool
    version: str
    candidate: str
    adaptation_returns: list[float]
    before_returns: list[float]
    after_returns: list[float]
    update_seconds: float
    plot: str | None = None


def macro_batch(policy: MLSHPolicy, episodes: list[Episode], config: AdaptConfig) -> dict[str, torch.Tensor]:
    """Master transitions (decision obs, option, rollout log-prob, GAE advantages) from episodes."""
    obs, options, log_probs, advantages, returns = [], [], [], [], []
    for episode in episodes:
        starts = [t for t, chose in enumerate(episode.chose) if chose]
        if not starts:
            continue
        ends = starts[1:] + [episode.length]
        rewards = np.array([np.sum(episode.rewards[a:b]) for a, b in zip(starts, ends)])
        decision_obs = torch.as_tensor(np.stack([episode.obs[t] for t in starts]), dtype=torch.float32)
        with torch.no_grad():
            values = policy.master.value(decision_obs).numpy()
        next_values = np.append(values[1:], 0.0)
        terminated = np.zeros(len(starts), dtype=bool)
        truncated = np.zeros(len(starts), dtype=bool)
        if episode.terminated:
            terminated[-1] = True
        else:
            truncated[-1] = True
            next_values[-1] = values[-1]  # time limit: bootstrap from the last decision's value
        adv, ret = compute_gae(rewards, values, next_values, terminated, truncated, config.gamma, config.lam)
        for t in starts:
            logits = episode.logits[t].astype(np.float64)
            log_softmax = logits - logits.max() - np.log(np.sum(np.exp(logits - logits.max())))
            log_probs.append(log_softmax[episode.options[t]])
        obs.append(decision_obs)
        options += [episode.options[t] for t in starts]
        advantages.append(adv)
        returns.append(ret)
    if not obs:
        raise BundleError("no complete adaptation episode to learn from")
    return {
        "obs": torch.cat(obs),
        "actions": torch.as_tensor(options, dtype=torch.long),
        "log_probs": torch.as_tensor(log_probs, dtype=torch.float32),
        "advantages": torch.as_tensor(np.concatenate(advantages), dtype=torch.float32),
        "returns": torch.as_tensor(np.concatenate(returns), dtype=torch.float32),
    }


def update_master(policy: MLSHPolicy, episodes: list[Episode], config: AdaptConfig, seed: int = 0) -> dict[str, float]:
    """One trust-region PPO update of the master from the episodes; normalizer moves afterwards."""
    batch = macro_batch(policy, episodes, config)
    optimizer = torch.optim.Adam(policy.master.parameters(), lr=config.ppo.learning_rate)
    stats = ppo_update(
        policy.master.evaluate,
        policy.master.parameters(),
        optimizer,
        batch,
        config.ppo,
        torch.Generator().manual_seed(seed),
    )
    policy.master.update_normalizer(batch["obs"])
    return stats


def plot_returns(path: Path, before: list[float], adaptation: list[float], after: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    x = 0
    for label, values, marker in (
        ("before (eval)", before, "o"),
        ("adaptation", adaptation, "s"),
        ("after (eval)", after, "^"),
    ):
        axis.plot(range(x + 1, x + 1 + len(values)), values, marker=marker, linestyle="-", label=label)
        x += len(values)
    axis.set_xlabel("episode on the robot")
    axis.set_ylabel("return")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def adapt(
    bundle_dir: str | Path,
    url: str,
    *,
    num_episodes: int = 3,
    eval_episodes: int = 1,
    seconds: float = 10.0,
    command_vx: float = 0.5,
    calibration=None,
    reset_wait: float | None = None,
    config: AdaptConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AdaptResult:
    """Evaluate, collect K episodes with a sampling master, update it, evaluate, keep if not worse."""
    import time

    config = config or AdaptConfig()
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    runtime = PolicyRuntime(bundle, rng=np.random.default_rng(seed))
    policy = load_policy_file(bundle_dir / FULL_POLICY)
    try:
        policy.load_master_state_dict(load_torch(bundle_dir / MASTER))
    except (KeyError, RuntimeError) as error:
        raise BundleError(f"{bundle_dir / MASTER} does not fit this bundle's policy: {error}") from error
    env = RobotEnv(
        url,
        bundle.spec,
        command=(command_vx, 0.0, 0.0),
        episode_seconds=seconds,
        calibration=calibration,
        reset_wait=reset_wait,
    )
    label = (lambda text: text) if progress else (lambda text: None)
    try:
        capabilities = env.connect()
        bundle.check_robot(capabilities.robot, capabilities.joint_names, capabilities.control_rate_hz)
        if not capabilities.flags & Capability.BASE_VELOCITY:
            # The tracking reward needs the base velocity; without it every return would be NaN.
            raise BundleError(
                f"the robot on {url} does not report base velocity (Capability.BASE_VELOCITY); "
                "adaptation needs it to score episodes"
            )
        before = run_episodes(env, runtime, eval_episodes, progress=label("evaluate before"))
        collected = run_episodes(env, runtime, num_episodes, deterministic=False, progress=label("adapt episodes"))
        usable = [episode for episode in collected if episode.complete]
        if len(usable) < len(collected):
            logger.warning("%d of %d episodes had gaps and are left out", len(collected) - len(usable), len(collected))
        start = time.perf_counter()
        stats = update_master(policy, usable, config, seed)
        update_seconds = time.perf_counter() - start
        candidate = next_version(bundle_dir)
        manifest = copy.deepcopy(bundle.manifest)
        manifest["version"] = candidate
        manifest["history"] = [
            *manifest.get("history", []),
            {
                "version": candidate,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "reason": f"adapt from {bundle.version} with {len(usable)} episodes",
                "update": {k: float(v) for k, v in stats.items()},
            },
        ]
        candidate_dir = write_version_to(bundle_dir / "versions" / candidate, policy, manifest)
        after = run_episodes(env, PolicyRuntime(candidate_dir), eval_episodes, progress=label("evaluate after"))
    finally:
        env.close()
    return_before = float(np.mean([e.total_return for e in before]))
    return_after = float(np.mean([e.total_return for e in after]))
    kept = return_after >= return_before
    if kept:
        promote(bundle_dir, candidate)
        runtime.reload(bundle_dir)  # between ticks, for a caller that keeps running it
    plot = plot_returns(
        candidate_dir / "adaptation.png",
        [e.total_return for e in before],
        [e.total_return for e in collected],
        [e.total_return for e in after],
    )
    return AdaptResult(
        return_before=return_before,
        return_after=return_after,
        kept=kept,
        version=candidate if kept else bundle.version,
        candidate=candidate,
        adaptation_returns=[e.total_return for e in collected],
        before_returns=[e.total_return for e in before],
        after_returns=[e.total_return for e in after],
        update_seconds=update_seconds,
        plot=str(plot),
    )

"""`metactl adapt`: K episodes on the robot -> a new MLSH master, kept only if it is not worse.

New terrain is a new task: its master starts where a new task's master started in training (the
bundle's `mlsh.master_init`: a fresh one for "reset", as in Frans et al. and `metactl eval`), the K
episodes sample it, and the update compares them with each other; `keep_master` adapts the
bundle's current master instead, with its critic as baseline. Acting uses the ONNX runtime (what
runs on the robot); only the update uses torch. The update is PPO on the master's macro-steps with
a tight clip and KL stop, suited to a few hundred decisions.
`adapt` dispatches on the bundle's algorithm: MAML, Meta-SGD and the learned optimizer take their
inner step(s) in deploy/adapt_gradient.py; RL^2 adapts in its hidden state (deploy/adapt_gradient.py too).
"""

from __future__ import annotations

import copy
import datetime
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from controller.adaptation import AdaptConfig, Episode, start_task_master, update_master
from controller.errors import ConfigError
from controller.mlsh_config import saved_master_init
from controller.rundir import load_torch
from deploy.bundle import (
    FULL_POLICY,
    MASTER,
    MASTER_INIT,
    Bundle,
    load_bundle,
    load_master_init,
    next_version,
    promote,
)
from deploy.control import Runtime, run_episodes
from deploy.errors import BundleError
from deploy.export import load_policy_file, write_version_to
from deploy.messages import Capability
from deploy.robot import RobotEnv
from deploy.runtime import PolicyRuntime

logger = logging.getLogger(__name__)


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
    algorithm: str = "mlsh"
    """The bundle's algorithm; for rl2 nothing is written (`candidate` is empty, `kept` False)."""


def plot_returns(path: Path, before: list[float], adaptation: list[float], after: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(6, 3.5))
    x = 0
    for label, values, marker in (
        ("before (eval)", before, "o"),
        ("adaptation", adaptation, "s"),
        ("after (eval)", after, "^"),
    ):
        axis.plot(range(x + 1, x + 1 + len(values)), values, marker=marker, linestyle="-", label=label)
        x += len(values)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("episode on the robot")
    axis.set_ylabel("return")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def connect_for_adaptation(env: RobotEnv, bundle: Bundle, url: str) -> None:
    """Connect, check the robot is the bundle's, and that it reports what scoring episodes needs.

    Raises:
        BundleError: another robot, or one without base velocity.
    """
    capabilities = env.connect()
    bundle.check_robot(capabilities.robot, capabilities.joint_names, capabilities.control_rate_hz)
    if not capabilities.flags & Capability.BASE_VELOCITY:
        # The tracking reward needs the base velocity; without it every return would be NaN.
        raise BundleError(
            f"the robot on {url} does not report base velocity (Capability.BASE_VELOCITY); "
            "adaptation needs it to score episodes"
        )


def candidate_manifest(bundle: Bundle, candidate: str, num_episodes: int, stats: dict[str, float]) -> dict:
    """The bundle's manifest for a new version `candidate`, with its history entry."""
    manifest = copy.deepcopy(bundle.manifest)
    manifest["version"] = candidate
    manifest["history"] = [
        *manifest.get("history", []),
        {
            "version": candidate,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "reason": f"adapt from {bundle.version} with {num_episodes} episodes",
            "update": {k: float(v) for k, v in stats.items()},
        },
    ]
    return manifest


def adaptation_robot(bundle: Bundle, url: str, seconds: float, command_vx: float, calibration, reset_wait) -> RobotEnv:
    """The robot env every adapter runs its episodes on."""
    return RobotEnv(
        url,
        bundle.spec,
        command=(command_vx, 0.0, 0.0),
        episode_seconds=seconds,
        calibration=calibration,
        reset_wait=reset_wait,
    )


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
    keep_master: bool = False,
) -> AdaptResult:
    """Evaluate, collect K episodes with a sampling master, update it, evaluate, keep if not worse.

    The master that samples and learns is a new task's start (see the module doc), or with
    `keep_master` the bundle's current one; `config` overrides the update settings that go with it.

    For a MAML / Meta-SGD / learned-optimizer bundle the update is the inner step; for RL^2 the
    episodes run as one trial and nothing is written (see deploy/adapt_gradient.py).
    """
    import time

    if num_episodes < 1:
        raise ConfigError(f"-k (adaptation episodes) must be at least 1, got {num_episodes}")
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    if bundle.algorithm != "mlsh":
        from deploy.adapt_gradient import adapt_gradient, adapt_rl2

        robot = {"seconds": seconds, "command_vx": command_vx, "calibration": calibration, "reset_wait": reset_wait}
        if bundle.algorithm == "rl2":
            return adapt_rl2(
                bundle, url, num_episodes=num_episodes, eval_episodes=eval_episodes, progress=progress, **robot
            )
        return adapt_gradient(
            bundle, url, num_episodes=num_episodes, eval_episodes=eval_episodes, seed=seed, progress=progress, **robot
        )
    runtime = PolicyRuntime(bundle, rng=np.random.default_rng(seed))
    policy = load_policy_file(bundle_dir / FULL_POLICY)
    try:
        policy.load_master_state_dict(load_torch(bundle_dir / MASTER))
    except (KeyError, RuntimeError) as error:
        raise BundleError(f"{bundle_dir / MASTER} does not fit this bundle's policy: {error}") from error
    master_init = "keep" if keep_master else new_task_master_init(bundle)
    init_state = load_master_init(bundle) if master_init == "meta" else None
    try:
        started = start_task_master(policy.master, master_init, torch.Generator().manual_seed(seed), init_state)
    except (KeyError, RuntimeError) as error:
        raise BundleError(f"{bundle_dir / MASTER_INIT} does not fit this bundle's policy: {error}") from error
    config = config or started
    if config.baseline == "episodes" and num_episodes < 2:
        # Checked before the link opens: one episode would cost the robot's time and teach nothing.
        raise ConfigError(
            f"a new task's master learns by comparing its K episodes with each other, so -k must be at least 2 "
            f"(got {num_episodes}); --keep-master adapts the bundle's current master from one episode with its critic"
        )
    sampling = runtime
    if master_init != "keep":  # the episodes sample the started master: its graph, exported before the link opens
        with tempfile.TemporaryDirectory(prefix="metactl-start-") as scratch:
            start_dir = write_version_to(Path(scratch), policy, bundle.manifest)
            sampling = PolicyRuntime(start_dir, np.random.default_rng(seed))
    env = adaptation_robot(bundle, url, seconds, command_vx, calibration, reset_wait)
    label = (lambda text: text) if progress else (lambda text: None)
    try:
        connect_for_adaptation(env, bundle, url)
        before = run_episodes(env, runtime, eval_episodes, progress=label("evaluate before"))
        collected = run_episodes(env, sampling, num_episodes, deterministic=False, progress=label("adapt episodes"))
        usable = [episode for episode in collected if episode.complete]
        if len(usable) < len(collected):
            logger.warning("%d of %d episodes had gaps and are left out", len(collected) - len(usable), len(collected))
        start = time.perf_counter()
        if not usable:
            raise BundleError("no complete adaptation episode to learn from (every one had gaps)")
        stats = update_master(policy, usable, config, seed)
        update_seconds = time.perf_counter() - start
        candidate = next_version(bundle_dir)
        manifest = candidate_manifest(bundle, candidate, len(usable), stats)
        candidate_dir = write_version_to(bundle_dir / "versions" / candidate, policy, manifest)
        after = run_episodes(env, PolicyRuntime(candidate_dir), eval_episodes, progress=label("evaluate after"))
    finally:
        env.close()
    return keep_if_not_worse(bundle, runtime, candidate, candidate_dir, before, collected, after, update_seconds)


def new_task_master_init(bundle: Bundle) -> str:
    """Where the bundle's training started each task's master (`mlsh.master_init`); "keep" where the
    bundle cannot start one the same way (a "meta" bundle exported without its initialization)."""
    master_init = saved_master_init(bundle.manifest.get("training", {}).get("config", {}).get("mlsh"))
    if master_init == "meta" and not bundle.manifest.get("master_init_sha256"):
        logger.warning("the bundle does not carry its meta-learned master init: adapting its current master")
        return "keep"
    return master_init


def keep_if_not_worse(
    bundle: Bundle,
    runtime: Runtime,
    candidate: str,
    candidate_dir: Path,
    before: list[Episode],
    collected: list[Episode],
    after: list[Episode],
    update_seconds: float,
) -> AdaptResult:
    """Keep the candidate only if its evaluation return is not worse; plot every episode's return."""
    return_before = float(np.mean([e.total_return for e in before]))
    return_after = float(np.mean([e.total_return for e in after]))
    kept = return_after >= return_before
    if kept:
        promote(bundle.path, candidate)
        runtime.reload(bundle.path)  # between ticks, for a caller that keeps running it
    plot = plot_returns(
        Path(candidate_dir) / "adaptation.png",
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
        algorithm=bundle.algorithm,
    )

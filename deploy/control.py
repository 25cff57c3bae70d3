"""Control loop: policy runtime x robot env, one episode at a time, damping on every exit.

Every way out of an episode leaves the robot damping: the end of the episode and any exception
command DAMPING, Ctrl-C sends EStop (latched on the robot until the next Reset), and if the host
dies outright the robot's watchdog damps it 50 ms after the last Command.
"""

from __future__ import annotations

import logging

import numpy as np

from controller.adaptation import Episode
from deploy.robot import RobotEnv
from deploy.runtime import GaussianRuntime, PolicyRuntime, RL2Runtime, open_runtime

Runtime = PolicyRuntime | GaussianRuntime | RL2Runtime

logger = logging.getLogger(__name__)


def run_episode(env: RobotEnv, runtime: Runtime, *, deterministic: bool = True) -> Episode:
    """One episode of `runtime` on `env`; `Episode.gaps` > 0 (incomplete) after any gap or reconnect."""
    episode = Episode()
    try:
        obs, _ = env.reset()
        runtime.reset()
        while True:
            action, info = runtime.act(obs, deterministic=deterministic)
            episode.obs.append(obs)
            episode.actions.append(action)
            if "option" in info:  # MLSH: what the master did, for its update
                episode.options.append(info["option"])
                episode.chose.append(info["chose"])
                episode.logits.append(info["logits"])
            obs, reward, terminated, truncated, step_info = env.step(action)
            runtime.observe(reward)
            episode.rewards.append(reward)
            episode.forward_velocity.append(float(step_info["state"].base_vel[0]))
            if terminated or truncated:
                episode.terminated = terminated
                break
    except KeyboardInterrupt:
        env.emergency_stop()
        raise
    except BaseException:
        env.damp()
        raise
    env.stop()
    # A reconnect also counts in env.gaps: the episode is incomplete either way.
    episode.gaps = env.gaps
    return episode


def run_episodes(
    env: RobotEnv, runtime: Runtime, num_episodes: int, *, deterministic: bool = True, progress: str | None = None
) -> list[Episode]:
    from tqdm import tqdm

    episodes = []
    for _ in tqdm(range(num_episodes), desc=progress, disable=progress is None, leave=False):
        episodes.append(run_episode(env, runtime, deterministic=deterministic))
    return episodes


def _describe(episode: Episode, index: int, total: int, reconnects: int) -> str:
    return (
        f"episode {index + 1}/{total}: return {episode.total_return:.1f} over {episode.length} steps, "
        f"mean forward velocity {np.mean(episode.forward_velocity):.2f} m/s"
        + (", fell" if episode.terminated else "")
        + (f", {episode.gaps} gaps" if episode.gaps else "")
        + (f", {reconnects} reconnects" if reconnects else "")
    )


def deploy(
    bundle_dir: str,
    url: str,
    *,
    episodes: int = 1,
    seconds: float = 10.0,
    command_vx: float = 0.5,
    calibration=None,
    reset_wait: float | None = None,
    soft_start_seconds: float = 1.0,
    max_target_step: float | None = None,
    reconnect_timeout: float = 3.0,
    report=print,
) -> list[Episode]:
    """`metactl deploy`: run the bundle's policy on the robot; damping on any exit, EStop on Ctrl-C.

    Args:
        soft_start_seconds: Ramp from the measured pose to the default pose first (skipped when the
            robot already stands in it); see RobotEnv.
        max_target_step: Rate limit on the joint targets (rad per tick); None: RobotEnv's default.
        reconnect_timeout: Seconds to keep reopening a lost port before giving up.
    """
    runtime = open_runtime(bundle_dir)
    env = RobotEnv(
        url,
        runtime.bundle.spec,
        command=(command_vx, 0.0, 0.0),
        episode_seconds=seconds,
        calibration=calibration,
        reset_wait=reset_wait,
        soft_start_seconds=soft_start_seconds,
        max_target_step=max_target_step,
        reconnect_timeout=reconnect_timeout,
    )
    results = []
    try:
        capabilities = env.connect()
        runtime.bundle.check_robot(capabilities.robot, capabilities.joint_names, capabilities.control_rate_hz)
        for index in range(episodes):
            episode = run_episode(env, runtime)
            results.append(episode)
            report(_describe(episode, index, episodes, env.reconnects))
    except KeyboardInterrupt:
        env.emergency_stop()
        raise
    finally:
        env.close()
    decoder, health = env.link.stats.decoder, env.health
    if decoder.corrupt or decoder.seq_gaps or health.stale_states or health.reconnects or health.watchdog_trips:
        report(
            f"link: {decoder.corrupt} corrupt frames, {decoder.seq_gaps} missing, {decoder.duplicates} duplicated, "
            f"{health.stale_states} stale States dropped, {health.reconnects} reconnects, "
            f"{health.watchdog_trips} watchdog trips"
        )
    return results

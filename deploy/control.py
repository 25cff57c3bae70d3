"""Control loop: policy runtime x robot env, one episode at a time, damping on every exit."""

from __future__ import annotations

import logging

import numpy as np

from controller.adaptation import Episode
from deploy.robot import RobotEnv
from deploy.runtime import PolicyRuntime

logger = logging.getLogger(__name__)


def run_episode(env: RobotEnv, runtime: PolicyRuntime, *, deterministic: bool = True) -> Episode:
    episode = Episode()
    obs, _ = env.reset()
    runtime.reset()
    while True:
        action, info = runtime.act(obs, deterministic=deterministic)
        episode.obs.append(obs)
        episode.actions.append(action)
        episode.options.append(info["option"])
        episode.chose.append(info["chose"])
        episode.logits.append(info["logits"])
        obs, reward, terminated, truncated, step_info = env.step(action)
        episode.rewards.append(reward)
        episode.forward_velocity.append(float(step_info["state"].base_vel[0]))
        if terminated or truncated:
            episode.terminated = terminated
            break
    episode.gaps = env.gaps
    return episode


def run_episodes(
    env: RobotEnv, runtime: PolicyRuntime, num_episodes: int, *, deterministic: bool = True, progress: str | None = None
) -> list[Episode]:
    from tqdm import tqdm

    episodes = []
    for _ in tqdm(range(num_episodes), desc=progress, disable=progress is None, leave=False):
        episodes.append(run_episode(env, runtime, deterministic=deterministic))
    return episodes


def deploy(
    bundle_dir: str,
    url: str,
    *,
    episodes: int = 1,
    seconds: float = 10.0,
    command_vx: float = 0.5,
    calibration=None,
    reset_wait: float | None = None,
    report=print,
) -> list[Episode]:
    """`metactl deploy`: run the bundle's policy on the robot; damping on any exit."""
    runtime = PolicyRuntime(bundle_dir)
    env = RobotEnv(
        url,
        runtime.bundle.spec,
        command=(command_vx, 0.0, 0.0),
        episode_seconds=seconds,
        calibration=calibration,
        reset_wait=reset_wait,
    )
    results = []
    try:
        capabilities = env.connect()
        runtime.bundle.check_robot(capabilities.robot, capabilities.joint_names, capabilities.control_rate_hz)
        for index in range(episodes):
            episode = run_episode(env, runtime)
            results.append(episode)
            report(
                f"episode {index + 1}/{episodes}: return {episode.total_return:.1f} over {episode.length} steps, "
                f"mean forward velocity {np.mean(episode.forward_velocity):.2f} m/s"
                + (", fell" if episode.terminated else "")
                + (f", {episode.gaps} gaps" if episode.gaps else "")
            )
    finally:
        env.close()
    return results

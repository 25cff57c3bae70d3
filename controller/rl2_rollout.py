"""RL^2 rollouts: trials of consecutive episodes on one task each, their returns and trial-long GAE.

`run_trials` steps a recurrent policy (a `controller.rl2.GRUPolicy` or anything with its
`act(inputs, hidden, deterministic, generator)`, `act_dim` and `initial_hidden(batch_size)`) through
one trial per env, carrying the hidden state across the episodes of a trial. `meta_test` is the
deterministic evaluation, `trial_advantages` the GAE that treats a whole trial as one episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from controller.policies import check_positive_int
from controller.ppo import compute_gae

if TYPE_CHECKING:  # only for annotations: controller.rl2 imports this module
    from controller.rl2 import GRUPolicy


@dataclass
class Trials:
    """A batch of N trials padded to the longest, L steps (mask 0 after a trial ended).

    Attributes:
        inputs: [N, L, input_dim] step inputs.
        hiddens: [N, L, hidden_size] hidden state before each step (truncated-BPTT chunk starts).
        actions: [N, L, act_dim] sampled (unclipped) actions.
        log_probs, values: [N, L] under the sampling policy.
        rewards: [N, L] rewards (0 on padding).
        mask: [N, L] 1 for real steps, 0 for padding.
        episode_index: [N, L] int64 episode of the trial each step belongs to (-1 on padding).
        num_episodes: Episodes per trial.
    """

    inputs: Tensor
    hiddens: Tensor
    actions: Tensor
    log_probs: Tensor
    values: Tensor
    rewards: Tensor
    mask: Tensor
    episode_index: Tensor
    num_episodes: int

    def episode_returns(self) -> np.ndarray:
        """[N, num_episodes] undiscounted return of each episode of each trial."""
        returns = np.zeros((self.rewards.shape[0], self.num_episodes))
        for k in range(self.num_episodes):
            returns[:, k] = (self.rewards * (self.episode_index == k)).sum(dim=1).numpy()
        return returns


def run_trials(
    policy: GRUPolicy,
    envs: Sequence[Any],
    tasks: Sequence[Any],
    num_episodes: int,
    seeds: np.ndarray,
    generator: torch.Generator | None = None,
    deterministic: bool = False,
    max_episode_steps: int = 1000,
) -> Trials:
    """Run one trial per env: its task, `num_episodes` episodes, the hidden state kept across them.

    Args:
        envs: One env per trial, with `set_task` (reached through `get_wrapper_attr`); tasks: one per env.
        seeds: [len(envs), num_episodes] reset seeds.
        generator: Random source for the action noise (unused when `deterministic`: the mean is taken).
        max_episode_steps: Cap on an episode's length (the env's own truncation usually comes first).
    """
    check_positive_int("num_episodes", num_episodes)
    num_trials = len(envs)
    if len(tasks) != num_trials or np.shape(seeds) != (num_trials, num_episodes):
        raise ValueError(
            f"run_trials needs one task per env and seeds [{num_trials}, {num_episodes}], "
            f"got {len(tasks)} tasks and seeds {np.shape(seeds)}"
        )
    for env, task in zip(envs, tasks):
        env.get_wrapper_attr("set_task")(task)
    obs_now = np.stack([env.reset(seed=int(seed[0]))[0] for env, seed in zip(envs, seeds)]).astype(np.float32)
    prev_action = np.zeros((num_trials, policy.act_dim), np.float32)
    prev_reward, done = np.zeros(num_trials, np.float32), np.zeros(num_trials, np.float32)
    episode, episode_steps = np.zeros(num_trials, np.int64), np.zeros(num_trials, np.int64)
    alive = np.ones(num_trials, dtype=bool)
    hidden = policy.initial_hidden(num_trials)
    record: dict[str, list] = {key: [] for key in ("inputs", "hiddens", "actions", "log_probs", "values", "rewards")}
    masks, episodes = [], []
    while alive.any():
        inputs = torch.as_tensor(np.concatenate([obs_now, prev_action, prev_reward[:, None], done[:, None]], axis=1))
        action, log_prob, value, new_hidden = policy.act(inputs, hidden, deterministic, generator)
        rewards = np.zeros(num_trials, np.float32)
        masks.append(alive.astype(np.float32))
        episodes.append(np.where(alive, episode, -1))
        for i in np.flatnonzero(alive):
            space = envs[i].action_space
            executed = np.clip(action[i].numpy(), space.low, space.high)
            next_obs, reward, terminated, truncated, _ = envs[i].step(executed)
            rewards[i], prev_action[i], prev_reward[i], done[i] = reward, executed, reward, 0.0
            obs_now[i], episode_steps[i] = next_obs, episode_steps[i] + 1
            if terminated or truncated or episode_steps[i] >= max_episode_steps:
                episode[i], episode_steps[i] = episode[i] + 1, 0
                alive[i] = episode[i] < num_episodes
                if alive[i]:  # next episode of the same trial: same task, hidden state kept
                    obs_now[i] = envs[i].reset(seed=int(seeds[i][episode[i]]))[0]
                    done[i] = 1.0
        for key, item in zip(record, (inputs, hidden, action, log_prob, value, torch.as_tensor(rewards))):
            record[key].append(item)
        hidden = new_hidden
    stacked = {key: torch.stack(items, dim=1) for key, items in record.items()}
    mask = torch.as_tensor(np.stack(masks, axis=1))
    stacked["rewards"] = stacked["rewards"] * mask
    return Trials(
        **stacked, mask=mask, episode_index=torch.as_tensor(np.stack(episodes, axis=1)), num_episodes=num_episodes
    )


def meta_test(
    policy: GRUPolicy,
    envs: Sequence[Any],
    tasks: Sequence[Any],
    num_episodes: int,
    seed: int = 0,
    max_episode_steps: int = 1000,
) -> np.ndarray:
    """Per-episode returns [num_tasks, num_episodes] of one deterministic trial per task.

    For RL^2, "K adaptation episodes" are the first K episodes of the trial: the return of episode
    K + 1 is the return after K-episode adaptation. Reset seeds come from `seed` alone.
    """
    seeds = np.random.default_rng(seed).integers(2**31, size=(len(tasks), num_episodes))
    trials = run_trials(
        policy, envs, tasks, num_episodes, seeds, deterministic=True, max_episode_steps=max_episode_steps
    )
    return trials.episode_returns()


def trial_advantages(trials: Trials, gamma: float, lam: float, reward_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """GAE over each trial as one episode: terminal at the trial's last step, no cut in between.

    Rewards are multiplied by `reward_scale` (the values are taken to be in those units already).

    Returns:
        advantages [N, L] and returns [N, L] (0 on padding).
    """
    lengths = trials.mask.sum(dim=1).long()
    rewards, values = trials.rewards.T.numpy() * reward_scale, (trials.values * trials.mask).T.numpy()
    # V(s_{t+1}) is the next step's value in the same trial (across episode boundaries too).
    next_values = np.concatenate([values[1:], np.zeros_like(values[:1])])
    terminated = np.zeros_like(rewards)
    terminated[lengths.numpy() - 1, np.arange(len(lengths))] = 1.0
    advantages, returns = compute_gae(rewards, values, next_values, terminated, np.zeros_like(rewards), gamma, lam)
    return tuple(torch.as_tensor(array.T, dtype=torch.float32) * trials.mask for array in (advantages, returns))

"""Few-episode adaptation updates, shared by the robot (deploy/adapt.py) and the meta-test (sim/evaluation.py).

An `Episode` is what one run of the policy produced, tick by tick; `update_master` is the MLSH
adaptation (PPO on the master's macro-steps with a trust region), `finetune_all` the transfer-
learning baseline (PPO on every sub-policy weight from the same episodes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from controller.errors import ConfigError
from controller.mlsh_policy import MLSHPolicy
from controller.policies import CategoricalMLPPolicy
from controller.ppo import PPOConfig, compute_gae, ppo_update

BASELINES = ("critic", "episodes")
"""Valid `AdaptConfig.baseline` values."""


@dataclass
class Episode:
    """One episode; the per-tick lists feed adaptation."""

    obs: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    options: list[int] = field(default_factory=list)
    chose: list[bool] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terminated: bool = False
    gaps: int = 0
    forward_velocity: list[float] = field(default_factory=list)

    @property
    def total_return(self) -> float:
        return float(np.sum(self.rewards))

    @property
    def length(self) -> int:
        return len(self.rewards)

    @property
    def complete(self) -> bool:
        """No missing State in the middle: usable for learning."""
        return self.gaps == 0


@dataclass
class AdaptConfig:
    """Few-episode update settings."""

    gamma: float = 0.9
    """Discount per macro-step (master)."""
    lam: float = 0.95
    """GAE lambda (baseline "critic" and fine-tuning)."""
    baseline: str = "critic"
    """What the master's advantages are measured against: "critic" (GAE with the master's own
    critic) or "episodes" (the macro-level return-to-go minus its mean over the K episodes at the
    same decision index: no critic needed, the right choice for a freshly initialized master whose
    critic knows nothing of the task; with K = 1 every advantage is 0)."""
    update_normalizer: bool = True
    """Merge the decision observations into the master's normalizer after the update. Turn off
    for a freshly initialized master: its normalizer holds no statistics yet, and those of a few
    decisions would rescale the inputs the update was just fitted to."""
    ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(
            learning_rate=3e-3, epochs=20, num_minibatches=1, clip_ratio=0.2, target_kl=0.05, entropy_coef=0.0
        )
    )
    """Trust region: clipped ratio and a KL stop over the few samples available."""
    finetune_gamma: float = 0.99
    """Discount per control step for fine-tuning all weights."""
    finetune_ppo: PPOConfig = field(
        default_factory=lambda: PPOConfig(learning_rate=3e-4, epochs=5, num_minibatches=4, target_kl=0.02)
    )
    """PPO for the fine-tune-all baseline."""

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ConfigError(f"adapt baseline {self.baseline!r} unknown; valid: {', '.join(BASELINES)}")


NEW_MASTER_ADAPT = AdaptConfig(baseline="episodes", update_normalizer=False)
"""How a new task's freshly started master learns from the K episodes: its critic knows nothing of
the task yet (so the K episodes are compared with each other) and its normalizer has no statistics
worth moving."""

MASTER_INITS = ("reset", "keep", "meta")
"""Where a new task's master starts (`MLSHConfig.master_init`)."""


def start_task_master(
    master: CategoricalMLPPolicy,
    master_init: str,
    generator: torch.Generator | None = None,
    init_state: Mapping[str, Tensor] | None = None,
) -> AdaptConfig:
    """Put `master` where a new task's master starts in MLSH training, and return the settings that
    adapt it from K episodes.

    Args:
        master: The master to set (of a copy of the policy, for a meta-test or robot task).
        master_init: "reset" (fresh weights and normalizer, as in Frans et al.), "keep" (leave it:
            the trained master) or "meta" (load `init_state`, the meta-learned initialization).
        generator: Random source of a reset master's weights.
        init_state: The meta-learned master (weights and normalizer), for "meta".

    Returns:
        `NEW_MASTER_ADAPT` for a started master, the critic-baseline `AdaptConfig()` for a kept one.
    """
    if master_init == "reset":
        master.reset_parameters(generator)
    elif master_init == "meta":
        if init_state is None:
            raise ConfigError("master_init 'meta' needs the meta-learned master initialization; none was given")
        master.load_state_dict(init_state, strict=True)
    elif master_init != "keep":
        raise ConfigError(f"master_init '{master_init}' unknown; valid: {', '.join(MASTER_INITS)}")
    return replace(NEW_MASTER_ADAPT) if master_init != "keep" else AdaptConfig()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


def macro_batch(policy: MLSHPolicy, episodes: list[Episode], config: AdaptConfig) -> dict[str, torch.Tensor]:
    """Master transitions (decision obs, option, rollout log-prob, advantages, returns) from episodes.

    Advantages are GAE with the master's critic (`config.baseline == "critic"`) or, for "episodes",
    R_i - mean_j R_j over the episodes j that reach decision index i, where R_i is the discounted
    macro-level return-to-go, R_i = sum_{m >= i} gamma^(m - i) r_m.
    """
    obs, options, log_probs, rewards_per_episode, values_per_episode, ends = [], [], [], [], [], []
    for episode in episodes:
        starts = [t for t, chose in enumerate(episode.chose) if chose]
        if not starts:
            continue
        stops = starts[1:] + [episode.length]
        rewards_per_episode.append(np.array([np.sum(episode.rewards[a:b]) for a, b in zip(starts, stops)]))
        decision_obs = torch.as_tensor(np.stack([episode.obs[t] for t in starts]), dtype=torch.float32)
        with torch.no_grad():
            values_per_episode.append(policy.master.value(decision_obs).numpy())
        ends.append(episode.terminated)
        log_probs += [_log_softmax(episode.logits[t])[episode.options[t]] for t in starts]
        obs.append(decision_obs)
        options += [episode.options[t] for t in starts]
    if not obs:
        raise ValueError("no complete episode to learn from")
    if config.baseline == "episodes":
        advantages, returns = _episode_baseline(rewards_per_episode, config.gamma)
    else:
        advantages, returns = [], []
        for rewards, values, terminated in zip(rewards_per_episode, values_per_episode, ends):
            next_values = np.append(values[1:], 0.0)
            is_terminated = np.zeros(len(rewards), dtype=bool)
            is_truncated = np.zeros(len(rewards), dtype=bool)
            if terminated:
                is_terminated[-1] = True
            else:
                is_truncated[-1] = True
                next_values[-1] = values[-1]  # time limit: bootstrap from the last decision's value
            adv, ret = compute_gae(rewards, values, next_values, is_terminated, is_truncated, config.gamma, config.lam)
            advantages.append(adv)
            returns.append(ret)
    return {
        "obs": torch.cat(obs),
        "actions": torch.as_tensor(options, dtype=torch.long),
        "log_probs": torch.as_tensor(log_probs, dtype=torch.float32),
        "advantages": torch.as_tensor(np.concatenate(advantages), dtype=torch.float32),
        "returns": torch.as_tensor(np.concatenate(returns), dtype=torch.float32),
    }


def _episode_baseline(rewards_per_episode: list[np.ndarray], gamma: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per episode: advantages R_i - mean_j R_j (over episodes reaching index i) and returns-to-go R_i."""
    returns = []
    for rewards in rewards_per_episode:
        to_go = np.zeros(len(rewards))
        running = 0.0
        for i in range(len(rewards) - 1, -1, -1):  # R_i = r_i + gamma R_{i+1}
            running = rewards[i] + gamma * running
            to_go[i] = running
        returns.append(to_go)
    longest = max(len(to_go) for to_go in returns)
    sums, counts = np.zeros(longest), np.zeros(longest)
    for to_go in returns:
        sums[: len(to_go)] += to_go
        counts[: len(to_go)] += 1
    mean = sums / counts
    return [to_go - mean[: len(to_go)] for to_go in returns], returns


def update_master(policy: MLSHPolicy, episodes: list[Episode], config: AdaptConfig, seed: int = 0) -> dict[str, float]:
    """MLSH adaptation: one trust-region PPO update of the master only; its normalizer moves afterwards
    (unless `config.update_normalizer` is off)."""
    batch = macro_batch(policy, episodes, config)
    optimizer = torch.optim.Adam(policy.master.parameters(), lr=config.ppo.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    stats = ppo_update(policy.master.evaluate, policy.master.parameters(), optimizer, batch, config.ppo, generator)
    if config.update_normalizer:
        policy.master.update_normalizer(batch["obs"])
    return stats


def finetune_all(policy: MLSHPolicy, episodes: list[Episode], config: AdaptConfig, seed: int = 0) -> dict[str, float]:
    """Transfer-learning baseline: PPO on all sub-policy weights from the same episodes (actions recorded)."""
    obs, options, actions, log_probs, advantages, returns = [], [], [], [], [], []
    for episode in episodes:
        o = torch.as_tensor(np.stack(episode.obs), dtype=torch.float32)
        opt = torch.as_tensor(episode.options, dtype=torch.long)
        act = torch.as_tensor(np.stack(episode.actions), dtype=torch.float32)
        with torch.no_grad():
            logp, _, values = policy.sub_evaluate(o, opt, act)
        values = values.numpy()
        next_values = np.append(values[1:], values[-1])
        terminated = np.zeros(episode.length, dtype=bool)
        truncated = np.zeros(episode.length, dtype=bool)
        (terminated if episode.terminated else truncated)[-1] = True
        if episode.terminated:
            next_values[-1] = 0.0
        adv, ret = compute_gae(
            np.asarray(episode.rewards), values, next_values, terminated, truncated, config.finetune_gamma, config.lam
        )
        obs.append(o)
        options.append(opt)
        actions.append(act)
        log_probs.append(logp)
        advantages.append(adv)
        returns.append(ret)
    batch = {
        "obs": (torch.cat(obs), torch.cat(options)),
        "actions": torch.cat(actions),
        "log_probs": torch.cat(log_probs),
        "advantages": torch.as_tensor(np.concatenate(advantages), dtype=torch.float32),
        "returns": torch.as_tensor(np.concatenate(returns), dtype=torch.float32),
    }
    optimizer = torch.optim.Adam(policy.subpolicies.parameters(), lr=config.finetune_ppo.learning_rate)
    return ppo_update(
        lambda o, a: policy.sub_evaluate(o[0], o[1], a),
        policy.subpolicies.parameters(),
        optimizer,
        batch,
        config.finetune_ppo,
        torch.Generator().manual_seed(seed),
    )

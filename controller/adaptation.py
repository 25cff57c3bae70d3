"""Few-episode adaptation updates, shared by the robot (deploy/adapt.py) and the meta-test (sim/evaluation.py).

An `Episode` is what one run of the policy produced, tick by tick; `update_master` is the MLSH
adaptation (PPO on the master's macro-steps with a trust region), `finetune_all` the transfer-
learning baseline (PPO on every sub-policy weight from the same episodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from controller.policies import MLSHPolicy
from controller.ppo import PPOConfig, compute_gae, ppo_update


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
    """Discount per macro-step (master) ."""
    lam: float = 0.95
    """GAE lambda."""
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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


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
        log_probs += [_log_softmax(episode.logits[t])[episode.options[t]] for t in starts]
        obs.append(decision_obs)
        options += [episode.options[t] for t in starts]
        advantages.append(adv)
        returns.append(ret)
    if not obs:
        raise ValueError("no complete episode to learn from")
    return {
        "obs": torch.cat(obs),
        "actions": torch.as_tensor(options, dtype=torch.long),
        "log_probs": torch.as_tensor(log_probs, dtype=torch.float32),
        "advantages": torch.as_tensor(np.concatenate(advantages), dtype=torch.float32),
        "returns": torch.as_tensor(np.concatenate(returns), dtype=torch.float32),
    }


def update_master(policy: MLSHPolicy, episodes: list[Episode], config: AdaptConfig, seed: int = 0) -> dict[str, float]:
    """MLSH adaptation: one trust-region PPO update of the master only; its normalizer moves afterwards."""
    batch = macro_batch(policy, episodes, config)
    optimizer = torch.optim.Adam(policy.master.parameters(), lr=config.ppo.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    stats = ppo_update(policy.master.evaluate, policy.master.parameters(), optimizer, batch, config.ppo, generator)
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

"""The data side of an MLSH update: GAE over the master's macro-steps (per parallel group) and over
the sub-policies' control steps, from a rollout of `controller.rollout.collect_segment`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from controller.policies import CategoricalMLPPolicy
from controller.ppo import compute_gae


@torch.no_grad()
def master_batch(
    rollout: dict[str, Any], master: CategoricalMLPPolicy, copies: range, gamma: float, lam: float
) -> dict[str, torch.Tensor]:
    """The macro-steps of env copies `copies` (one group's), each copy's in time order, with
    macro-level GAE under `master`'s values."""
    # Macro-steps tile each copy's time axis: a step is decided right after a closed one.
    streams = [(e, np.flatnonzero(rollout["decided"][:, e]), np.flatnonzero(rollout["closed"][:, e])) for e in copies]
    next_obs = np.concatenate([rollout["next_obs"][ends, e] for e, _, ends in streams])
    next_values = master.value(torch.as_tensor(next_obs, dtype=torch.float32)).numpy()
    obs, options, log_probs, advantages, returns = [], [], [], [], []
    offset = 0
    for e, starts, ends in streams:
        terminated = rollout["terminated"][ends, e]
        adv, ret = compute_gae(
            np.add.reduceat(rollout["reward"][:, e], starts),  # reward summed over each macro-step
            rollout["master_value"][starts, e],
            next_values[offset : offset + len(starts)],
            terminated,
            rollout["truncated"][ends, e] & ~terminated,
            gamma,
            lam,
        )
        offset += len(starts)
        obs.append(rollout["obs"][starts, e])
        options.append(rollout["option"][starts, e])
        log_probs.append(rollout["master_log_prob"][starts, e])
        advantages.append(adv)
        returns.append(ret)
    return {
        "obs": torch.as_tensor(np.concatenate(obs), dtype=torch.float32),
        "actions": torch.as_tensor(np.concatenate(options), dtype=torch.long),
        "log_probs": torch.as_tensor(np.concatenate(log_probs), dtype=torch.float32),
        "advantages": torch.as_tensor(np.concatenate(advantages), dtype=torch.float32),
        "returns": torch.as_tensor(np.concatenate(returns), dtype=torch.float32),
    }


def sub_batch(rollout: dict[str, Any], gamma: float, lam: float) -> dict[str, Any]:
    """Every control step, flattened time-major, with GAE computed per copy over [T, E]."""
    advantages, returns = compute_gae(
        rollout["reward"],
        rollout["value"],
        rollout["next_value"],
        rollout["terminated"],
        rollout["truncated"],
        gamma,
        lam,
    )

    def flat(x: np.ndarray, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.as_tensor(x.reshape(-1, *x.shape[2:]), dtype=dtype)

    return {
        "obs": (flat(rollout["obs"]), flat(rollout["option"], torch.long)),
        "actions": flat(rollout["action"]),
        "log_probs": flat(rollout["log_prob"]),
        "advantages": flat(advantages),
        "returns": flat(returns),
    }

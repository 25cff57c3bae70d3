"""PPO core: generalized advantage estimation and the clipped-surrogate minibatch update.

The update is algorithm plumbing only: it takes an `evaluate(obs, actions)` callable, so the same
function trains a Gaussian policy, the MLSH master over macro-steps and the MLSH sub-policies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from controller.errors import ConfigError

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)

Evaluate = Callable[[Any, Any], "tuple[Tensor, Tensor, Tensor]"]
"""(obs, actions) minibatch -> (log_prob [M], entropy [M], value [M]), differentiable."""


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def discount_cumsum(x: ArrayT, discount: float) -> ArrayT:
    """Discounted cumulative sum along time: y_t = sum_k discount^k x_{t+k}.

    Args:
        x: [T] or [T, ...] time-major values (numpy or torch).
        discount: Discount factor.

    Returns:
        Same shape and type as `x` (float64 for numpy; `x`'s dtype and device for torch).
    """
    values = _to_numpy(x)
    out = np.zeros_like(values)
    running = np.zeros(values.shape[1:])
    for t in reversed(range(len(values))):
        running = values[t] + discount * running
        out[t] = running
    if isinstance(x, Tensor):
        return torch.as_tensor(out, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    return out


def compute_gae(
    rewards: ArrayT,
    values: ArrayT,
    next_values: ArrayT,
    terminated: ArrayT,
    truncated: ArrayT,
    gamma: float,
    lam: float,
) -> tuple[ArrayT, ArrayT]:
    """Generalized advantage estimation for one stream of steps (episodes concatenated in time order).

    Truncation bootstraps and termination does not: for a truncated step the caller passes, as
    `next_values[t]`, the value of the final observation before the reset. The recursion is cut
    at every episode end (terminated or truncated), so advantages never leak across episodes.
    The last step of a rollout that is cut mid-episode needs neither flag: it bootstraps from
    `next_values[T-1]`.

    Args:
        rewards: [T] (or time-major [T, N]) rewards r_t.
        values: V(s_t), same shape.
        next_values: V(s_{t+1}), same shape.
        terminated: Episode ended in a terminal state after step t (bool or 0/1), same shape.
        truncated: Episode was cut (time limit) after step t, same shape.
        gamma: Discount factor.
        lam: GAE lambda.

    Returns:
        advantages A_t and returns A_t + V(s_t), same shape and type as `rewards` (float64 for
        numpy, `rewards`' float dtype and device for torch).
    """
    arrays = {
        "rewards": rewards,
        "values": values,
        "next_values": next_values,
        "terminated": terminated,
        "truncated": truncated,
    }
    converted = {name: _to_numpy(array) for name, array in arrays.items()}
    shape = converted["rewards"].shape
    if len(shape) == 0:
        raise ValueError("compute_gae expects time-major arrays [T] or [T, N], got a scalar rewards")
    for name, array in converted.items():
        if array.shape != shape:
            raise ValueError(f"compute_gae: {name} has shape {array.shape}, rewards has {shape}")
    reward = converted["rewards"]
    value = converted["values"]
    next_value = converted["next_values"]
    not_terminal = 1.0 - (converted["terminated"] != 0)
    not_done = not_terminal * (1.0 - (converted["truncated"] != 0))

    # delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
    # A_t     = delta_t + gamma * lam * (1 - (terminated_t or truncated_t)) * A_{t+1},  A_T = 0
    delta = reward + gamma * next_value * not_terminal - value
    advantages = np.zeros_like(reward)
    running = np.zeros_like(reward[0])
    for t in reversed(range(shape[0])):
        running = delta[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    returns = advantages + value
    if isinstance(rewards, Tensor):
        dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
        return (
            torch.as_tensor(advantages, dtype=dtype, device=rewards.device),
            torch.as_tensor(returns, dtype=dtype, device=rewards.device),
        )
    return advantages, returns


@dataclasses.dataclass
class PPOConfig:
    """Hyperparameters of one PPO update (Schulman et al. 2017)."""

    clip_ratio: float = 0.2
    """Surrogate clip range epsilon: the ratio pi/pi_old is clipped to [1 - eps, 1 + eps]."""

    epochs: int = 5
    """Passes over the batch per update."""

    num_minibatches: int = 4
    """Minibatches per epoch; the batch is shuffled and split into this many near-equal parts."""

    learning_rate: float = 3e-4
    """Optimizer step size; read by whoever builds the optimizer (`ppo_update` takes it ready-made)."""

    entropy_coef: float = 0.0
    """Weight of the entropy bonus subtracted from the loss."""

    value_coef: float = 0.5
    """Weight of the value loss mean((V - R)^2) in the total loss."""

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of the updated parameters to this; None disables clipping."""

    target_kl: float | None = 0.02
    """Stop the remaining epochs once a minibatch's approximate KL exceeds 1.5 * target_kl (that
    minibatch is not applied); None disables early stopping."""

    normalize_advantages: bool = True
    """Standardize advantages over the whole batch (zero mean, unit std) before the epochs."""

    value_clip: float | None = None
    """If set, clip the new value to within this of the rollout value (batch key "values") and
    take the larger of the clipped and unclipped squared errors; None uses the plain error."""

    def __post_init__(self) -> None:
        positive = {"clip_ratio": self.clip_ratio, "learning_rate": self.learning_rate}
        positive_or_none = {
            "max_grad_norm": self.max_grad_norm,
            "target_kl": self.target_kl,
            "value_clip": self.value_clip,
        }
        for name, value in {**positive, **positive_or_none}.items():
            if value is None and name in positive_or_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                allowed = "a positive number or None" if name in positive_or_none else "a positive number"
                raise ConfigError(f"PPOConfig.{name} must be {allowed}, got {value!r}")
        for name in ("epochs", "num_minibatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PPOConfig.{name} must be a positive int, got {value!r}")
        for name in ("entropy_coef", "value_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"PPOConfig.{name} must be a non-negative number, got {value!r}")


REQUIRED_BATCH_KEYS = ("obs", "actions", "log_probs", "advantages", "returns")
"""Keys `ppo_update` needs in its batch; "values" is also needed when `value_clip` is set."""


def _rows(x: Tensor | Sequence[Tensor]) -> int:
    return x.shape[0] if isinstance(x, Tensor) else _rows(x[0])


def _select(x: Tensor | Sequence[Tensor], index: Tensor) -> Any:
    """Rows `index` of a tensor, or of every tensor in a tuple/list (e.g. (obs, options))."""
    if isinstance(x, Tensor):
        return x[index.to(x.device)]
    return type(x)(_select(item, index) for item in x)


def ppo_update(
    evaluate: Evaluate,
    parameters: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, Any],
    config: PPOConfig,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run the PPO epochs of minibatch SGD on one batch of rollout data.

    Per minibatch, with ratio = exp(log_prob - old_log_prob):
        policy_loss = -mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))
        value_loss  = mean((V - R)^2)            (or the max with the clipped error, see value_clip)
        loss        = policy_loss + value_coef * value_loss - entropy_coef * mean(entropy)
        approx_kl   = mean((ratio - 1) - log(ratio))   (non-negative, low-variance estimator)

    Args:
        evaluate: (obs, actions) minibatch -> (log_prob [M], entropy [M], value [M]),
            differentiable, e.g. `policy.evaluate`, `mlsh.master.evaluate`, or for MLSH
            sub-policies `lambda obs, act: mlsh.sub_evaluate(obs[0], obs[1], act)` with
            `batch["obs"] = (obs, options)`.
        parameters: Parameters the optimizer updates (the gradient norm is clipped over these).
        optimizer: Optimizer over `parameters`.
        batch: "obs" [N, ...] (a tensor, or a tuple of tensors with N rows each, passed to
            `evaluate` as the same structure), "actions" [N, ...] (same rule), "log_probs" [N]
            (under the rollout policy), "advantages" [N], "returns" [N], and "values" [N] (rollout
            values) when `config.value_clip` is set.
        config: PPO hyperparameters.
        generator: Random source for the minibatch shuffles; the update is deterministic given it.

    Returns:
        Means over the evaluated minibatches of policy_loss, value_loss, entropy, approx_kl and
        clip_fraction, plus epochs_run (epochs started before the early stop) and num_updates
        (optimizer steps taken).
    """
    required = REQUIRED_BATCH_KEYS + (("values",) if config.value_clip is not None else ())
    missing = [key for key in required if key not in batch]
    if missing:
        raise ValueError(f"ppo_update batch is missing {missing}; it needs {list(required)}")
    num_samples = _rows(batch["obs"])
    for key in required:
        if _rows(batch[key]) != num_samples:
            raise ValueError(f"ppo_update batch[{key!r}] has {_rows(batch[key])} rows, obs has {num_samples}")
    if num_samples < config.num_minibatches:
        raise ValueError(
            f"ppo_update needs at least num_minibatches={config.num_minibatches} samples, got {num_samples}"
        )
    parameters = list(parameters)

    old_log_probs = batch["log_probs"].detach()
    returns = batch["returns"].detach()
    advantages = batch["advantages"].detach()
    if config.normalize_advantages:
        # Population std keeps a batch of one finite (its advantage becomes 0).
        advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-8)
    old_values = batch["values"].detach() if config.value_clip is not None else None

    totals = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "approx_kl": 0.0, "clip_fraction": 0.0}
    num_evaluated = 0
    num_updates = 0
    epochs_run = 0
    stop = False
    for _ in range(config.epochs):
        epochs_run += 1
        permutation = torch.randperm(num_samples, generator=generator)
        for index in torch.tensor_split(permutation, config.num_minibatches):
            log_prob, entropy, value = evaluate(_select(batch["obs"], index), _select(batch["actions"], index))
            if log_prob.shape != index.shape or value.shape != index.shape:
                # A [M, 1] value would broadcast against [M] returns into an [M, M] loss without error.
                raise ValueError(
                    f"evaluate must return log_prob and value of shape [{len(index)}], "
                    f"got {tuple(log_prob.shape)} and {tuple(value.shape)}"
                )
            index = index.to(old_log_probs.device)
            log_ratio = log_prob - old_log_probs[index]
            ratio = log_ratio.exp()
            advantage = advantages[index]
            policy_loss = -torch.min(
                ratio * advantage, ratio.clamp(1.0 - config.clip_ratio, 1.0 + config.clip_ratio) * advantage
            ).mean()
            target = returns[index]
            if old_values is None:
                value_loss = (value - target).square().mean()
            else:
                # V_clipped = V_old + clip(V - V_old, -c, c); loss = mean(max((V - R)^2, (V_clipped - R)^2))
                old_value = old_values[index]
                clipped = old_value + (value - old_value).clamp(-config.value_clip, config.value_clip)
                value_loss = torch.max((value - target).square(), (clipped - target).square()).mean()
            entropy_mean = entropy.mean()
            with torch.no_grad():
                approx_kl = ((ratio - 1.0) - log_ratio).mean().item()
                clip_fraction = ((ratio - 1.0).abs() > config.clip_ratio).float().mean().item()

            totals["policy_loss"] += policy_loss.item()
            totals["value_loss"] += value_loss.item()
            totals["entropy"] += entropy_mean.item()
            totals["approx_kl"] += approx_kl
            totals["clip_fraction"] += clip_fraction
            num_evaluated += 1
            if config.target_kl is not None and approx_kl > 1.5 * config.target_kl:
                stop = True
                break

            loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy_mean
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            num_updates += 1
        if stop:
            break

    stats = {key: total / num_evaluated for key, total in totals.items()}
    stats["epochs_run"] = float(epochs_run)
    stats["num_updates"] = float(num_updates)
    return stats

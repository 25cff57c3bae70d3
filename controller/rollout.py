"""Rollout fast path for the MLSH trainer: frozen, fused copies of the networks for acting,
per-option evaluation that runs each row only through its chosen sub-policy, and the rollout loop
itself (`collect_segment`), run by the trainer over a whole vector env or by a sampler's worker
process over its own env copies (sim/rollout_workers.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from controller.mlsh_policy import MLSHPolicy
from controller.networks import RunningNormalizer
from controller.policies import CategoricalMLPPolicy

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(actions; mean, exp(log_std)) summed over the last (action) dimension: [..., A] -> [...]."""
    # log p = -0.5 ((a - mu) / sigma)^2 - log sigma - 0.5 log(2 pi)
    z = (actions - mean) / log_std.exp()
    return (-0.5 * z.square() - log_std - HALF_LOG_2PI).sum(-1)


def by_option(options: np.ndarray, num_options: int, x: Tensor, fn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """`fn(k, rows)` on the rows of `x` [N, ...] whose option is k, for every k; outputs in row order.

    Runs each sub-policy on its own rows only (K times less work than running all K on all rows);
    gradients reach only the sub-policies that were chosen. `options` [N] is a numpy int array.
    """
    if num_options == 1:
        return fn(0, x)
    counts = np.bincount(options, minlength=num_options)
    if np.count_nonzero(counts) == 1:  # one option for every row: nothing to sort
        return fn(int(options[0]), x)
    order = np.argsort(options, kind="stable")
    parts = [fn(k, rows) for k, rows in enumerate(x[torch.from_numpy(order)].split(counts.tolist())) if counts[k]]
    return torch.cat(parts)[torch.from_numpy(np.argsort(order))]


_INPLACE_ACTIVATIONS: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {nn.Tanh: torch.tanh_, nn.ReLU: torch.relu_}
"""Activations applied in place on the fresh matmul output (any other runs as its module)."""

_NUMPY_ACTIVATIONS: dict[type[nn.Module], Callable[[np.ndarray], np.ndarray]] = {
    nn.Tanh: lambda x: np.tanh(x, out=x),
    nn.ReLU: lambda x: np.maximum(x, 0.0, out=x),
}
"""The same in numpy, for `FusedMLP.numpy` (any other runs as its module on a tensor view)."""


class FusedMLP:
    """Inference-only copy of an actor MLP and a critic MLP of the same shape as one network.

    The first layers are stacked (both read the same input) and deeper ones are block-diagonal, so
    one matmul per layer gives [..., actor outputs | critic outputs]. It computes in float64 and
    returns float32: float32 BLAS kernels sum in an order that depends on the batch size, so a row's
    float32 output would change with the rows beside it; rounded from float64 it does not, and a
    rollout gives the same trajectories batched over every env copy in one process or split over
    worker processes. `numpy` computes the same in numpy, for the few rows of one control step.
    """

    def __init__(self, actor: nn.Sequential, critic: nn.Sequential) -> None:
        self.layers: list[tuple[Tensor, Tensor] | Callable[[Tensor], Tensor]] = []
        self.numpy_layers: list[tuple[np.ndarray, np.ndarray] | Callable[[np.ndarray], np.ndarray]] = []
        for actor_layer, critic_layer in zip(actor, critic, strict=True):
            if type(actor_layer) is not type(critic_layer):
                raise ValueError(f"actor and critic differ: {actor_layer} vs {critic_layer}")
            if not isinstance(actor_layer, nn.Linear):
                # The activation, shared by both halves.
                self.layers.append(_INPLACE_ACTIVATIONS.get(type(actor_layer), actor_layer))
                self.numpy_layers.append(
                    _NUMPY_ACTIVATIONS.get(type(actor_layer), lambda x, m=actor_layer: m(torch.from_numpy(x)).numpy())
                )
                continue
            weights = (actor_layer.weight.detach(), critic_layer.weight.detach())
            weight = torch.block_diag(*weights) if self.layers else torch.cat(weights)
            bias = torch.cat([actor_layer.bias.detach(), critic_layer.bias.detach()])
            self.layers.append((weight.t().to(torch.float64).contiguous(), bias.to(torch.float64)))
            self.numpy_layers.append((self.layers[-1][0].numpy(), self.layers[-1][1].numpy()))

    def __call__(self, x: Tensor) -> Tensor:
        """[N, in] float32 -> [N, actor outputs + critic outputs] float32."""
        x = x.to(torch.float64)
        for layer in self.layers:
            x = torch.addmm(layer[1], x, layer[0]) if isinstance(layer, tuple) else layer(x)
        return x.to(torch.float32)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        """`__call__` in numpy: [N, in] float32 -> [N, outputs] float32. A numpy call costs a fraction of a
        torch call, which is what one control step's few rows are made of."""
        x = x.astype(np.float64)
        for layer in self.numpy_layers:
            if isinstance(layer, tuple):
                x = x @ layer[0]
                x += layer[1]
            else:
                x = layer(x)
        return x.astype(np.float32)


def frozen_normalizer(normalizer: RunningNormalizer | None) -> Callable[[Tensor], Tensor]:
    """`normalizer.forward` with sqrt(var + eps) computed once: the statistics only move in `_update`."""
    if normalizer is None:
        return lambda x: x
    mean, std, clip = normalizer.mean.clone(), torch.sqrt(normalizer.var + normalizer.epsilon), normalizer.clip
    return lambda x: (x - mean).div_(std).clamp_(-clip, clip)


def frozen_numpy_normalizer(normalizer: RunningNormalizer | None) -> Callable[[np.ndarray], np.ndarray]:
    """`frozen_normalizer` in numpy, float32 as it (elementwise, so bit for bit the same)."""
    if normalizer is None:
        return lambda x: x
    mean, std, clip = (
        normalizer.mean.numpy().copy(),
        torch.sqrt(normalizer.var + normalizer.epsilon).numpy(),
        normalizer.clip,
    )
    return lambda x: np.clip((x - mean) / std, -clip, clip)


class RolloutNetworks:
    """Frozen, fused copies of an MLSH policy's networks for one rollout (build and call under inference mode).

    Args:
        policy: The policy; its sub-policies act on every row.
        masters: One master per task group running side by side (MLSH's parallel groups), each
            choosing for an equal, contiguous block of the rows (env copies); default the policy's own.
    """

    def __init__(self, policy: MLSHPolicy, masters: Sequence[CategoricalMLPPolicy] | None = None) -> None:
        self.num_options = policy.num_subpolicies
        self.act_dim = policy.act_dim
        self.sub_normalize = frozen_normalizer(policy.sub_normalizer)
        self.sub_normalize_numpy = frozen_numpy_normalizer(policy.sub_normalizer)
        self.subpolicies = [FusedMLP(sub.actor, sub.critic) for sub in policy.subpolicies]
        self.log_std = torch.stack([sub.clamped_log_std().detach() for sub in policy.subpolicies])  # [K, act_dim]
        masters = [policy.master] if masters is None else list(masters)
        self.masters = [(frozen_normalizer(m.normalizer), FusedMLP(m.actor, m.critic)) for m in masters]

    def sub(self, obs: Tensor, options: np.ndarray) -> tuple[Tensor, Tensor]:
        """Action mean [N, act_dim] and value [N] of each row's sub-policy (options [N] int), for raw
        observations [N, obs_dim]."""
        out = by_option(options, self.num_options, self.sub_normalize(obs), lambda k, x: self.subpolicies[k](x))
        return out[:, : self.act_dim], out[:, self.act_dim]

    def sub_numpy(self, obs: np.ndarray, options: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`sub` in numpy, for the few rows of one control step: mean [N, act_dim] and value [N], float32."""
        x = self.sub_normalize_numpy(np.asarray(obs, np.float32))
        if self.num_options == 1 or (options == options[0]).all():
            out = self.subpolicies[int(options[0])].numpy(x)
        else:
            out = np.empty((len(x), self.act_dim + 1), np.float32)
            for k in np.unique(options):
                rows = options == k
                out[rows] = self.subpolicies[k].numpy(x[rows])
        return out[:, : self.act_dim], out[:, self.act_dim]

    def choose(self, obs: Tensor, uniforms: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Epsilon-greedy master choice per row, as `CategoricalMLPPolicy.act(obs, epsilon=epsilon)` of the
        row's master.

        Args:
            obs: [N, obs_dim] raw observations.
            uniforms: [N, 3] float64 in [0, 1): inverse-CDF draw, explore draw, uniform-option draw.
            epsilon: Share of choices replaced by a uniformly random option.

        Returns:
            option [N] int64, log_prob [N] of the option under the master's own distribution, value [N].
        """
        if len(self.masters) == 1:
            normalize, master = self.masters[0]
            out = master(normalize(obs))
        else:
            if len(obs) % len(self.masters):
                raise ValueError(f"{len(obs)} rows do not split into {len(self.masters)} equal master blocks")
            block = len(obs) // len(self.masters)
            blocks = zip(self.masters, obs.split(block), strict=True)
            out = torch.cat([master(normalize(rows)) for (normalize, master), rows in blocks])
        log_probs = torch.log_softmax(out[:, : self.num_options], dim=-1).numpy()
        cdf = np.cumsum(np.exp(log_probs.astype(np.float64)), axis=-1)
        cdf /= cdf[:, -1:]  # exactly 1 at the end, so the inverse CDF stays in range
        sampled = (cdf <= uniforms[:, :1]).sum(-1)
        uniform = np.minimum((uniforms[:, 2] * self.num_options).astype(np.int64), self.num_options - 1)
        option = np.where(uniforms[:, 1] < epsilon, uniform, sampled)
        return option, log_probs[np.arange(len(option)), option], out[:, self.num_options].numpy()


StepFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, np.ndarray]]]
"""actions [E, act_dim] -> next obs [E, obs_dim], reward [E], terminated [E], truncated [E], and the final
observation of each copy whose episode ended, by copy index. Autoreset is SAME_STEP: the next obs of
such a copy is already the first observation of its next episode."""


@runtime_checkable
class RolloutCollector(Protocol):
    """A vector env that runs `collect_segment` over its copies itself, e.g. in worker processes that hold
    a copy of the rollout networks (sim/rollout_workers.py); `MLSHTrainer` hands it the rollouts when
    it has one."""

    def collect_rollout(
        self,
        policy: MLSHPolicy,
        obs: np.ndarray,
        noise: np.ndarray,
        uniforms: np.ndarray | None,
        episode_returns: np.ndarray,
        *,
        macro_steps: int,
        epsilon: float,
        masters: Sequence[CategoricalMLPPolicy] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`collect_segment(RolloutNetworks(policy, masters), <its copies' step>, obs, ...)` over all copies."""
        ...


def collect_segment(
    nets: RolloutNetworks,
    step: StepFn,
    obs: np.ndarray,
    noise: np.ndarray,
    uniforms: np.ndarray | None,
    episode_returns: np.ndarray,
    *,
    macro_steps: int,
    epsilon: float,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Roll E env copies forward T steps with the MLSH policy in `nets`; call under `torch.inference_mode`.

    Every row is computed on its own (`FusedMLP` results do not depend on the batch), so a segment over
    copies [a, b) equals columns [a, b) of a segment over all copies: the trainer runs one segment
    over the whole vector env, a worker process one over its own copies.

    Args:
        nets: The rollout networks.
        step: Steps the E copies (see `StepFn`).
        obs: [E, obs_dim] the current observations.
        noise: [T, E, act_dim] standard-normal draws; action = mean + std * noise.
        uniforms: [T, E, 3] float64 draws for the master's choices (see `RolloutNetworks.choose`);
            None with one sub-policy (no master).
        episode_returns: [E] return so far of each copy's running episode; updated in place.
        macro_steps: Control steps per master decision.
        epsilon: Share of master choices drawn uniformly at random.

    Returns:
        The next observations [E, obs_dim] and the segment: time-major arrays [T, E, ...] of the
        steps (obs, option, action, log_prob, value, next_value, reward, terminated, truncated,
        next_obs), of the master's macro-steps (decided: a macro-step starts here, with its
        master_log_prob and master_value; closed: it ends after this step) and episode_return (the
        return of an episode that ended at this step, NaN elsewhere).
    """
    num_steps, num_envs, act_dim = noise.shape
    use_master = uniforms is not None
    shape = (num_steps, num_envs)
    data = {
        "obs": np.empty((*shape, obs.shape[-1]), np.float32),
        "next_obs": np.empty((*shape, obs.shape[-1]), np.float32),
        "option": np.zeros(shape, np.int64),
        "action": np.empty((*shape, act_dim), np.float32),
        "mean": np.empty((*shape, act_dim), np.float32),
        "value": np.empty(shape, np.float32),
        "reward": np.empty(shape, np.float64),
        "terminated": np.empty(shape, bool),
        "truncated": np.empty(shape, bool),
        "decided": np.zeros(shape, bool),
        "closed": np.zeros(shape, bool),
        "master_log_prob": np.zeros(shape, np.float32),
        "master_value": np.zeros(shape, np.float32),
        "episode_return": np.full(shape, np.nan),
    }
    std = nets.log_std.exp().numpy()  # [K, act_dim]
    options = np.zeros(num_envs, np.int64)
    macro_length = np.zeros(num_envs, np.int64)
    is_open = np.zeros(num_envs, bool)  # every copy starts a macro-step at the segment's first step
    for t in range(num_steps):
        if use_master and not is_open.all():
            decide = ~is_open
            chosen, log_prob, value = nets.choose(torch.as_tensor(obs, dtype=torch.float32), uniforms[t], epsilon)
            options = np.where(decide, chosen, options)
            # Kept on the deciding rows only, so a copy's columns do not depend on the other copies.
            data["master_log_prob"][t] = np.where(decide, log_prob, 0.0)
            data["master_value"][t] = np.where(decide, value, 0.0)
            data["decided"][t] = decide
            macro_length[decide] = 0
            is_open[:] = True
        mean, value = nets.sub_numpy(obs, options)
        # Stored before stepping: a vector env built with copy=False reuses its observation array.
        data["obs"][t] = obs
        data["option"][t] = options
        data["action"][t] = action = mean + std[options] * noise[t]
        data["mean"][t] = mean
        data["value"][t] = value
        next_obs, reward, terminated, truncated, final_obs = step(action)
        data["next_obs"][t] = next_obs
        data["reward"][t] = reward
        data["terminated"][t] = terminated
        data["truncated"][t] = truncated
        episode_returns += reward
        for e, final in final_obs.items():
            data["next_obs"][t, e] = final  # the state before the autoreset
            data["episode_return"][t, e] = episode_returns[e]
            episode_returns[e] = 0.0
        if use_master:
            macro_length += 1
            data["closed"][t] = closed = (macro_length >= macro_steps) | terminated | truncated
            is_open &= ~closed
        obs = next_obs
    # The segment boundary cuts GAE like a time limit (bootstrap from V(next obs)) and closes every macro-step.
    data["truncated"][-1] = True
    data["closed"][-1] = True

    log_std = nets.log_std[torch.from_numpy(data["option"])]
    data["log_prob"] = gaussian_log_prob(
        torch.from_numpy(data["action"]), torch.from_numpy(data.pop("mean")), log_std
    ).numpy()
    next_obs_t = torch.from_numpy(data["next_obs"]).reshape(num_steps * num_envs, -1)
    data["next_value"] = nets.sub(next_obs_t, data["option"].reshape(-1))[1].reshape(shape).numpy()
    return obs, data

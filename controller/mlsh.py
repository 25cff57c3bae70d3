"""MLSH trainer (Frans et al. 2017): per sampled task a fresh master, W warm-up iterations that
update the master only, then U joint iterations that update master and shared sub-policies.

The trainer knows no simulator: it is handed a Gymnasium vector env (with `set_task` reachable
through `envs.call`) and a task sampler.

Rollouts run on frozen copies of the networks with each actor and critic fused into one MLP
(`FusedMLP`), under `torch.inference_mode`, with the iteration's sampling noise drawn up front and
the per-step bookkeeping done on preallocated [T, E] arrays. PPO evaluates each row with its own
sub-policy only. The sampled distributions are those of `MLSHPolicy.sub_act` and
`CategoricalMLPPolicy.act`. With one sub-policy the master has nothing to choose, so it is neither
run nor trained: MLSH with K = 1 is domain-randomized PPO.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from controller.policies import MLSHPolicy
from controller.ppo import PPOConfig, compute_gae, ppo_update
from controller.rollout import RolloutNetworks, by_option, gaussian_log_prob
from controller.rundir import RunDir

logger = logging.getLogger(__name__)

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
NUM_RECENT_RETURNS = 100
"""Completed-episode returns kept in `MLSHTrainer.recent_returns`."""


@dataclass
class MLSHConfig:
    """MLSH schedule and optimization."""

    num_task_groups: int = 20
    """Tasks sampled in sequence; each gets a fresh master and W + U iterations."""
    warmup_iterations: int = 2
    """W: iterations per task that update the master only."""
    joint_iterations: int = 6
    """U: iterations per task that update master and sub-policies."""
    steps_per_iteration: int = 2048
    """Environment steps per iteration, summed over the vector env's copies."""
    gamma: float = 0.99
    """Discount per control step (sub-policies)."""
    lam: float = 0.95
    """GAE lambda (sub-policies)."""
    master_gamma: float = 0.9
    """Discount per macro-step (master)."""
    master_lam: float = 0.95
    """GAE lambda per macro-step (master)."""
    master_epsilon: float = 0.1
    """Share of master choices drawn uniformly at random, for exploration."""
    reset_master: bool = True
    """Re-initialize the master for each task (False keeps one master across tasks)."""
    master_ppo: PPOConfig = field(default_factory=lambda: PPOConfig(learning_rate=1e-3, num_minibatches=2))
    """PPO on macro-steps for the master."""
    sub_ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO on control steps for the sub-policies."""

    @property
    def iterations_per_group(self) -> int:
        return self.warmup_iterations + self.joint_iterations


class MLSHTrainer:
    """Runs the MLSH schedule, writing metrics and a checkpoint after every task group."""

    def __init__(
        self,
        policy: MLSHPolicy,
        envs: gym.vector.VectorEnv,
        sample_task: Callable[[np.random.Generator], Any],
        config: MLSHConfig,
        run_dir: RunDir,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.envs = envs
        self.sample_task = sample_task
        self.config = config
        self.run_dir = run_dir
        self.seed = seed
        self.num_envs = envs.num_envs
        self.macro_steps = policy.macro_steps
        sub_params = list(policy.subpolicies.parameters())
        self.sub_optimizer = torch.optim.Adam(sub_params, lr=config.sub_ppo.learning_rate)
        self.master_optimizer = self._new_master_optimizer()
        self.rng = np.random.default_rng(seed)
        self.group = 0
        self.total_steps = 0
        self.num_metric_rows = 0
        self._episode_returns = np.zeros(self.num_envs)
        self.wall_time_s = 0.0
        # Returns of the latest completed episodes, oldest first (diagnostics; not checkpointed).
        self.recent_returns: deque[float] = deque(maxlen=NUM_RECENT_RETURNS)

    def _new_master_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.policy.master.parameters(), lr=self.config.master_ppo.learning_rate)

    # -- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "policy_config": self.policy.config,
            "sub_optimizer": self.sub_optimizer.state_dict(),
            "master_optimizer": self.master_optimizer.state_dict(),
            "group": self.group,
            "total_steps": self.total_steps,
            "num_metric_rows": self.num_metric_rows,
            "rng": _rng_to_tensor(self.rng),
            "wall_time_s": self.wall_time_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.sub_optimizer.load_state_dict(state["sub_optimizer"])
        if "master_optimizer" in state:
            self.master_optimizer.load_state_dict(state["master_optimizer"])
        self.group = int(state["group"])
        self.total_steps = int(state["total_steps"])
        self.num_metric_rows = int(state["num_metric_rows"])
        self.rng = _rng_from_tensor(state["rng"])
        self.wall_time_s = float(state.get("wall_time_s", 0.0))

    def resume_if_possible(self) -> bool:
        """Continue from the run directory's checkpoint, dropping metrics logged after it."""
        if not self.run_dir.has_checkpoint():
            return False
        self.load_state_dict(self.run_dir.load_checkpoint())
        self.run_dir.truncate_metrics(self.num_metric_rows)
        logger.info("resumed at task group %d (%d env steps)", self.group, self.total_steps)
        return True

    # -- training --------------------------------------------------------------------------

    def train(self, progress: bool = True, on_group_end: Callable[[MLSHTrainer], None] | None = None) -> None:
        from tqdm import tqdm

        config = self.config
        total = config.num_task_groups * config.iterations_per_group
        bar = tqdm(total=total, initial=self.group * config.iterations_per_group, desc="train", disable=not progress)
        while self.group < config.num_task_groups:
            # Everything random in a group derives from (seed, group), so a resumed run repeats it exactly.
            torch.manual_seed(self.seed * 100_003 + self.group)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.group)
            task = self.sample_task(self.rng)
            self.envs.call("set_task", task)
            if config.reset_master:
                self.policy.reset_master(generator)
                self.master_optimizer = self._new_master_optimizer()
            obs, _ = self.envs.reset(seed=int(self.rng.integers(2**31)))
            self._episode_returns = np.zeros(self.num_envs)
            for iteration in range(config.iterations_per_group):
                start = time.perf_counter()
                obs, rollout = self._collect(obs, config.steps_per_iteration // self.num_envs)
                self.recent_returns.extend(rollout["finished_returns"])
                stats = self._update(rollout, joint=iteration >= config.warmup_iterations, generator=generator)
                elapsed = time.perf_counter() - start
                self.wall_time_s += elapsed
                stats["steps_per_second"] = rollout["num_steps"] / elapsed
                stats["task_group"] = self.group
                self.total_steps += rollout["num_steps"]
                self.run_dir.log_metrics(self.total_steps, stats)
                self.num_metric_rows += 1
                bar.update(1)
                if "episode_return" in stats:
                    bar.set_postfix(ret=f"{stats['episode_return']:.1f}", group=self.group)
            self.group += 1
            self.run_dir.save_checkpoint(self.state_dict())
            if on_group_end is not None:
                on_group_end(self)
        bar.close()
        self.run_dir.plot_learning_curve()

    @torch.inference_mode()
    def _collect(self, obs: np.ndarray, num_steps: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Roll the vector env forward `num_steps` per copy; returns the next obs and the data.

        Returns:
            The next observations [E, obs_dim] and the rollout: time-major arrays [T, E, ...] of the
            steps (obs, option, action, log_prob, value, next_value, reward, terminated, truncated,
            next_obs) and of the master's macro-steps (decided: a macro-step starts here, with its
            master_log_prob and master_value; closed: it ends after this step), plus
            finished_returns and num_steps.
        """
        policy, num_envs, num_options = self.policy, self.num_envs, self.policy.num_subpolicies
        nets = RolloutNetworks(policy)
        use_master = num_options > 1
        shape = (num_steps, num_envs)
        data = {
            "obs": np.empty((*shape, obs.shape[-1]), np.float32),
            "next_obs": np.empty((*shape, obs.shape[-1]), np.float32),
            "option": np.zeros(shape, np.int64),
            "action": np.empty((*shape, policy.act_dim), np.float32),
            "mean": np.empty((*shape, policy.act_dim), np.float32),
            "value": np.empty(shape, np.float32),
            "reward": np.empty(shape, np.float64),
            "terminated": np.empty(shape, bool),
            "truncated": np.empty(shape, bool),
            "decided": np.zeros(shape, bool),
            "closed": np.zeros(shape, bool),
            "master_log_prob": np.zeros(shape, np.float32),
            "master_value": np.zeros(shape, np.float32),
        }
        # All sampling randomness of the iteration in two draws from the (per-group seeded) global RNG.
        noise = torch.randn(*shape, policy.act_dim).numpy()
        uniforms = torch.rand(*shape, 3, dtype=torch.float64).numpy() if use_master else None
        std = nets.log_std.exp().numpy()  # [K, act_dim]
        options = np.zeros(num_envs, np.int64)
        macro_length = np.zeros(num_envs, np.int64)
        is_open = np.zeros(num_envs, bool)  # every copy starts a macro-step at the rollout's first step
        episode_returns = self._episode_returns
        finished: list[float] = []
        for t in range(num_steps):
            obs_t = torch.as_tensor(obs, dtype=torch.float32)  # no copy for a float32 env
            if use_master and not is_open.all():
                decide = ~is_open
                chosen, data["master_log_prob"][t], data["master_value"][t] = nets.choose(
                    obs_t, uniforms[t], self.config.master_epsilon
                )
                options = np.where(decide, chosen, options)
                data["decided"][t] = decide
                macro_length[decide] = 0
                is_open[:] = True
            mean, value = nets.sub(obs_t, options)
            mean = mean.numpy()
            action = mean + std[options] * noise[t]
            # Stored before stepping: a vector env built with copy=False reuses its observation array.
            data["obs"][t] = obs
            data["option"][t] = options
            data["action"][t] = action
            data["mean"][t] = mean
            data["value"][t] = value.numpy()
            next_obs, reward, terminated, truncated, info = self.envs.step(action)
            data["next_obs"][t] = next_obs
            data["reward"][t] = reward
            data["terminated"][t] = terminated
            data["truncated"][t] = truncated
            done = terminated | truncated
            episode_returns += reward
            if done.any():
                for e in np.flatnonzero(done):
                    data["next_obs"][t, e] = info["final_obs"][e]  # the state before the autoreset
                    finished.append(float(episode_returns[e]))
                    episode_returns[e] = 0.0
            if use_master:
                macro_length += 1
                data["closed"][t] = closed = (macro_length >= self.macro_steps) | done
                is_open &= ~closed
            obs = next_obs
        # The rollout boundary cuts GAE like a time limit (bootstrap from V(next obs)) and closes every macro-step.
        data["truncated"][-1] = True
        data["closed"][-1] = True
        self._episode_returns = episode_returns

        log_std = nets.log_std[torch.from_numpy(data["option"])]
        data["log_prob"] = gaussian_log_prob(
            torch.from_numpy(data["action"]), torch.from_numpy(data.pop("mean")), log_std
        ).numpy()
        next_obs_t = torch.from_numpy(data["next_obs"]).reshape(num_steps * num_envs, -1)
        data["next_value"] = nets.sub(next_obs_t, data["option"].reshape(-1))[1].reshape(shape).numpy()
        data["finished_returns"] = finished
        data["num_steps"] = num_steps * num_envs
        return obs, data

    def _update(self, rollout: dict[str, Any], joint: bool, generator: torch.Generator) -> dict[str, float]:
        config, policy = self.config, self.policy
        stats: dict[str, float] = {}
        finished = rollout["finished_returns"]
        if finished:
            stats["episode_return"] = float(np.mean(finished))
        stats["reward_per_step"] = float(rollout["reward"].mean())

        master_batch = None
        if policy.num_subpolicies > 1:
            # Master: PPO on macro-steps with macro-level GAE.
            master_batch = self._master_batch(rollout)
            if master_batch["obs"].shape[0] >= config.master_ppo.num_minibatches:
                master_stats = ppo_update(
                    policy.master.evaluate,
                    policy.master.parameters(),
                    self.master_optimizer,
                    master_batch,
                    config.master_ppo,
                    generator,
                )
                stats.update({f"master/{k}": v for k, v in master_stats.items()})
        if joint:
            sub_stats = ppo_update(
                self._sub_evaluate,
                policy.subpolicies.parameters(),
                self.sub_optimizer,
                self._sub_batch(rollout),
                config.sub_ppo,
                generator,
            )
            stats.update({f"sub/{k}": v for k, v in sub_stats.items()})
        # Normalizers move after the update so each PPO ratio starts at 1.
        if master_batch is not None:
            policy.master.update_normalizer(master_batch["obs"])
        if joint:
            policy.sub_normalizer.update(torch.as_tensor(rollout["obs"], dtype=torch.float32))
        counts = np.bincount(rollout["option"].reshape(-1), minlength=policy.num_subpolicies)
        stats["master/option_entropy"] = float(-(counts / counts.sum() * np.log(counts / counts.sum() + 1e-12)).sum())
        return stats

    def _sub_evaluate(self, obs_and_options: tuple[Tensor, Tensor], actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """PPO `evaluate` of the sub-policies: the distribution of `MLSHPolicy.sub_evaluate`, but each
        row runs through its own sub-policy only.

        Args:
            obs_and_options: raw observations [M, obs_dim] and sub-policy indices [M].
            actions: [M, act_dim].

        Returns:
            log_prob [M], entropy [M] (both summed over action dims), value [M]; differentiable.
        """
        obs, options = obs_and_options
        policy, act_dim = self.policy, self.policy.act_dim

        def chosen(k: int, rows: Tensor) -> Tensor:
            sub = policy.subpolicies[k]
            return torch.cat([sub.actor(rows), sub.log_std.expand(len(rows), act_dim), sub.critic(rows)], dim=-1)

        out = by_option(options.numpy(), policy.num_subpolicies, policy.sub_normalizer(obs), chosen)
        mean, log_std, value = out.split([act_dim, act_dim, 1], dim=-1)
        # Entropy of a diagonal Gaussian: sum(0.5 + 0.5 log(2 pi) + log_std).
        entropy = (0.5 + HALF_LOG_2PI + log_std).sum(-1)
        return gaussian_log_prob(actions, mean, log_std), entropy, value.squeeze(-1)

    @torch.no_grad()
    def _master_batch(self, rollout: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The macro-steps of each env copy in time order (copy 0 first), with macro-level GAE."""
        # Macro-steps tile each copy's time axis: a step is decided right after a closed one.
        streams = [
            (np.flatnonzero(rollout["decided"][:, e]), np.flatnonzero(rollout["closed"][:, e]))
            for e in range(self.num_envs)
        ]
        next_obs = np.concatenate([rollout["next_obs"][ends, e] for e, (_, ends) in enumerate(streams)])
        next_values = self.policy.master.value(torch.as_tensor(next_obs, dtype=torch.float32)).numpy()
        obs, options, log_probs, advantages, returns = [], [], [], [], []
        offset = 0
        for e, (starts, ends) in enumerate(streams):
            terminated = rollout["terminated"][ends, e]
            adv, ret = compute_gae(
                np.add.reduceat(rollout["reward"][:, e], starts),  # reward summed over each macro-step
                rollout["master_value"][starts, e],
                next_values[offset : offset + len(starts)],
                terminated,
                rollout["truncated"][ends, e] & ~terminated,
                self.config.master_gamma,
                self.config.master_lam,
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

    def _sub_batch(self, rollout: dict[str, Any]) -> dict[str, Any]:
        """Every control step, flattened time-major, with GAE computed per copy over [T, E]."""
        advantages, returns = compute_gae(
            rollout["reward"],
            rollout["value"],
            rollout["next_value"],
            rollout["terminated"],
            rollout["truncated"],
            self.config.gamma,
            self.config.lam,
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


def _rng_to_tensor(rng: np.random.Generator) -> dict[str, Any]:
    """numpy Generator state as plain values (torch.load(weights_only=True) accepts them)."""
    state = rng.bit_generator.state
    return {
        "bit_generator": state["bit_generator"],
        "state": int(state["state"]["state"]),
        "inc": int(state["state"]["inc"]),
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def _rng_from_tensor(data: dict[str, Any]) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = {
        "bit_generator": data["bit_generator"],
        "state": {"state": data["state"], "inc": data["inc"]},
        "has_uint32": data["has_uint32"],
        "uinteger": data["uinteger"],
    }
    return rng

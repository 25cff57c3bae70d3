"""MLSH trainer (Frans et al. 2017): per sampled task a fresh master, W warm-up iterations that
update the master only, then U joint iterations that update master and shared sub-policies.

The trainer knows no simulator: it is handed a Gymnasium vector env (with `set_task` reachable
through `envs.call`) and a task sampler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from controller.policies import MLSHPolicy
from controller.ppo import PPOConfig, compute_gae, ppo_update
from controller.rundir import RunDir

logger = logging.getLogger(__name__)


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


@dataclass
class _Macro:
    """An open master decision in one env copy."""

    obs: np.ndarray
    option: int
    log_prob: float
    value: float
    reward: float = 0.0
    steps: int = 0


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

    @torch.no_grad()
    def _collect(self, obs: np.ndarray, num_steps: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Roll the vector env forward `num_steps` per copy; returns the next obs and the data."""
        policy, num_envs = self.policy, self.num_envs
        steps: dict[str, list] = {
            key: []
            for key in ("obs", "option", "action", "log_prob", "value", "reward", "terminated", "truncated", "next_obs")
        }
        macros: list[list[dict]] = [[] for _ in range(num_envs)]
        open_macro: list[_Macro | None] = [None] * num_envs
        episode_returns = self._episode_returns
        finished: list[float] = []
        for t in range(num_steps):
            obs_t = torch.as_tensor(obs, dtype=torch.float32)
            need = [e for e in range(num_envs) if open_macro[e] is None]
            if need:
                option, log_prob, value = policy.master.act(obs_t[need], epsilon=self.config.master_epsilon)
                for row, e in enumerate(need):
                    open_macro[e] = _Macro(obs[e].copy(), int(option[row]), float(log_prob[row]), float(value[row]))
            options = torch.tensor([m.option for m in open_macro])
            action, log_prob, value = policy.sub_act(obs_t, options)
            next_obs, reward, terminated, truncated, info = self.envs.step(action.numpy())
            done = np.logical_or(terminated, truncated)
            real_next = next_obs.copy()
            if done.any():
                final = info["final_obs"]
                for e in np.flatnonzero(done):
                    real_next[e] = final[e]
            last = t == num_steps - 1
            steps["obs"].append(obs)
            steps["option"].append(options.numpy())
            steps["action"].append(action.numpy())
            steps["log_prob"].append(log_prob.numpy())
            steps["value"].append(value.numpy())
            steps["reward"].append(reward)
            steps["terminated"].append(terminated)
            # The rollout boundary cuts GAE like a time limit: bootstrap from V(next obs).
            steps["truncated"].append(np.logical_or(truncated, last))
            steps["next_obs"].append(real_next)
            episode_returns += reward
            for e in range(num_envs):
                macro = open_macro[e]
                macro.reward += float(reward[e])
                macro.steps += 1
                if macro.steps >= self.macro_steps or done[e] or last:
                    macros[e].append(
                        {
                            "obs": macro.obs,
                            "option": macro.option,
                            "log_prob": macro.log_prob,
                            "value": macro.value,
                            "reward": macro.reward,
                            "terminated": bool(terminated[e]),
                            "truncated": bool(truncated[e] or last) and not terminated[e],
                            "next_obs": real_next[e],
                        }
                    )
                    open_macro[e] = None
                if done[e]:
                    finished.append(float(episode_returns[e]))
                    episode_returns[e] = 0.0
            obs = next_obs
        self._episode_returns = episode_returns
        rollout = {key: np.asarray(value) for key, value in steps.items()}  # [T, E, ...]
        rollout["macros"] = macros
        rollout["finished_returns"] = finished
        rollout["num_steps"] = num_steps * num_envs
        return obs, rollout

    def _update(self, rollout: dict[str, Any], joint: bool, generator: torch.Generator) -> dict[str, float]:
        config, policy = self.config, self.policy
        stats: dict[str, float] = {}
        finished = rollout["finished_returns"]
        if finished:
            stats["episode_return"] = float(np.mean(finished))
        stats["reward_per_step"] = float(rollout["reward"].mean())

        # Master: PPO on macro-steps with macro-level GAE.
        master_batch = self._master_batch(rollout["macros"])
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
            sub_batch = self._sub_batch(rollout)
            sub_stats = ppo_update(
                lambda obs, actions: policy.sub_evaluate(obs[0], obs[1], actions),
                policy.subpolicies.parameters(),
                self.sub_optimizer,
                sub_batch,
                config.sub_ppo,
                generator,
            )
            stats.update({f"sub/{k}": v for k, v in sub_stats.items()})
        # Normalizers move after the update so each PPO ratio starts at 1.
        flat_obs = torch.as_tensor(rollout["obs"].reshape(-1, rollout["obs"].shape[-1]), dtype=torch.float32)
        master_obs = master_batch["obs"]
        policy.master.update_normalizer(master_obs)
        if joint:
            policy.sub_normalizer.update(flat_obs)
        counts = np.bincount(rollout["option"].reshape(-1), minlength=policy.num_subpolicies)
        stats["master/option_entropy"] = float(-(counts / counts.sum() * np.log(counts / counts.sum() + 1e-12)).sum())
        return stats

    @torch.no_grad()
    def _master_batch(self, macros: list[list[dict]]) -> dict[str, torch.Tensor]:
        master = self.policy.master
        obs, options, log_probs, advantages, returns = [], [], [], [], []
        for stream in macros:
            if not stream:
                continue
            next_values = master.value(torch.as_tensor(np.stack([m["next_obs"] for m in stream]), dtype=torch.float32))
            values = np.array([m["value"] for m in stream])
            adv, ret = compute_gae(
                np.array([m["reward"] for m in stream]),
                values,
                next_values.numpy(),
                np.array([m["terminated"] for m in stream]),
                np.array([m["truncated"] for m in stream]),
                self.config.master_gamma,
                self.config.master_lam,
            )
            obs += [m["obs"] for m in stream]
            options += [m["option"] for m in stream]
            log_probs += [m["log_prob"] for m in stream]
            advantages.append(adv)
            returns.append(ret)
        return {
            "obs": torch.as_tensor(np.stack(obs), dtype=torch.float32),
            "actions": torch.as_tensor(options, dtype=torch.long),
            "log_probs": torch.as_tensor(log_probs, dtype=torch.float32),
            "advantages": torch.as_tensor(np.concatenate(advantages), dtype=torch.float32),
            "returns": torch.as_tensor(np.concatenate(returns), dtype=torch.float32),
        }

    @torch.no_grad()
    def _sub_batch(self, rollout: dict[str, Any]) -> dict[str, Any]:
        num_steps, num_envs = rollout["reward"].shape
        obs = torch.as_tensor(rollout["obs"], dtype=torch.float32)
        options = torch.as_tensor(rollout["option"], dtype=torch.long)
        next_obs = torch.as_tensor(rollout["next_obs"], dtype=torch.float32)
        flat = lambda x: x.reshape(num_steps * num_envs, *x.shape[2:])  # noqa: E731
        next_values = self.policy.sub_act(flat(next_obs), flat(options), deterministic=True)[2].reshape(
            num_steps, num_envs
        )
        advantages = np.zeros((num_steps, num_envs))
        returns = np.zeros((num_steps, num_envs))
        for e in range(num_envs):
            advantages[:, e], returns[:, e] = compute_gae(
                rollout["reward"][:, e],
                rollout["value"][:, e],
                next_values[:, e].numpy(),
                rollout["terminated"][:, e],
                rollout["truncated"][:, e],
                self.config.gamma,
                self.config.lam,
            )
        return {
            "obs": (flat(obs), flat(options)),
            "actions": torch.as_tensor(flat(rollout["action"]), dtype=torch.float32),
            "log_probs": torch.as_tensor(flat(rollout["log_prob"]), dtype=torch.float32),
            "advantages": torch.as_tensor(advantages.reshape(-1), dtype=torch.float32),
            "returns": torch.as_tensor(returns.reshape(-1), dtype=torch.float32),
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

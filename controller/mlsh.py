"""MLSH trainer (Frans et al. 2017): per sampled task a fresh master (or one started from a
meta-learned initialization), W warm-up iterations that update the master only, then U joint
iterations that update master and shared sub-policies. Several task groups can run side by side,
each on its own block of env copies with its own task and master, pooling their steps into one
sub-policy update (`MLSHConfig.parallel_groups`).

The trainer knows no simulator: it is handed a Gymnasium vector env (with `set_task` reachable
through `envs.call`) and a task sampler.

Rollouts (`collect_segment`) run on frozen copies of the networks with each actor and critic fused
into one MLP (`FusedMLP`), under `torch.inference_mode`, with the iteration's sampling noise drawn up
front and the per-step bookkeeping done on preallocated [T, E] arrays, here or, when the vector env is
a `RolloutCollector` (sampler backend "worker"), in its worker processes. PPO evaluates each row with its own
sub-policy only. The sampled distributions are those of `MLSHPolicy.sub_act` and
`CategoricalMLPPolicy.act`. With one sub-policy the master has nothing to choose, so it is neither
run nor trained: MLSH with K = 1 is domain-randomized PPO.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from controller import mlsh_batches
from controller.adaptation import start_task_master
from controller.errors import ConfigError
from controller.mlsh_config import MLSHConfig
from controller.mlsh_policy import MLSHPolicy
from controller.policies import CategoricalMLPPolicy
from controller.ppo import ppo_update
from controller.rollout import RolloutCollector, RolloutNetworks, StepFn, by_option, collect_segment, gaussian_log_prob
from controller.rundir import RunDir, rng_from_state, rng_state

logger = logging.getLogger(__name__)

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
NUM_RECENT_RETURNS = 100
"""Completed-episode returns kept in `MLSHTrainer.recent_returns`."""


class MLSHTrainer:
    """Runs the MLSH schedule, writing metrics and a checkpoint after every round of task groups
    (`parallel_groups` tasks side by side; one task per round by default).

    Attributes:
        masters: One master per parallel group; the first is the policy's own (the one exported).
    """

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
        groups = config.parallel_groups
        if self.num_envs % groups:
            raise ConfigError(f"mlsh.parallel_groups = {groups} must divide sampler.num_envs = {self.num_envs}")
        if groups > 1 and not (hasattr(envs, "call_each") or isinstance(envs, gym.vector.SyncVectorEnv)):
            raise ConfigError(
                f"mlsh.parallel_groups = {groups} needs a task per env copy, which sampler backend "
                f"{type(envs).__name__} cannot set; use backend inline, worker or ray"
            )
        self.copies_per_group = self.num_envs // groups
        sub_params = list(policy.subpolicies.parameters())
        self.sub_optimizer = torch.optim.Adam(sub_params, lr=config.sub_ppo.learning_rate)
        self.masters: list[CategoricalMLPPolicy] = [policy.master] + [
            copy.deepcopy(policy.master) for _ in range(groups - 1)
        ]
        self.master_optimizers = [self._new_master_optimizer(master) for master in self.masters]
        self.rng = np.random.default_rng(seed)
        self.group = 0
        self.total_steps = 0
        self.num_metric_rows = 0
        self._episode_returns = np.zeros(self.num_envs)
        self.wall_time_s = 0.0
        # master_init "meta": the meta-learned master (weights and normalizer), set at the first group.
        self.master_init_state: dict[str, Tensor] | None = None
        # Returns of the latest completed episodes, oldest first (diagnostics; not checkpointed).
        self.recent_returns: deque[float] = deque(maxlen=NUM_RECENT_RETURNS)

    def _new_master_optimizer(self, master: CategoricalMLPPolicy) -> torch.optim.Optimizer:
        return torch.optim.Adam(master.parameters(), lr=self.config.master_ppo.learning_rate)

    def start_master(self, policy: MLSHPolicy | None = None, generator: torch.Generator | None = None) -> None:
        """Put a master where a new task starts, by `config.master_init` (the meta-test does the same).

        Args:
            policy: Whose master to set (a copy for a meta-test task); default every parallel
                group's master of the trained policy, in group order.
            generator: Random source of a "reset" master's weights.
        """
        if self.config.master_init == "meta" and self.master_init_state is None:
            raise RuntimeError("master_init 'meta' has no initialization before the first task group")
        for master in self.masters if policy is None else [policy.master]:
            start_task_master(master, self.config.master_init, generator, self.master_init_state)

    # -- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "policy_config": self.policy.config,
            "sub_optimizer": self.sub_optimizer.state_dict(),
            "master_optimizer": self.master_optimizers[0].state_dict(),
            # The other parallel groups' masters (the first is in "policy").
            "group_masters": [master.state_dict() for master in self.masters[1:]],
            "group_master_optimizers": [optimizer.state_dict() for optimizer in self.master_optimizers[1:]],
            "group": self.group,
            "total_steps": self.total_steps,
            "num_metric_rows": self.num_metric_rows,
            "rng": rng_state(self.rng),
            "wall_time_s": self.wall_time_s,
            "master_init": self.master_init_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.sub_optimizer.load_state_dict(state["sub_optimizer"])
        if "master_optimizer" in state:
            self.master_optimizers[0].load_state_dict(state["master_optimizer"])
        group_masters = state.get("group_masters", [])
        if group_masters and len(group_masters) != len(self.masters) - 1:
            raise ConfigError(
                f"checkpoint has {len(group_masters) + 1} parallel groups, the config "
                f"mlsh.parallel_groups = {len(self.masters)}"
            )
        for master, master_state in zip(self.masters[1:], group_masters):
            master.load_state_dict(master_state)
        for optimizer, optimizer_state in zip(self.master_optimizers[1:], state.get("group_master_optimizers", [])):
            optimizer.load_state_dict(optimizer_state)
        self.group = int(state["group"])
        self.total_steps = int(state["total_steps"])
        self.num_metric_rows = int(state["num_metric_rows"])
        self.rng = rng_from_state(state["rng"])
        self.wall_time_s = float(state.get("wall_time_s", 0.0))
        master_init = state.get("master_init")
        self.master_init_state = None if master_init is None else {k: v.clone() for k, v in master_init.items()}

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
        groups = config.parallel_groups
        per_round = config.iterations_per_group
        total = config.num_task_groups // groups * per_round
        bar = tqdm(total=total, initial=self.group // groups * per_round, desc="train", disable=not progress)
        while self.group < config.num_task_groups:
            # Everything random in a round derives from (seed, group), so a resumed run repeats it exactly.
            torch.manual_seed(self.seed * 100_003 + self.group)
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.group)
            self._set_tasks([self.sample_task(self.rng) for _ in range(groups)])
            if self.master_init_state is None and config.master_init == "meta":
                self.policy.reset_master(generator)  # the first group's fresh master is the first init
                self.master_init_state = self.policy.master_state_dict()
            self.start_master(generator=generator)
            if config.master_init != "keep":
                self.master_optimizers = [self._new_master_optimizer(master) for master in self.masters]
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
            if config.master_init == "meta":
                # Batched Reptile: one step toward the mean of the round's trained masters.
                trained = _mean_state([master.state_dict() for master in self.masters])
                self.master_init_state = reptile_step(self.master_init_state, trained, config.master_meta_step)
            self.group += groups
            self.run_dir.save_checkpoint(self.state_dict())
            if on_group_end is not None:
                on_group_end(self)
        bar.close()
        self.run_dir.plot_learning_curve()

    def _set_tasks(self, tasks: list[Any]) -> None:
        """Give each parallel group's block of env copies its task."""
        if len(tasks) == 1:
            self.envs.call("set_task", tasks[0])
            return
        per_copy = [tasks[index // self.copies_per_group] for index in range(self.num_envs)]
        if hasattr(self.envs, "call_each"):
            self.envs.call_each("set_task", [(task,) for task in per_copy])
        else:  # SyncVectorEnv (checked at construction)
            for env, task in zip(self.envs.envs, per_copy, strict=True):
                env.get_wrapper_attr("set_task")(task)

    def _collect(self, obs: np.ndarray, num_steps: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Roll the vector env forward `num_steps` per copy; returns the next obs and the data.

        The rollout runs here over the whole vector env, or, for a vector env that collects rollouts
        itself (a `RolloutCollector`, e.g. sampler backend "worker"), in its workers: the same
        segments for the same seed either way.

        Returns:
            The next observations [E, obs_dim] and the rollout: the arrays of `collect_segment`
            [T, E, ...] (episode_return replaced by finished_returns, in time order) and num_steps.
        """
        policy = self.policy
        shape = (num_steps, self.num_envs)
        # All sampling randomness of the iteration in two draws from the (per-group seeded) global RNG.
        noise = torch.randn(*shape, policy.act_dim).numpy()
        uniforms = torch.rand(*shape, 3, dtype=torch.float64).numpy() if policy.num_subpolicies > 1 else None
        settings = {"macro_steps": self.macro_steps, "epsilon": self.config.master_epsilon}
        if isinstance(self.envs, RolloutCollector):
            obs, data = self.envs.collect_rollout(
                policy, obs, noise, uniforms, self._episode_returns, masters=self.masters, **settings
            )
        else:
            with torch.inference_mode():
                nets = RolloutNetworks(policy, self.masters)
                obs, data = collect_segment(
                    nets, _vector_step(self.envs), obs, noise, uniforms, self._episode_returns, **settings
                )
        episode_return = data.pop("episode_return")
        data["finished_returns"] = episode_return[~np.isnan(episode_return)].tolist()  # time-major order
        data["num_steps"] = num_steps * self.num_envs
        return obs, data

    def _update(self, rollout: dict[str, Any], joint: bool, generator: torch.Generator) -> dict[str, float]:
        config, policy = self.config, self.policy
        stats: dict[str, float] = {}
        finished = rollout["finished_returns"]
        if finished:
            stats["episode_return"] = float(np.mean(finished))
        stats["reward_per_step"] = float(rollout["reward"].mean())

        master_batches = []
        if policy.num_subpolicies > 1:
            # Each group's master: PPO on its copies' macro-steps with macro-level GAE.
            group_stats = []
            for group, (master, optimizer) in enumerate(zip(self.masters, self.master_optimizers, strict=True)):
                copies = range(group * self.copies_per_group, (group + 1) * self.copies_per_group)
                master_batch = mlsh_batches.master_batch(
                    rollout, master, copies, config.master_gamma, config.master_lam
                )
                master_batches.append(master_batch)
                if master_batch["obs"].shape[0] >= config.master_ppo.num_minibatches:
                    group_stats.append(
                        ppo_update(
                            master.evaluate, master.parameters(), optimizer, master_batch, config.master_ppo, generator
                        )
                    )
            for key in group_stats[0] if group_stats else ():  # the mean over groups
                stats[f"master/{key}"] = float(np.mean([group[key] for group in group_stats]))
        if joint:
            sub_stats = ppo_update(
                self._sub_evaluate,
                policy.subpolicies.parameters(),
                self.sub_optimizer,
                mlsh_batches.sub_batch(rollout, config.gamma, config.lam),
                config.sub_ppo,
                generator,
            )
            stats.update({f"sub/{k}": v for k, v in sub_stats.items()})
        # Normalizers move after the update so each PPO ratio starts at 1.
        for master, master_batch in zip(self.masters, master_batches):
            master.update_normalizer(master_batch["obs"])
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
            return torch.cat(
                [sub.actor(rows), sub.clamped_log_std().expand(len(rows), act_dim), sub.critic(rows)], dim=-1
            )

        out = by_option(options.numpy(), policy.num_subpolicies, policy.sub_normalizer(obs), chosen)
        mean, log_std, value = out.split([act_dim, act_dim, 1], dim=-1)
        # Entropy of a diagonal Gaussian: sum(0.5 + 0.5 log(2 pi) + log_std).
        entropy = (0.5 + HALF_LOG_2PI + log_std).sum(-1)
        return gaussian_log_prob(actions, mean, log_std), entropy, value.squeeze(-1)


def _vector_step(envs: gym.vector.VectorEnv) -> StepFn:
    """`collect_segment`'s step over a SAME_STEP-autoreset vector env."""

    def step(actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        next_obs, reward, terminated, truncated, info = envs.step(actions)
        done = terminated | truncated
        final_obs = {int(e): info["final_obs"][e] for e in np.flatnonzero(done)} if done.any() else {}
        return next_obs, reward, terminated, truncated, final_obs

    return step


def reptile_step(init: dict[str, Tensor], trained: dict[str, Tensor], step: float) -> dict[str, Tensor]:
    """init + step * (trained - init) for every floating-point entry (weights and normalizer statistics).

    Reptile (Nichol et al. 2018) with one task per meta-step; integer entries, if any, follow `trained`.
    """
    return {
        key: init[key] + step * (value - init[key]) if value.is_floating_point() else value.clone()
        for key, value in trained.items()
    }


def _mean_state(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The entrywise mean of state dicts (floating-point entries; others from the first)."""
    if len(states) == 1:
        return states[0]
    return {
        key: torch.stack([state[key] for state in states]).mean(0) if value.is_floating_point() else value.clone()
        for key, value in states[0].items()
    }

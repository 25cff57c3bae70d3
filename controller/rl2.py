"""RL^2 (Duan et al. 2016): a recurrent policy that adapts within a trial through its hidden state.

A trial is one task and `episodes_per_trial` consecutive episodes. The GRU sees
[obs, previous action, previous reward, done flag] every step, and its hidden state is carried
across the episodes of a trial (reset only at the trial start), so what it learned in early
episodes shapes later ones. For the return the trial is one long episode: episode ends inside a
trial neither terminate nor cut the discounting, and the trial end is terminal. PPO re-runs the GRU
over each stored sequence (whole trials, or truncated-BPTT chunks started from the stored hidden
state) in the update. `RL2Trainer` knows no simulator: it is handed an env factory and a task sampler.
Rollouts (`Trials`, `run_trials`, `meta_test`) and the trial-long GAE live in `controller.rl2_rollout`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from controller.errors import ConfigError
from controller.networks import RunningNormalizer, mlp, resolve_activation
from controller.policies import LOG_STD_RANGE, POLICY_OUTPUT_GAIN, VALUE_OUTPUT_GAIN, check_positive_int
from controller.ppo import PPOConfig, discount_cumsum, ppo_update
from controller.rl2_rollout import Trials, meta_test, run_trials, trial_advantages

logger = logging.getLogger(__name__)

EXPORT_INPUT_NAMES = ("obs", "hidden")
"""ONNX inputs of `GRUPolicy.export_module()`: the step input [B, input_dim] and the hidden state [B, H]."""

EXPORT_OUTPUT_NAMES = ("action", "hidden_out")
"""ONNX outputs of `GRUPolicy.export_module()`: the deterministic action [B, act_dim] and the next hidden state."""


class GRUPolicy(nn.Module):
    """Recurrent Gaussian actor-critic for RL^2.

    Step input layout (`input_dim = obs_dim + act_dim + 2`), built by `step_input`:
        [obs (obs_dim), previous action (act_dim), previous reward (1), done flag (1)]
    The previous action is the one the env executed (clipped to the action space); the done flag is
    1 on the first step of every episode but the trial's first, where action, reward and flag are 0.
    The normalizer covers the observation and the reward columns; it is applied inside every method.

    Attributes:
        config: Constructor keyword arguments; `GRUPolicy(**config)` rebuilds it.
        normalizer: RunningNormalizer over [obs, previous reward] (obs_dim + 1), or None.
        encoder: Linear + activation, [..., input_dim] -> [..., hidden_size].
        gru: GRUCell(hidden_size, hidden_size).
        actor: MLP [..., hidden_size] -> [..., act_dim] action mean.
        critic: MLP [..., hidden_size] -> [..., 1] value.
        log_std: [act_dim] learnable log standard deviation.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_size: int = 64,
        head_hidden: Sequence[int] = (64,),
        activation: str = "tanh",
        init_log_std: float = -0.5,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("obs_dim", obs_dim), ("act_dim", act_dim), ("hidden_size", hidden_size)):
            check_positive_int(name, value)
        self.config: dict[str, Any] = dict(
            obs_dim=obs_dim, act_dim=act_dim, hidden_size=hidden_size, head_hidden=list(head_hidden),
            activation=activation, init_log_std=float(init_log_std), normalize=bool(normalize),
        )  # fmt: skip
        self.obs_dim, self.act_dim, self.hidden_size = obs_dim, act_dim, hidden_size
        self.input_dim = obs_dim + act_dim + 2
        self.normalizer = RunningNormalizer(obs_dim + 1) if normalize else None
        self.encoder = nn.Sequential(nn.Linear(self.input_dim, hidden_size), resolve_activation(activation))
        self.gru = nn.GRUCell(hidden_size, hidden_size)
        self.actor = mlp(hidden_size, head_hidden, act_dim, activation, init_output_gain=POLICY_OUTPUT_GAIN)
        self.critic = mlp(hidden_size, head_hidden, 1, activation, init_output_gain=VALUE_OUTPUT_GAIN)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    @staticmethod
    def step_input(obs: Tensor, prev_action: Tensor, prev_reward: Tensor, done: Tensor) -> Tensor:
        """Concatenate obs [..., obs_dim], prev_action [..., act_dim], prev_reward [...], done [...]."""
        return torch.cat([obs, prev_action, prev_reward[..., None], done[..., None].to(obs.dtype)], dim=-1)

    def initial_hidden(self, batch_size: int) -> Tensor:
        """The trial-start hidden state: zeros [batch_size, hidden_size]."""
        return torch.zeros(batch_size, self.hidden_size)

    def _split(self, obs_input: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if obs_input.shape[-1] != self.input_dim:
            raise ValueError(f"GRUPolicy expects step inputs [..., {self.input_dim}], got {tuple(obs_input.shape)}")
        sizes = [self.obs_dim, self.act_dim, 1, 1]
        return torch.split(obs_input, sizes, dim=-1)

    def update_normalizer(self, obs_input: Tensor) -> None:
        """Merge the obs and reward columns of step inputs [..., input_dim] into the normalizer."""
        if self.normalizer is not None:
            obs, _, reward, _ = self._split(obs_input)
            self.normalizer.update(torch.cat([obs, reward], dim=-1))

    def _encode(self, obs_input: Tensor) -> Tensor:
        """Normalize obs and reward (once), then embed: [..., input_dim] -> [..., hidden_size]."""
        obs, action, reward, done = self._split(obs_input)
        scaled = torch.cat([obs, reward], dim=-1)
        if self.normalizer is not None:
            scaled = self.normalizer(scaled)
        return self.encoder(torch.cat([scaled[..., : self.obs_dim], action, scaled[..., self.obs_dim :], done], -1))

    def forward(self, obs_input: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step.

        Args:
            obs_input: [B, input_dim] raw step inputs (see the class docstring).
            hidden: [B, hidden_size] state before this step (zeros at a trial start).

        Returns:
            action_mean [B, act_dim], value [B], new_hidden [B, hidden_size].
        """
        new_hidden = self.gru(self._encode(obs_input), hidden)
        return self.actor(new_hidden), self.critic(new_hidden).squeeze(-1), new_hidden

    def clamped_log_std(self) -> Tensor:
        """log_std within LOG_STD_RANGE [act_dim], as every Gaussian policy here uses it."""
        return self.log_std.clamp(*LOG_STD_RANGE)

    @torch.no_grad()
    def act(
        self, obs_input: Tensor, hidden: Tensor, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Choose actions for one step of a batch of trials (no gradient).

        Returns:
            action [B, act_dim] (unclipped sample, or the mean), log_prob [B], value [B], new_hidden [B, H].
        """
        mean, value, new_hidden = self(obs_input, hidden)
        std = self.clamped_log_std().exp().expand_as(mean)
        action = mean if deterministic else mean + std * torch.randn(mean.shape, generator=generator)
        return action, Normal(mean, std).log_prob(action).sum(-1), value, new_hidden

    def evaluate_sequence(self, obs_inputs: Tensor, hidden: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Re-run the GRU over sequences, differentiably (the recurrent PPO `evaluate`).

        Args:
            obs_inputs: [N, T, input_dim] step inputs.
            hidden: [N, hidden_size] state before each sequence's first step.
            actions: [N, T, act_dim] actions taken.

        Returns:
            log_prob [N, T], entropy [N, T] (summed over action dims), value [N, T].
        """
        embedded = self._encode(obs_inputs)  # the non-recurrent part, batched over time
        states = []
        for t in range(embedded.shape[1]):
            hidden = self.gru(embedded[:, t], hidden)
            states.append(hidden)
        states = torch.stack(states, dim=1)
        mean = self.actor(states)
        dist = Normal(mean, self.clamped_log_std().exp().expand_as(mean))
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1), self.critic(states).squeeze(-1)

    def export_module(self) -> nn.Module:
        """A module `(obs, hidden) -> (action, hidden_out)` for ONNX (names in EXPORT_*_NAMES)."""
        return _ActorGraph(self)


class _ActorGraph(nn.Module):
    """The exported graph: deterministic action and next hidden state; the value is left out."""

    def __init__(self, policy: GRUPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        new_hidden = self.policy.gru(self.policy._encode(obs), hidden)
        return self.policy.actor(new_hidden), new_hidden


def _chunks(tensor: Tensor, length: int) -> Tensor:
    """[N, L, ...] -> [N * ceil(L / length), length, ...], zero-padded at the end of each row."""
    num_rows, num_steps = tensor.shape[:2]
    num_chunks = -(-num_steps // length)
    padded = torch.zeros(num_rows, num_chunks * length, *tensor.shape[2:], dtype=tensor.dtype)
    padded[:, :num_steps] = tensor
    return padded.reshape(num_rows * num_chunks, length, *tensor.shape[2:])


@dataclass
class RL2Config:
    """RL^2 meta-training: trials per iteration and recurrent PPO over them."""

    num_trials: int = 32
    """Trials (one task each) collected per iteration."""
    episodes_per_trial: int = 3
    """Consecutive episodes per trial; the hidden state is carried across them."""
    max_episode_steps: int = 1000
    """Cap on an episode's length (the env's own truncation usually comes first)."""
    gamma: float = 0.99
    """Discount per step, across the whole trial."""
    lam: float = 0.95
    """GAE lambda."""
    bptt_length: int | None = None
    """Truncated BPTT: split trials into chunks of this many steps, each started from the stored
    hidden state; None re-runs whole trials from the zero state."""
    update_normalizer: bool = True
    """Merge each iteration's step inputs into the normalizer after the update."""
    scale_rewards: bool = True
    """Learn on rewards divided by the running std of the discounted return-to-go, so value targets
    are O(1) whatever the reward units (the value loss would otherwise swamp the shared GRU)."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(learning_rate=1e-3, epochs=4, num_minibatches=2))
    """PPO; `num_minibatches` splits the sequences (trials or chunks), not single steps."""

    def __post_init__(self) -> None:
        for name in ("num_trials", "episodes_per_trial", "max_episode_steps"):
            check_positive_int(f"RL2Config.{name}", getattr(self, name))
        if self.bptt_length is not None:
            check_positive_int("RL2Config.bptt_length", self.bptt_length)
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"RL2Config.{name} must be a number in [0, 1], got {value!r}")
        if not isinstance(self.ppo, PPOConfig):
            raise ConfigError(f"RL2Config.ppo must be a PPOConfig, got {type(self.ppo).__name__}")


class RL2Trainer:
    """Meta-trains a `GRUPolicy` with PPO over whole trials.

    Args:
        policy: The recurrent policy.
        env_fn: Builds one env with `set_task` (reached through `get_wrapper_attr`).
        sample_tasks: (num_tasks, rng) -> tasks, e.g. a task distribution's `sample_tasks`.
        config: Hyperparameters.
        seed: Seeds task draws, env resets, action noise and minibatch shuffles (policy init is the caller's).
    """

    def __init__(
        self,
        policy: GRUPolicy,
        env_fn: Callable[[], Any],
        sample_tasks: Callable[[int, np.random.Generator], Sequence[Any]],
        config: RL2Config | None = None,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.env_fn = env_fn
        self.sample_tasks = sample_tasks
        self.config = config or RL2Config()
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=self.config.ppo.learning_rate)
        self.iteration = 0
        self.return_statistics = RunningNormalizer(1)
        self._envs: list[Any] = []

    def _get_envs(self, num_envs: int) -> list[Any]:
        while len(self._envs) < num_envs:
            self._envs.append(self.env_fn())
        return self._envs[:num_envs]

    def collect(self, tasks: Sequence[Any], num_episodes: int | None = None, deterministic: bool = False) -> Trials:
        """One trial per task with the current policy (seeds drawn from the trainer's rng)."""
        num_episodes = num_episodes or self.config.episodes_per_trial
        seeds = self.rng.integers(2**31, size=(len(tasks), num_episodes))
        envs = self._get_envs(len(tasks))
        return run_trials(
            self.policy, envs, tasks, num_episodes, seeds, self.generator, deterministic, self.config.max_episode_steps
        )

    def update(self, trials: Trials) -> dict[str, float]:
        """Recurrent PPO on a batch of trials; returns the mean minibatch statistics."""
        config = self.config
        valid = trials.mask.bool()
        reward_scale = 1.0
        if config.scale_rewards:
            # scale = 1 / running std of R_t = sum_k gamma^k r_{t+k} (to the trial's end)
            returns_to_go = discount_cumsum(trials.rewards.T, config.gamma).T
            self.return_statistics.update(returns_to_go[valid][:, None])
            reward_scale = float(1.0 / torch.sqrt(self.return_statistics.var + 1e-8))
        advantages, returns = trial_advantages(trials, config.gamma, config.lam, reward_scale)
        # Standardize once over the whole batch's real steps (the per-minibatch calls must not).
        advantages = (advantages - advantages[valid].mean()) / (advantages[valid].std(correction=0) + 1e-8)
        sequences = {"inputs": trials.inputs, "actions": trials.actions, "log_probs": trials.log_probs}
        sequences.update(advantages=advantages, returns=returns, mask=trials.mask, hidden=trials.hiddens)
        if config.bptt_length is not None:
            sequences = {key: _chunks(value, config.bptt_length) for key, value in sequences.items()}
            keep = sequences["mask"].sum(dim=1) > 0  # drop chunks made only of padding
            sequences = {key: value[keep] for key, value in sequences.items()}
        num_sequences = len(sequences["mask"])
        if num_sequences < config.ppo.num_minibatches:
            raise ValueError(f"{num_sequences} sequences cannot fill ppo.num_minibatches={config.ppo.num_minibatches}")
        # One ppo_update call per minibatch of sequences: the loss is ppo_update's, the split is ours.
        step_config = dataclasses.replace(config.ppo, epochs=1, num_minibatches=1, normalize_advantages=False)
        history: list[dict[str, float]] = []
        for _ in range(config.ppo.epochs):
            permutation = torch.randperm(num_sequences, generator=self.generator)
            for index in torch.tensor_split(permutation, config.ppo.num_minibatches):
                history.append(self._update_minibatch({k: v[index] for k, v in sequences.items()}, step_config))
                if history[-1]["num_updates"] == 0:  # the KL early stop fired
                    break
            if history[-1]["num_updates"] == 0:
                break
        if config.update_normalizer:
            self.policy.update_normalizer(trials.inputs[valid])
        summary = {key: float(np.mean([stats[key] for stats in history])) for key in history[0]}
        summary.update(num_updates=float(sum(stats["num_updates"] for stats in history)), reward_scale=reward_scale)
        del summary["epochs_run"]
        return summary

    def _update_minibatch(self, sequences: dict[str, Tensor], config: PPOConfig) -> dict[str, float]:
        rows, steps = sequences["mask"].nonzero(as_tuple=True)

        def evaluate(obs: tuple[Tensor, Tensor], actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            # Re-run the GRU over the minibatch's sequences from their stored start state, then pick the rows.
            outputs = self.policy.evaluate_sequence(
                sequences["inputs"], sequences["hidden"][:, 0], sequences["actions"]
            )
            return tuple(output[obs[0], obs[1]] for output in outputs)

        batch = {key: sequences[key][rows, steps] for key in ("actions", "log_probs", "advantages", "returns")}
        batch["obs"] = (rows, steps)
        return ppo_update(evaluate, self.policy.parameters(), self.optimizer, batch, config, self.generator)

    def step(self) -> dict[str, float]:
        """One iteration: sample tasks, collect a trial per task, update; returns statistics."""
        start = time.perf_counter()
        tasks = self.sample_tasks(self.config.num_trials, self.rng)
        trials = self.collect(tasks)
        stats = self.update(trials)
        returns = trials.episode_returns().mean(axis=0)
        self.iteration += 1
        stats.update(iteration=float(self.iteration), first_episode_return=float(returns[0]))
        stats.update(last_episode_return=float(returns[-1]), seconds=time.perf_counter() - start)
        logger.debug("rl2 iteration %s", stats)
        return stats

    def train(self, num_iterations: int) -> list[dict[str, float]]:
        """Run `num_iterations` iterations; one statistics dict each."""
        return [self.step() for _ in range(num_iterations)]

    def evaluate(self, tasks: Sequence[Any], num_episodes: int | None = None, seed: int = 0) -> np.ndarray:
        """Meta-test with the deterministic policy: `meta_test` on the trainer's envs (its rng untouched)."""
        num_episodes = num_episodes or self.config.episodes_per_trial
        envs = self._get_envs(len(tasks))
        return meta_test(self.policy, envs, tasks, num_episodes, seed, self.config.max_episode_steps)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: policy, optimizer, iteration and both random sources."""
        return {
            "policy_config": dict(self.policy.config),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
            "return_statistics": self.return_statistics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
        self.return_statistics.load_state_dict(state["return_statistics"])

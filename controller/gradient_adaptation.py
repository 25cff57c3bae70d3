"""The test-time inner step of the gradient-based meta-learners (MAML, Meta-SGD, learned optimizer),
shared by the robot adapter (deploy/adapt_gradient.py, `metactl adapt`) and the simulated meta-test
(sim/evaluation.py, `metactl eval`), so both take exactly the same step on the same kind of episodes.

The step is the trainer's inner loop (`MetaLearner.clone().adapt` on `controller.meta_episodes.inner_loss`),
first order: no meta-gradient is needed at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from controller.adaptation import Episode
from controller.maml import AdaptedModule, MetaLearner
from controller.meta_episodes import Episodes, inner_advantages, inner_loss, policy_log_probs
from controller.meta_trainer import MAMLConfig


def episodes_to_batch(episodes: Sequence[Episode]) -> Episodes:
    """Robot episodes -> `Episodes` padded to the longest (mask 0 after each ends); log_probs unset (zeros)."""
    if not episodes or any(episode.length == 0 for episode in episodes):
        raise ValueError("episodes_to_batch needs at least one episode, each with at least one step")
    num_steps = max(episode.length for episode in episodes)
    obs_dim, act_dim = len(episodes[0].obs[0]), len(episodes[0].actions[0])
    obs = np.zeros((len(episodes), num_steps, obs_dim), np.float32)
    actions = np.zeros((len(episodes), num_steps, act_dim), np.float32)
    rewards, mask = np.zeros((len(episodes), num_steps), np.float32), np.zeros((len(episodes), num_steps), np.float32)
    for i, episode in enumerate(episodes):
        length = episode.length
        obs[i, :length], actions[i, :length] = np.asarray(episode.obs), np.asarray(episode.actions)
        rewards[i, :length], mask[i, :length] = episode.rewards, 1.0
    tensors = [torch.as_tensor(array) for array in (obs, actions, rewards)]
    return Episodes(*tensors, log_probs=torch.zeros(len(episodes), num_steps), mask=torch.as_tensor(mask))


def adapt_fast_weights(
    learner: MetaLearner,
    fast: dict[str, Tensor],
    rule_state: dict[str, Tensor] | None,
    episodes: Sequence[Episode],
    config: MAMLConfig,
    num_steps: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict[str, float]]:
    """Inner step(s) of the learner's update rule from `fast` on episodes sampled by the policy with `fast`.

    Args:
        learner: The meta-learner (its meta-parameters: update rule, normalizer, non-adapted weights).
        fast: The sampling policy's adapted parameters, name -> tensor.
        rule_state: The update rule's state after earlier steps (None: its initial state).
        episodes: Episodes sampled with the policy at `fast` (actions as sampled, before clipping).
        config: Inner-loss settings (gamma, baseline, DiCE lambda, advantage standardization).
        num_steps: Inner steps on these episodes; None: `config.num_inner_steps`. A later step reuses
            the episodes with DiCE's importance weights against the sampling policy.

    Returns:
        New fast weights, new rule state and statistics (inner loss before/after, mean return).
    """
    num_steps = config.num_inner_steps if num_steps is None else num_steps
    params = {name: value.detach().clone() for name, value in fast.items()}
    state = learner.initial_state(params) if rule_state is None else rule_state
    clone = AdaptedModule(learner, params, state).detach()
    batch = episodes_to_batch(episodes)
    with torch.no_grad():
        batch.log_probs = policy_log_probs(clone, batch)  # the sampling policy's, for DiCE
    inner_advantages(batch, config)
    losses = []
    for _ in range(num_steps):
        loss = inner_loss(clone, batch, config)
        losses.append(loss.item())
        clone.adapt(loss, first_order=True)  # no meta-gradient at test time
        clone = clone.detach()
    with torch.no_grad():
        losses.append(inner_loss(clone, batch, config).item())
    stats = {"inner_loss_before": losses[0], "inner_loss_after": losses[-1], "inner_steps": float(num_steps)}
    stats["mean_return"] = float(batch.episode_returns().mean())
    fast_out = {name: value.detach() for name, value in clone.params.items()}
    state_out = None if clone.state is None else {name: value.detach() for name, value in clone.state.items()}
    return fast_out, state_out, stats

"""`update_master` for a fresh master: the "episodes" baseline by hand, and a normalizer left alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controller.adaptation import AdaptConfig, Episode, macro_batch, update_master
from controller.errors import ConfigError
from controller.mlsh_policy import MLSHPolicy


def _episode(rewards: list[float], options: list[int], macro_steps: int = 2) -> Episode:
    episode = Episode()
    for t, reward in enumerate(rewards):
        episode.obs.append(np.full(3, float(t), np.float32))
        episode.actions.append(np.zeros(2, np.float32))
        episode.options.append(options[t // macro_steps])
        episode.chose.append(t % macro_steps == 0)
        episode.logits.append(np.zeros(2, np.float32))
        episode.rewards.append(reward)
    return episode


def test_episodes_baseline_by_hand():
    policy = MLSHPolicy(3, 2, num_subpolicies=2, macro_steps=2)
    # Macro rewards: episode a [1 + 1, 0 + 2] = [2, 2]; episode b [-1 + 0, 1 + 1] = [-1, 2]; episode c [4].
    episodes = [_episode([1, 1, 0, 2], [0, 1]), _episode([-1, 0, 1, 1], [1, 1]), _episode([4, 0], [0])]
    batch = macro_batch(policy, episodes, AdaptConfig(baseline="episodes", gamma=0.5))
    # Returns-to-go (gamma 0.5): a [2 + 0.5 * 2, 2] = [3, 2]; b [-1 + 1, 2] = [0, 2]; c [4].
    torch.testing.assert_close(batch["returns"], torch.tensor([3.0, 2.0, 0.0, 2.0, 4.0]))
    # Means per decision index: index 0 over a, b, c = 7 / 3; index 1 over a, b = 2.
    want = torch.tensor([3 - 7 / 3, 0.0, 0 - 7 / 3, 0.0, 4 - 7 / 3])
    torch.testing.assert_close(batch["advantages"], want)
    torch.testing.assert_close(batch["actions"], torch.tensor([0, 1, 1, 1, 0]))
    with pytest.raises(ConfigError, match="baseline 'mean' unknown; valid: critic, episodes"):
        AdaptConfig(baseline="mean")


def test_update_without_normalizer_leaves_it_and_prefers_the_better_option():
    torch.manual_seed(0)
    policy = MLSHPolicy(3, 2, num_subpolicies=2, macro_steps=2)
    before = {key: value.clone() for key, value in policy.master.normalizer.state_dict().items()}
    # Option 1 at the first decision pays more; the second decision's option does not matter.
    episodes = [_episode([0, 0, 0, 0], [0, 0]), _episode([5, 5, 0, 0], [1, 0]), _episode([0, 0, 0, 0], [0, 1])]
    episodes += [_episode([5, 5, 0, 0], [1, 1])]
    update_master(policy, episodes, AdaptConfig(baseline="episodes", update_normalizer=False))
    for key, value in policy.master.normalizer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        probs = policy.master.distribution(torch.as_tensor(episodes[0].obs[0])).probs
    assert probs[1] > 0.6

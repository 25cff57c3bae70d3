"""The runtime carries an RL^2 policy's hidden state across the episodes of a trial, as torch does."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from controller.rl2 import EXPORT_INPUT_NAMES, EXPORT_OUTPUT_NAMES, GRUPolicy
from deploy.errors import BundleError
from deploy.runtime import RecurrentRuntime
from sim.fast_tasks import PointNavEnv, PointNavTask


def export(policy: GRUPolicy, path) -> None:
    batch = torch.export.Dim("batch")
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            policy.export_module(),
            (torch.zeros(2, policy.input_dim), policy.initial_hidden(2)),
            None,
            dynamo=True,
            external_data=False,
            input_names=list(EXPORT_INPUT_NAMES),
            output_names=list(EXPORT_OUTPUT_NAMES),
            dynamic_shapes={"obs": {0: batch}, "hidden": {0: batch}},
        )
    path.write_bytes(program.model_proto.SerializeToString())


def test_hidden_state_carries_across_episodes_like_torch(tmp_path) -> None:
    torch.manual_seed(3)
    policy = GRUPolicy(4, 2, hidden_size=16).eval()
    policy.update_normalizer(torch.randn(100, policy.input_dim) * 2.0 + 1.0)
    export(policy, tmp_path / "rl2.onnx")
    runtime = RecurrentRuntime(tmp_path / "rl2.onnx", obs_dim=4)
    assert (runtime.act_dim, runtime.hidden_size) == (2, 16)

    env = PointNavEnv(PointNavTask(0.3, 0.9, 2.0))
    hidden = policy.initial_hidden(1)
    runtime.reset_trial()
    for episode in range(2):
        obs, _ = env.reset(seed=episode)
        runtime.start_episode()
        action_prev, reward, done = torch.zeros(1, 2), torch.zeros(1), torch.tensor([float(episode > 0)])
        if episode == 1:
            assert np.abs(runtime.hidden).sum() > 0  # memory kept from the first episode
        for step in range(10):
            step_input = policy.step_input(torch.as_tensor(obs)[None], action_prev, reward, done)
            with torch.no_grad():
                mean, _, hidden = policy(step_input, hidden)
            action = runtime.act(obs, None if step == 0 else float(reward))
            np.testing.assert_allclose(action, mean[0].numpy(), atol=1e-5)
            np.testing.assert_allclose(runtime.hidden, hidden.numpy(), atol=1e-5)
            action_prev = torch.clamp(mean, -1, 1)
            obs, r, _, _, _ = env.step(action_prev[0].numpy())
            reward, done = torch.tensor([float(r)]), torch.zeros(1)
    runtime.reset_trial()
    assert not runtime.hidden.any()


def test_a_feedforward_graph_is_refused(tiny_bundle) -> None:
    with pytest.raises(BundleError, match="recurrent policy needs inputs"):
        RecurrentRuntime(tiny_bundle / "policy.onnx", obs_dim=47)

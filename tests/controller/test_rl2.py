"""RL^2 (controller/rl2.py, controller/rl2_rollout.py): trials, trial-long GAE, recurrent PPO, ONNX export,
adaptation within a trial."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import onnxruntime
import pytest
import torch

from controller.errors import ConfigError
from controller.policies import LOG_STD_RANGE
from controller.ppo import PPOConfig
from controller.rl2 import EXPORT_INPUT_NAMES, EXPORT_OUTPUT_NAMES, GRUPolicy, RL2Config, RL2Trainer
from controller.rl2_rollout import Trials, run_trials, trial_advantages
from sim.fast_tasks import PointNavEnv, PointNavTask, PointNavTaskDistribution

torch.set_num_threads(1)


def _short_env() -> PointNavEnv:
    return PointNavEnv(max_episode_steps=5)


def _trials(policy: GRUPolicy, num_trials: int = 3, num_episodes: int = 2) -> Trials:
    tasks = PointNavTaskDistribution().sample_tasks(num_trials, np.random.default_rng(0))
    seeds = np.arange(num_trials * num_episodes).reshape(num_trials, num_episodes)
    envs = [_short_env() for _ in range(num_trials)]
    return run_trials(policy, envs, tasks, num_episodes, seeds, torch.Generator().manual_seed(0))


def test_trials_carry_hidden_state_and_previous_step_across_episodes():
    torch.manual_seed(0)
    policy = GRUPolicy(4, 2, hidden_size=8)
    trials = _trials(policy)
    assert trials.inputs.shape == (3, 10, 4 + 2 + 2) and trials.hiddens.shape == (3, 10, 8)
    assert trials.mask.all() and trials.episode_index[0].tolist() == [0] * 5 + [1] * 5
    # Trial start: zero state, zero previous action/reward/flag. Step 5 is episode 2's first step.
    assert not trials.hiddens[:, 0].any() and not trials.inputs[:, 0, 4:].any()
    assert trials.hiddens[:, 5].abs().min() > 0  # carried, not reset
    assert (trials.inputs[:, 5, -1] == 1).all() and (trials.inputs[:, [1, 2, 3, 4, 6], -1] == 0).all()
    np.testing.assert_allclose(trials.inputs[:, 5, 6], trials.rewards[:, 4])  # previous reward
    np.testing.assert_allclose(trials.inputs[:, 5, 4:6], trials.actions[:, 4].clamp(-1, 1))  # executed action
    assert trials.episode_returns().shape == (3, 2)
    np.testing.assert_allclose(trials.episode_returns().sum(axis=1), trials.rewards.sum(dim=1), rtol=1e-5)


def test_rerunning_the_gru_reproduces_the_rollout_whole_and_in_chunks():
    torch.manual_seed(1)
    policy = GRUPolicy(4, 2, hidden_size=8)
    policy.update_normalizer(torch.randn(50, policy.input_dim) * 3.0)  # a non-trivial normalizer
    trials = _trials(policy)
    log_prob, _, value = policy.evaluate_sequence(trials.inputs, trials.hiddens[:, 0], trials.actions)
    torch.testing.assert_close(log_prob, trials.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value, trials.values, atol=1e-5, rtol=1e-5)
    # Truncated BPTT: a chunk started from the stored hidden state continues the same computation.
    chunk = slice(3, 7)
    log_prob, _, value = policy.evaluate_sequence(
        trials.inputs[:, chunk], trials.hiddens[:, chunk.start], trials.actions[:, chunk]
    )
    torch.testing.assert_close(log_prob, trials.log_probs[:, chunk], atol=1e-5, rtol=1e-5)


def test_trial_advantages_by_hand():
    # One trial of two episodes (lengths 2 and 1) and one step of padding.
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    zeros = torch.zeros(1, 4)
    trials = Trials(zeros, zeros, zeros, zeros, values, rewards, mask, torch.tensor([[0, 0, 1, -1]]), 2)
    # lam = 1: A_t = G_t - V_t with the return over the whole trial (no cut at the episode end):
    # G_2 = 3, G_1 = 2 + 0.5 * 3 = 3.5, G_0 = 1 + 0.5 * 3.5 = 2.75.
    advantages, returns = trial_advantages(trials, gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[2.25, 3.0, 2.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.75, 3.5, 3.0, 0.0]]))
    # lam = 0: A_t = r_t + gamma * V_{t+1} - V_t, terminal only at the trial's last step; scaled rewards.
    advantages, _ = trial_advantages(trials, gamma=0.5, lam=0.0, reward_scale=2.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.75, 3.75, 5.5, 0.0]]))


def test_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="bptt_length"):
        RL2Config(bptt_length=0)
    with pytest.raises(ConfigError, match="gamma"):
        RL2Config(gamma=1.5)
    with pytest.raises(ValueError, match="step inputs"):
        GRUPolicy(4, 2)(torch.zeros(1, 4), torch.zeros(1, 64))


@pytest.mark.parametrize("bptt_length", [None, 4])
def test_update_runs_and_resumes_bit_for_bit(bptt_length):
    config = RL2Config(num_trials=4, episodes_per_trial=2, bptt_length=bptt_length, ppo=PPOConfig(num_minibatches=2))

    def trainer() -> RL2Trainer:
        torch.manual_seed(0)
        return RL2Trainer(GRUPolicy(4, 2, hidden_size=8), _short_env, PointNavTaskDistribution().sample_tasks, config)

    straight = trainer()
    stats = straight.train(2)
    assert stats[-1]["num_updates"] > 0 and np.isfinite(stats[-1]["value_loss"])
    first = trainer()
    first.train(1)
    resumed = trainer()
    resumed.load_state_dict(first.state_dict())
    resumed.train(1)
    for name, value in straight.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[name], value, rtol=0, atol=0)


def test_onnx_export_matches_torch_over_a_20_step_sequence(tmp_path):
    torch.manual_seed(2)
    policy = GRUPolicy(4, 2, hidden_size=16).eval()
    policy.update_normalizer(torch.randn(100, policy.input_dim) * 2.0 + 1.0)
    graph = policy.export_module()
    batch = torch.export.Dim("batch")
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (torch.zeros(2, policy.input_dim), policy.initial_hidden(2)),
            None,
            dynamo=True,
            external_data=False,
            input_names=list(EXPORT_INPUT_NAMES),
            output_names=list(EXPORT_OUTPUT_NAMES),
            dynamic_shapes={"obs": {0: batch}, "hidden": {0: batch}},
        )
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    assert [i.name for i in session.get_inputs()] == ["obs", "hidden"]
    assert [o.name for o in session.get_outputs()] == ["action", "hidden_out"]
    env = PointNavEnv(PointNavTask(0.3, 0.9, 2.0))
    obs, _ = env.reset(seed=0)
    hidden_torch, hidden_onnx = policy.initial_hidden(1), policy.initial_hidden(1).numpy()
    action, reward, done = np.zeros(2, np.float32), 0.0, 0.0
    for step in range(20):
        if step == 10:  # an episode boundary inside the sequence
            obs, _ = env.reset(seed=1)
            done = 1.0
        step_input = policy.step_input(
            torch.as_tensor(obs)[None], torch.as_tensor(action)[None], torch.tensor([reward]), torch.tensor([done])
        )
        with torch.no_grad():
            mean, _, hidden_torch = policy(step_input, hidden_torch)
        action_onnx, hidden_onnx = session.run(None, {"obs": step_input.numpy(), "hidden": hidden_onnx})
        np.testing.assert_allclose(action_onnx, mean.numpy(), atol=1e-5)
        np.testing.assert_allclose(hidden_onnx, hidden_torch.numpy(), atol=1e-5)
        action = np.clip(mean[0].numpy(), -1, 1)
        obs, reward, _, _, _ = env.step(action)
        done = 0.0


@pytest.mark.slow
def test_later_episodes_of_a_trial_beat_the_first_on_held_out_tasks():
    """Adaptation within a trial, compared with the spread over 3 training seeds."""
    distribution = PointNavTaskDistribution()
    held_out = distribution.sample_tasks(32, np.random.default_rng(1234))
    ppo = PPOConfig(learning_rate=5e-3, epochs=4, num_minibatches=2, target_kl=None)
    config = RL2Config(num_trials=32, episodes_per_trial=3, ppo=ppo)
    first, later = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        trainer = RL2Trainer(GRUPolicy(4, 2), PointNavEnv, distribution.sample_tasks, config, seed=seed)
        trainer.train(45)
        returns = trainer.evaluate(held_out, seed=99)  # [32 tasks, 3 episodes], deterministic
        first.append(returns[:, 0].mean())
        later.append(returns[:, 1:].mean())
    first, later = np.array(first), np.array(later)
    gaps = later - first
    spread = max(np.ptp(first), np.ptp(later))
    # One-sided paired t-test over seeds: t = mean(gap) / (sd(gap) / sqrt(3)), critical t(0.95, df=2) = 2.920.
    t_statistic = gaps.mean() / (gaps.std(ddof=1) / np.sqrt(len(gaps)) + 1e-12)
    report = (
        f"first-episode {first.round(2)}, later episodes {later.round(2)}, spread {spread:.2f}, t {t_statistic:.1f}"
    )
    assert gaps.min() > 0, report
    assert gaps.mean() > spread, report
    assert t_statistic > 2.920, report


def test_a_drifted_log_std_is_clamped_when_acting_and_evaluating():
    torch.manual_seed(0)
    policy = GRUPolicy(4, 2, hidden_size=8)
    low, high = LOG_STD_RANGE
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-1e6, 1e6]))
    inputs, hidden = torch.randn(3, 5, policy.input_dim), policy.initial_hidden(3)
    action, log_prob, _, _ = policy.act(inputs[:, 0], hidden, generator=torch.Generator().manual_seed(0))
    mean = policy(inputs[:, 0], hidden)[0]
    noise = (action - mean) / torch.tensor([low, high]).exp()
    assert torch.isfinite(log_prob).all() and noise.abs().max() < 10  # a standard normal draw at the bounds' std
    log_prob, entropy, _ = policy.evaluate_sequence(inputs, hidden, torch.randn(3, 5, 2))
    assert torch.isfinite(log_prob).all()
    torch.testing.assert_close(entropy, torch.full((3, 5), 1.0 + math.log(2 * math.pi) + low + high))

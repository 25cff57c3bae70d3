"""Learned updaters (controller/learned_update.py): Meta-SGD and the coordinate-wise GRU optimizer,
on hand-computed updates, an MLSH master, finite differences, and meta-training on the point task."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from controller.errors import ConfigError
from controller.learned_update import LearnedOptimizer, LearnedOptimizerMAML, MetaSGD, preprocess_gradients
from controller.meta_trainer import MAMLConfig
from controller.mlsh_policy import MLSHPolicy
from tests.controller.test_maml import _actor_names, assert_adaptation_helps, meta_train_and_evaluate

torch.set_num_threads(1)
DOUBLE = torch.float64


class Vector(nn.Module):
    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values, dtype=DOUBLE))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.w * c).sum()


# -- Meta-SGD ------------------------------------------------------------------------------------------


def test_meta_sgd_update_and_step_size_meta_gradient_by_hand():
    module = Vector([1.0, 2.0])
    learner = MetaSGD(module, step_size=0.5)
    c = torch.tensor([3.0, -1.0], dtype=DOUBLE)
    clone = learner.clone()
    clone.adapt(clone(c))  # gradient of w . c is c
    torch.testing.assert_close(clone.params["w"], torch.tensor([1.0 - 1.5, 2.0 + 0.5], dtype=DOUBLE))
    with torch.no_grad():
        learner.log_step_sizes[0].copy_(torch.log(torch.tensor([0.1, 0.2], dtype=DOUBLE)))
    clone = learner.clone()
    clone.adapt(clone(c))
    adapted = clone.params["w"]  # w' = w - alpha * c = [0.7, 2.2]
    torch.testing.assert_close(adapted, torch.tensor([0.7, 2.2], dtype=DOUBLE))
    # J = sum(w'^2): dJ/dlog(alpha_i) = alpha_i * (-2 w'_i c_i) = [0.1 * -4.2, 0.2 * 4.4]
    adapted.square().sum().backward()
    torch.testing.assert_close(learner.log_step_sizes[0].grad, torch.tensor([-0.42, 0.88], dtype=DOUBLE))
    # and dJ/dw = 2 w' (d w'/d w = I: the loss is linear in w)
    torch.testing.assert_close(module.w.grad, torch.tensor([1.4, 4.4], dtype=DOUBLE))
    assert set(learner.step_sizes()) == {"w"}
    with pytest.raises(ConfigError, match="step_size"):
        MetaSGD(module, step_size=-0.1)


# -- Learned optimizer -----------------------------------------------------------------------------------


def test_preprocess_gradients_by_hand():
    grads = torch.tensor([1.0, -math.exp(-5.0), 0.0, 1e-6], dtype=DOUBLE, requires_grad=True)
    features = preprocess_gradients(grads, scale=10.0)
    expected = torch.tensor(
        [[0.0, 1.0], [-0.5, -1.0], [-1.0, 0.0], [-1.0, 1e-6 * math.exp(10.0)]],
        dtype=DOUBLE,
    )
    torch.testing.assert_close(features, expected)
    # Second-order meta-gradients flow through the features: finite everywhere, including at 0.
    (grad,) = torch.autograd.grad(features.sum(), grads)
    assert torch.isfinite(grad).all()


def test_learned_optimizer_starts_as_sgd_then_uses_its_state():
    optimizer = LearnedOptimizer(hidden_size=4, step_size=0.1).double()
    params = {"a": torch.ones(2, 3, dtype=DOUBLE), "b": torch.zeros(4, dtype=DOUBLE)}
    grads = {"a": torch.full((2, 3), 0.5, dtype=DOUBLE), "b": None}
    state = optimizer.initial_state(params)
    assert state["a"].shape == (6, 4) and state["b"].shape == (4, 4)
    new_params, new_state = optimizer(params, grads, state)
    torch.testing.assert_close(new_params["a"], torch.full((2, 3), 0.95, dtype=DOUBLE))  # zero read-out: SGD
    assert new_params["b"] is params["b"] and new_state["b"] is state["b"]  # no gradient: untouched
    assert not torch.equal(new_state["a"], state["a"])  # the GRU state moved
    with torch.no_grad():
        optimizer.head.weight.fill_(1.0)
    first, state_1 = optimizer(params, grads, state)
    second, _ = optimizer(params, grads, state_1)
    assert not torch.allclose(first["a"], new_params["a"])  # the learned part acts
    assert not torch.allclose(first["a"], second["a"])  # same gradient, different state: different update
    with pytest.raises(ValueError, match="no gradient or state entry"):
        optimizer(params, {"a": grads["a"]}, state)
    with pytest.raises(ConfigError, match="hidden_size"):
        LearnedOptimizer(hidden_size=0)


def test_meta_gradient_through_unrolled_steps_matches_finite_differences():
    """J(phi) = L(theta_3), theta_{k+1} = f_phi(theta_k, grad L(theta_k), h_k), on a quadratic L."""
    torch.manual_seed(0)
    optimizer = LearnedOptimizer(hidden_size=3, step_size=0.2, output_scale=0.5).double()
    with torch.no_grad():
        optimizer.head.weight.normal_()
    target = torch.tensor([1.0, -2.0, 0.5], dtype=DOUBLE)
    curvature = torch.tensor([1.0, 0.3, 2.0], dtype=DOUBLE)

    def post_update_loss() -> torch.Tensor:
        params = {"theta": torch.zeros(3, dtype=DOUBLE, requires_grad=True)}
        state = optimizer.initial_state(params)
        for _ in range(3):
            loss = (curvature * (params["theta"] - target).square()).sum()
            (grad,) = torch.autograd.grad(loss, params["theta"], create_graph=True)
            params, state = optimizer(params, {"theta": grad}, state)
        return (curvature * (params["theta"] - target).square()).sum()

    named = dict(optimizer.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(post_update_loss(), list(named.values()))))
    eps = 1e-6
    for name, index in [("log_step_size", ()), ("head.weight", (0, 1)), ("cell.weight_ih", (2, 0))]:
        param = named[name]
        param.data[index] += eps  # .data: the loss itself needs autograd for its inner gradients
        plus = post_update_loss().item()
        param.data[index] -= 2 * eps
        minus = post_update_loss().item()
        param.data[index] += eps
        assert grads[name][index].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-8), name


def test_learned_optimizer_adapts_only_the_mlsh_master():
    torch.manual_seed(0)
    mlsh = MLSHPolicy(obs_dim=6, act_dim=3, num_subpolicies=3, sub_hidden=(16,), master_hidden=(8,))
    master_names = [name for name, _ in mlsh.named_parameters() if name.startswith("master.")]
    learner = LearnedOptimizerMAML(mlsh, LearnedOptimizer(hidden_size=8, step_size=0.5), parameter_names=master_names)
    with torch.no_grad():  # a non-zero read-out, as after some meta-training (at zero the GRU gets no gradient)
        learner.optimizer.head.weight.normal_(0.0, 0.1)
    before = {name: value.clone() for name, value in mlsh.state_dict().items()}
    obs = torch.randn(32, 6)
    options = torch.randint(3, (32,))

    def master_loss(clone) -> torch.Tensor:
        logits, _ = clone(obs)
        return nn.functional.cross_entropy(logits, options)

    clone = learner.clone()
    logits_before, subs_before = clone(obs)
    initial_loss = master_loss(clone)
    for _ in range(2):
        clone.adapt(master_loss(clone))
    assert list(clone.params) == master_names
    assert all(clone.params[name].shape == mlsh.get_parameter(name).shape for name in master_names)
    changed = {name for name in master_names if not torch.equal(clone.params[name], mlsh.get_parameter(name))}
    assert changed == {name for name in master_names if name.startswith("master.actor.")}  # the critic has no gradient
    logits_after, subs_after = clone(obs)
    torch.testing.assert_close(subs_after, subs_before)  # sub-policies untouched
    assert not torch.allclose(logits_after, logits_before)
    final_loss = master_loss(clone)
    assert final_loss < initial_loss
    # The meta-gradient reaches the learned optimizer and the master's initialization, never the sub-policies.
    final_loss.backward()
    assert learner.optimizer.head.weight.grad.abs().sum() > 0
    assert learner.optimizer.cell.weight_ih.grad.abs().sum() > 0
    assert mlsh.master.actor[0].weight.grad.abs().sum() > 0
    assert all(param.grad is None for param in mlsh.subpolicies.parameters())
    for name, value in mlsh.state_dict().items():
        torch.testing.assert_close(value, before[name])  # adaptation is functional: the module is unchanged
    # The optimizer alone applies to a plain parameter dict of the master.
    params = dict(mlsh.master.named_parameters())
    loss = nn.functional.cross_entropy(mlsh.master(obs), options)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    new_params, state = learner.optimizer(params, grads, learner.optimizer.initial_state(params))
    assert {name: value.shape for name, value in new_params.items()} == {n: v.shape for n, v in params.items()}
    assert nn.functional.cross_entropy(torch.func.functional_call(mlsh.master, new_params, (obs,)), options) < loss
    assert all(state[name].shape == (params[name].numel(), 8) for name in params)


# -- Meta-training on the point task ------------------------------------------------------------------


def test_meta_sgd_meta_training_improves_adaptation_on_held_out_point_tasks():
    config = MAMLConfig(
        meta_batch_size=8, episodes_per_task=10, outer_learning_rate=3e-3, rule_learning_rate=3e-2, outer_steps=3
    )
    results = meta_train_and_evaluate(
        lambda policy: MetaSGD(policy, 0.02, parameter_names=_actor_names(policy)), config, 15
    )
    assert_adaptation_helps(results)


def test_learned_optimizer_meta_training_improves_two_step_adaptation():
    config = MAMLConfig(
        meta_batch_size=6,
        episodes_per_task=10,
        num_inner_steps=2,
        outer_learning_rate=3e-3,
        rule_learning_rate=1e-2,
        outer_steps=3,
    )

    def make(policy: nn.Module) -> LearnedOptimizerMAML:
        return LearnedOptimizerMAML(policy, LearnedOptimizer(step_size=0.01), parameter_names=_actor_names(policy))

    results = meta_train_and_evaluate(make, config, 10)
    assert_adaptation_helps(results)

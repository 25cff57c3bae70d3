"""MAML (controller/maml.py): the pure update, the DiCE meta-gradient against finite differences of
exact expected returns, rollouts, and meta-training on the point task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from controller.errors import ConfigError
from controller.maml import MAML, dice_objective, magic_box, maml_update
from controller.meta_episodes import discounted_returns, fit_linear_baseline, rollout
from controller.meta_trainer import MAMLConfig, MAMLTrainer
from controller.policies import GaussianMLPPolicy
from sim.fast_tasks import PointNavEnv, PointNavTaskDistribution

torch.set_num_threads(1)
DOUBLE = torch.float64


# -- Pure pieces ------------------------------------------------------------------------------------


def test_maml_update_by_hand():
    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}
    updated = maml_update(params, {"w": torch.tensor([0.5, -1.0]), "b": None}, 0.1)
    torch.testing.assert_close(updated["w"], torch.tensor([0.95, 2.1]))
    assert updated["b"] is params["b"]  # no gradient: unchanged
    torch.testing.assert_close(params["w"], torch.tensor([1.0, 2.0]))  # pure: the input is untouched
    per_name = maml_update(params, [torch.ones(2), torch.ones(1)], {"w": torch.tensor([0.1, 0.2]), "b": 2.0})
    torch.testing.assert_close(per_name["w"], torch.tensor([0.9, 1.8]))
    torch.testing.assert_close(per_name["b"], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="1 gradients for 2 parameters"):
        maml_update(params, [torch.ones(2)], 0.1)
    with pytest.raises(ValueError, match="no gradient entry"):
        maml_update(params, {"w": torch.ones(2)}, 0.1)


def test_magic_box_is_one_with_itself_as_every_derivative():
    x = torch.tensor(0.7, dtype=DOUBLE, requires_grad=True)
    box = magic_box(3.0 * x)
    (first,) = torch.autograd.grad(box, x, create_graph=True)
    (second,) = torch.autograd.grad(first, x)
    assert box.item() == 1.0 and first.item() == pytest.approx(3.0) and second.item() == pytest.approx(9.0)


def test_dice_objective_gradient_is_the_policy_gradient():
    # log pi_t = c_t * theta: the gradient is mean_n sum_t c_nt A_nt = ((1*2 + 3*-1) + (0.5*4 + 0*1)) / 2 = 0.5.
    theta = torch.tensor(0.2, dtype=DOUBLE, requires_grad=True)
    coefficients = torch.tensor([[1.0, 3.0], [0.5, 0.0]], dtype=DOUBLE)
    advantages = torch.tensor([[2.0, -1.0], [4.0, 1.0]], dtype=DOUBLE)
    objective = dice_objective(coefficients * theta, advantages)
    assert objective.item() == 0.0  # the surrogate's value carries no information, only its derivatives
    (grad,) = torch.autograd.grad(objective, theta)
    assert grad.item() == pytest.approx(0.5)
    # Padding (mask 0) contributes nothing.
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=DOUBLE)
    (masked,) = torch.autograd.grad(dice_objective(coefficients * theta, advantages, mask), theta)
    assert masked.item() == pytest.approx((2.0 + 2.0) / 2)
    with pytest.raises(ValueError, match="one shape"):
        dice_objective(coefficients * theta, advantages[:, :1])
    with pytest.raises(ValueError, match="lam"):
        dice_objective(coefficients * theta, advantages, lam=1.5)


# -- The meta-gradient against finite differences -----------------------------------------------------


class TwoStepPolicy(nn.Module):
    """Tabular two-step policy: a1 ~ softmax(first), a2 ~ softmax(second[a1])."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.tensor([0.3, -0.2], dtype=DOUBLE))
        self.second = nn.Parameter(torch.tensor([[0.1, 0.5], [-0.4, 0.2]], dtype=DOUBLE))

    def log_probs(self, first_actions: torch.Tensor, second_actions: torch.Tensor) -> torch.Tensor:
        first = torch.log_softmax(self.first, -1)[first_actions]
        second = torch.log_softmax(self.second, -1)[first_actions, second_actions]
        return torch.stack([first, second], dim=1)


FIRST_REWARD = torch.tensor([1.0, 0.0], dtype=DOUBLE)
SECOND_REWARD = torch.tensor([[0.0, 2.0], [1.0, -1.0]], dtype=DOUBLE)
FIRST_ACTIONS = torch.tensor([0, 0, 1, 1])  # all four trajectories
SECOND_ACTIONS = torch.tensor([0, 1, 0, 1])
STEP_SIZE = 0.5


def expected_return(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """J = sum_{a1, a2} p(a1) p(a2 | a1) (r1(a1) + r2(a1, a2)), exactly."""
    p_first = torch.softmax(first, -1)
    p_second = torch.softmax(second, -1)
    return (p_first[:, None] * p_second * (FIRST_REWARD[:, None] + SECOND_REWARD)).sum()


def post_update_return(flat: torch.Tensor) -> torch.Tensor:
    """J(theta + alpha * grad J(theta)) for flat theta = [first (2), second (4)], exactly."""
    first = flat[:2].clone().requires_grad_(True)
    second = flat[2:].reshape(2, 2).clone().requires_grad_(True)
    grad_first, grad_second = torch.autograd.grad(expected_return(first, second), [first, second])
    return expected_return(first + STEP_SIZE * grad_first, second + STEP_SIZE * grad_second)


def finite_difference_meta_gradient(policy: TwoStepPolicy, eps: float = 1e-6) -> torch.Tensor:
    flat = torch.cat([policy.first.detach(), policy.second.detach().reshape(-1)])
    grad = torch.zeros_like(flat)
    for i in range(len(flat)):
        offset = torch.zeros_like(flat)
        offset[i] = eps
        grad[i] = (post_update_return(flat + offset) - post_update_return(flat - offset)) / (2 * eps)
    return grad


def meta_gradient(policy: TwoStepPolicy, inner_objective: str, first_order: bool = False) -> torch.Tensor:
    """The meta-gradient through one adapt() on an exact enumeration of the pre-update trajectories."""
    learner = MAML(policy, step_size=STEP_SIZE, first_order=first_order)
    clone = learner.clone()
    log_probs = clone.call("log_probs", FIRST_ACTIONS, SECOND_ACTIONS)  # [4, 2]
    probabilities = log_probs.sum(dim=1).exp().detach()  # exact trajectory probabilities as episode weights
    second = SECOND_REWARD[FIRST_ACTIONS, SECOND_ACTIONS]
    reward_to_go = torch.stack([FIRST_REWARD[FIRST_ACTIONS] + second, second], dim=1)
    # Any baseline that does not depend on the step's own action: constant at t=1, a function of a1 at t=2.
    baseline = torch.stack(
        [torch.full((4,), 0.7, dtype=DOUBLE), torch.tensor([0.4, -0.6], dtype=DOUBLE)[FIRST_ACTIONS]], 1
    )
    advantages = reward_to_go - baseline
    if inner_objective == "dice":
        objective = dice_objective(log_probs, advantages, weights=probabilities)
    elif inner_objective == "dice_lam0":
        objective = dice_objective(log_probs, advantages, lam=0.0, weights=probabilities)
    else:  # the naive surrogate sum_t log pi_t * A_t: right gradient, wrong Hessian
        objective = (probabilities * (log_probs * advantages).sum(dim=1)).sum()
    clone.adapt(-objective)
    post = expected_return(clone.params["first"], clone.params["second"])
    grads = torch.autograd.grad(post, [policy.first, policy.second])
    return torch.cat([grads[0], grads[1].reshape(-1)])


def test_dice_meta_gradient_matches_finite_differences_exactly():
    policy = TwoStepPolicy()
    expected = finite_difference_meta_gradient(policy)
    torch.testing.assert_close(meta_gradient(policy, "dice"), expected, rtol=1e-6, atol=1e-9)
    # The test has teeth: without the magic box (or with lam = 0, dropping cross-step dependencies)
    # the Hessian term is wrong and so is the meta-gradient.
    assert (meta_gradient(policy, "naive") - expected).abs().max() > 1e-2
    assert (meta_gradient(policy, "dice_lam0") - expected).abs().max() > 1e-3


def test_first_order_meta_gradient_is_the_post_update_gradient():
    policy = TwoStepPolicy()
    first_order = meta_gradient(policy, "dice", first_order=True)
    # FOMAML: grad J evaluated at theta' (the Jacobian d theta' / d theta taken as the identity).
    flat = torch.cat([policy.first.detach(), policy.second.detach().reshape(-1)]).requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_return(flat[:2], flat[2:].reshape(2, 2)), flat)
    adapted = (flat + STEP_SIZE * grad).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(expected_return(adapted[:2], adapted[2:].reshape(2, 2)), adapted)
    torch.testing.assert_close(first_order, expected, rtol=1e-9, atol=1e-12)


def test_gaussian_policy_meta_gradient_by_quadrature():
    """A GaussianMLPPolicy as a 1-D bandit: a ~ N(mu, sigma^2), R(a) = -(a - g)^2, so
    E[R] = -((mu - g)^2 + sigma^2) in closed form; Gauss-Hermite nodes give the exact expectation
    of the (polynomial) DiCE derivatives."""
    goal, alpha = 1.0, 0.1
    policy = GaussianMLPPolicy(1, 1, hidden=(), normalize=False).double()
    with torch.no_grad():
        policy.actor[0].weight.fill_(0.2)
        policy.actor[0].bias.fill_(0.1)
        policy.log_std.fill_(-0.3)
    obs = torch.ones(1, dtype=DOUBLE)  # mean = weight + bias

    def closed_form_meta_objective(theta: torch.Tensor) -> torch.Tensor:
        theta = theta.clone().requires_grad_(True)
        expected = -((theta[0] + theta[1] - goal) ** 2 + torch.exp(2 * theta[2]))
        (grad,) = torch.autograd.grad(expected, theta)
        w, b, log_std = theta + alpha * grad
        return -((w + b - goal) ** 2 + torch.exp(2 * log_std))

    theta = torch.tensor([0.2, 0.1, -0.3], dtype=DOUBLE)
    eps = 1e-6
    expected = torch.stack(
        [
            (closed_form_meta_objective(theta + eps * e) - closed_form_meta_objective(theta - eps * e)) / (2 * eps)
            for e in torch.eye(3, dtype=DOUBLE)
        ]
    )
    nodes, node_weights = np.polynomial.hermite.hermgauss(10)
    mean, std = 0.3, math.exp(-0.3)
    actions = torch.as_tensor(mean + math.sqrt(2.0) * std * nodes, dtype=DOUBLE)[:, None]  # [10, 1]
    weights = torch.as_tensor(node_weights / math.sqrt(math.pi), dtype=DOUBLE)
    learner = MAML(policy, step_size=alpha, parameter_names=["actor.0.weight", "actor.0.bias", "log_std"])
    clone = learner.clone()
    log_probs = clone.call("distribution", obs.expand(10, 1)).log_prob(actions).sum(-1)[:, None]
    clone.adapt(-dice_objective(log_probs, -((actions - goal) ** 2), weights=weights))
    post_mean = clone.call("forward", obs)[0]
    post = -((post_mean - goal) ** 2 + torch.exp(2 * clone.params["log_std"][0]))
    grads = torch.autograd.grad(post, [policy.actor[0].weight, policy.actor[0].bias, policy.log_std])
    torch.testing.assert_close(torch.stack([g.reshape(()) for g in grads]), expected, rtol=1e-6, atol=1e-9)
    # The learner's own parameters never moved: adaptation is functional.
    assert policy.log_std.item() == pytest.approx(-0.3)


def test_clone_adapt_errors_and_detach():
    policy = GaussianMLPPolicy(4, 2, hidden=(8,), normalize=False)
    with pytest.raises(ConfigError, match="cannot adapt parameters"):
        MAML(policy, parameter_names=["actor.9.weight"])
    with pytest.raises(ConfigError, match="step_size"):
        MAML(policy, step_size=0.0)
    learner = MAML(policy, step_size=0.1)
    clone = learner.clone()
    obs = torch.randn(5, 4)
    with pytest.raises(ValueError, match="scalar"):
        clone.adapt(clone(obs))
    with pytest.raises(ValueError, match="does not depend"):
        clone.adapt(policy(obs).detach().sum())
    before = {name: value.clone() for name, value in clone.params.items()}
    clone.adapt(clone(obs).square().sum())
    changed = {name for name in before if not torch.equal(before[name], clone.params[name])}
    assert changed == {"actor.0.weight", "actor.0.bias", "actor.2.weight", "actor.2.bias"}  # critic, log_std unused
    detached = clone.detach()
    assert all(value.is_leaf and value.requires_grad for value in detached.params.values())
    torch.testing.assert_close(detached(obs), clone(obs))


# -- Rollouts, returns, baseline ----------------------------------------------------------------------


def test_discounted_returns_and_linear_baseline_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # G = [3 * 0.25 + 2 * 0.5 + 1, 3 * 0.5 + 2, 3] and [5 * 0.5 + 4, 5, 0 (padding)]
    expected = torch.tensor([[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]])
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), expected)
    # Returns that are an exact linear function of the features are fitted exactly.
    obs = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    time = torch.arange(4.0) / 100
    returns = 2.0 * obs[..., 0] - obs[..., 1].square() + 30.0 * time + 1.0
    fitted = fit_linear_baseline(obs, returns, torch.ones(3, 4), reg=1e-10)
    torch.testing.assert_close(fitted, returns, atol=1e-4, rtol=1e-4)


def test_rollout_masks_ended_episodes_and_is_reproducible():
    envs = [PointNavEnv(max_episode_steps=3), PointNavEnv(max_episode_steps=5)]
    policy = GaussianMLPPolicy(4, 2, hidden=(8,), normalize=False)

    def run() -> list:
        return rollout([(policy.distribution, envs)], 10, [1, 2], torch.Generator().manual_seed(0))

    (episodes,) = run()
    assert episodes.obs.shape == (2, 5, 4) and episodes.actions.shape == (2, 5, 2)
    torch.testing.assert_close(episodes.mask, torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert episodes.rewards[0, 3:].abs().sum() == 0
    (again,) = run()
    torch.testing.assert_close(again.actions, episodes.actions)
    torch.testing.assert_close(again.log_probs, episodes.log_probs)
    recomputed = policy.distribution(episodes.obs).log_prob(episodes.actions).sum(-1) * episodes.mask
    torch.testing.assert_close(recomputed, episodes.log_probs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one seed per env"):
        rollout([(policy.distribution, envs)], 10, [1])


# -- Trainer ------------------------------------------------------------------------------------------

DISTRIBUTION = PointNavTaskDistribution()


def _point_policy() -> GaussianMLPPolicy:
    return GaussianMLPPolicy(4, 2, hidden=(32, 32), init_log_std=-0.5, normalize=False)


def _actor_names(policy: nn.Module) -> list[str]:
    return [name for name, _ in policy.named_parameters() if not name.startswith("critic")]


def test_trainer_replays_the_sampling_adaptation_and_is_deterministic():
    config = MAMLConfig(meta_batch_size=2, episodes_per_task=3, num_inner_steps=2, outer_steps=2)

    def train_once() -> tuple[list[dict[str, float]], GaussianMLPPolicy]:
        torch.manual_seed(0)
        policy = GaussianMLPPolicy(4, 2, hidden=(16,), init_log_std=-0.5)
        trainer = MAMLTrainer(MAML(policy, 0.02), PointNavEnv, DISTRIBUTION.sample_tasks, config, seed=3)
        history = trainer.train(2)
        returns = trainer.adaptation_returns(DISTRIBUTION.sample_tasks(3, np.random.default_rng(0)), 1, True)
        assert returns.shape == (3, 2) and np.isfinite(returns).all()  # deterministic meta-test episodes
        trainer.close()
        return history, policy

    history, policy = train_once()
    again, _ = train_once()
    assert [stats["post_return"] for stats in history] == [stats["post_return"] for stats in again]
    for stats in history:
        # The outer loss re-runs the K inner steps through the graph; before the first outer step they
        # must reproduce the sampling-time policies exactly, so the post-update KL starts at zero.
        assert stats["initial_approx_kl"] < 1e-6
        assert stats["outer_updates"] >= 1
        assert math.isfinite(stats["outer_loss"])
    assert policy.normalizer.count.item() > 1.0  # observations were merged into the normalizer
    with pytest.raises(ConfigError, match="meta_batch_size"):
        MAMLConfig(meta_batch_size=0)
    with pytest.raises(ConfigError, match="gamma"):
        MAMLConfig(gamma=1.5)


def meta_train_and_evaluate(make_learner, config: MAMLConfig, num_iterations: int, seeds=(0, 1, 2)) -> dict:
    """Per seed: held-out mean return before/after adaptation, untrained and meta-trained."""
    held_out = DISTRIBUTION.sample_tasks(10, np.random.default_rng(1000))
    results = {"untrained": [], "trained": []}
    for seed in seeds:
        torch.manual_seed(seed)
        trainer = MAMLTrainer(make_learner(_point_policy()), PointNavEnv, DISTRIBUTION.sample_tasks, config, seed=seed)
        results["untrained"].append(trainer.adaptation_returns(held_out).mean(axis=0))
        trainer.train(num_iterations)
        results["trained"].append(trainer.adaptation_returns(held_out).mean(axis=0))
    return {key: np.array(value) for key, value in results.items()}  # [num_seeds, K + 1]


def assert_adaptation_helps(results: dict) -> tuple[float, float]:
    """Post-adaptation return beats pre-adaptation by more than the spread across seeds."""
    pre, post = results["trained"][:, 0], results["trained"][:, -1]
    margin = post.mean() - pre.mean()
    spread = max(np.ptp(pre), np.ptp(post))
    assert (post > pre).all(), f"pre {pre}, post {post}"
    assert margin > spread, f"margin {margin:.2f} <= seed spread {spread:.2f} (pre {pre}, post {post})"
    return margin, spread


def test_maml_meta_training_improves_adaptation_on_held_out_point_tasks():
    config = MAMLConfig(meta_batch_size=8, episodes_per_task=10, outer_learning_rate=3e-3, outer_steps=3)
    results = meta_train_and_evaluate(
        lambda policy: MAML(policy, 0.02, parameter_names=_actor_names(policy)), config, 15
    )
    assert_adaptation_helps(results)
    # Meta-training, not the one policy-gradient step alone, makes the adapted policy good.
    untrained_post, trained_post = results["untrained"][:, -1], results["trained"][:, -1]
    assert trained_post.mean() - untrained_post.mean() > max(np.ptp(untrained_post), np.ptp(trained_post))

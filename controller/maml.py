"""MAML for RL (Finn et al. 2017) with a DiCE inner objective and a PPO-clip outer objective.

A `MetaLearner` wraps an `nn.Module` and exposes `clone()` -> `AdaptedModule`, whose
`adapt(loss)` replaces its fast weights by the learner's pure update rule (`maml_update` for
MAML); the fast weights stay differentiable back to the meta-parameters unless first-order. The
inner loss is the loaded-DiCE surrogate (Foerster et al. 2018; Farquhar et al. 2019), whose
second derivative includes the score-function term of the pre-update sampling distribution, so the
meta-gradient is correct (ProMP, Rothfuss et al. 2019). The training loop is controller/meta_trainer.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from controller.errors import ConfigError

logger = logging.getLogger(__name__)

Params = dict[str, Tensor]
"""Fast weights: parameter name (as in `module.named_parameters()`) -> tensor."""


def maml_update(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor | None] | Sequence[Tensor | None],
    step_sizes: float | Mapping[str, Tensor | float],
) -> Params:
    """One gradient step on fast weights: theta'_k = theta_k - step_k * grad_k (pure; nothing in place).

    Args:
        params: name -> tensor.
        grads: name -> gradient, or a sequence aligned with `params`' order; a None gradient (the
            loss does not depend on that tensor) leaves the tensor unchanged.
        step_sizes: One step size, or name -> step size (a scalar or a tensor shaped like the parameter).

    Returns:
        A new dict with the same keys.
    """
    names = list(params)
    if not isinstance(grads, Mapping):
        grads = list(grads)
        if len(grads) != len(names):
            raise ValueError(f"maml_update got {len(grads)} gradients for {len(names)} parameters")
        grads = dict(zip(names, grads))
    missing = [name for name in names if name not in grads]
    if missing:
        raise ValueError(f"maml_update: no gradient entry for {missing}")
    updated = {}
    for name in names:
        grad = grads[name]
        step = step_sizes if isinstance(step_sizes, (int, float)) else step_sizes[name]
        updated[name] = params[name] if grad is None else params[name] - step * grad
    return updated


def magic_box(x: Tensor) -> Tensor:
    """DiCE's magic box: evaluates to 1, and d/dx box(x) = box(x) to every order."""
    return torch.exp(x - x.detach())


def dice_objective(
    log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    sampling_log_probs: Tensor | None = None,
    lam: float = 1.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Loaded-DiCE surrogate of the expected return, to be maximized (its negative is the inner loss).

        w_t = sum_{t' <= t} lam^(t - t') log pi(a_t' | s_t')      (dependencies of step t)
        J   = sum_n weight_n sum_t (box(w_t) - box(w_t - log pi_t)) A_t

    Its gradient is the policy gradient sum_t grad log pi_t A_t; with lam = 1 its higher derivatives
    are unbiased too (any action-independent baseline inside A cancels to every order). lam < 1
    discounts distant dependencies: less variance, some bias. With `sampling_log_probs` (the
    trajectories came from another policy, e.g. after an outer step), box(w) becomes the importance
    weight exp(w - w_sampling), equal to the magic box when the two policies coincide.

    Args:
        log_probs: [N, T] differentiable log pi(a_t | s_t).
        advantages: [N, T] advantage estimates (treated as constants).
        mask: [N, T] 1 for real steps, 0 for padding after an episode ended; default all ones.
        sampling_log_probs: [N, T] log-probabilities under the sampling policy; default the detached
            `log_probs`.
        lam: Dependency discount in [0, 1].
        weights: [N] per-episode weights (e.g. exact probabilities for an enumeration); default 1/N.

    Returns:
        Scalar surrogate.
    """
    if log_probs.dim() != 2 or advantages.shape != log_probs.shape:
        raise ValueError(
            f"dice_objective expects log_probs and advantages of one shape [N, T], got "
            f"{tuple(log_probs.shape)} and {tuple(advantages.shape)}"
        )
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"dice_objective lam must be in [0, 1], got {lam!r}")
    num_episodes, num_steps = log_probs.shape
    mask = torch.ones_like(log_probs) if mask is None else mask.to(log_probs.dtype)
    log_probs = log_probs * mask
    sampling = log_probs.detach() if sampling_log_probs is None else sampling_log_probs.detach() * mask
    # decay[t', t] = lam^(t - t') for t' <= t, so w = log_probs @ decay is the discounted cumulative sum.
    steps = torch.arange(num_steps, dtype=log_probs.dtype, device=log_probs.device)
    lags = steps[None, :] - steps[:, None]
    decay = torch.where(lags >= 0, torch.tensor(lam, dtype=log_probs.dtype).pow(lags.clamp(min=0)), 0.0)
    dependencies = log_probs @ decay
    sampling_dependencies = sampling @ decay
    box_now = torch.exp(dependencies - sampling_dependencies)
    box_before = torch.exp((dependencies - log_probs) - (sampling_dependencies - sampling))
    per_episode = ((box_now - box_before) * advantages.detach() * mask).sum(dim=1)
    if weights is None:
        return per_episode.mean()
    if weights.shape != (num_episodes,):
        raise ValueError(f"dice_objective weights must have shape [{num_episodes}], got {tuple(weights.shape)}")
    return (weights.detach() * per_episode).sum()


def _detach_tree(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().requires_grad_(value.is_floating_point())
    if isinstance(value, Mapping):
        return {key: _detach_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach_tree(item) for item in value)
    return value


class _MethodCall(nn.Module):
    """Lets `torch.func.functional_call` run any method of a module, not only `forward`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, method)(*args, **kwargs)


class AdaptedModule:
    """A functional copy of a meta-learner's module carrying fast weights and the update rule's state.

    Parameters not in `params` (and all buffers) are read from the wrapped module. Fast weights of
    a fresh clone are the module's own parameters, so the adapted copy is differentiable back to them.
    """

    def __init__(self, learner: MetaLearner, params: Params, state: Any = None) -> None:
        self.learner = learner
        self.params = params
        self.state = state

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> Params:
        """One inner step on `loss`: params, state <- learner.update(params, grad(loss, params), state).

        Args:
            loss: Scalar to minimize, computed through this clone (`call`).
            first_order: Drop second-order terms (no graph through the gradient); default the learner's.

        Returns:
            The new fast weights (also stored in `self.params`).
        """
        if loss.dim() != 0:
            raise ValueError(f"adapt expects a scalar loss, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("adapt: the loss does not depend on any fast weight; compute it through clone.call(...)")
        first_order = self.learner.first_order if first_order is None else first_order
        names = list(self.params)
        grads = torch.autograd.grad(
            loss, [self.params[name] for name in names], create_graph=not first_order, allow_unused=True
        )
        self.params, self.state = self.learner.update(self.params, dict(zip(names, grads)), self.state)
        return self.params

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `module.<method>(*args, **kwargs)` with the fast weights (e.g. "distribution", "evaluate")."""
        prefixed = {f"module.{name}": value for name, value in self.params.items()}
        # tie_weights=False skips a per-call scan for tied weights (the policies tie none); it halves the overhead.
        return torch.func.functional_call(
            self.learner._method_call, prefixed, (method, *args), kwargs, tie_weights=False
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("forward", *args, **kwargs)

    def detach(self) -> AdaptedModule:
        """A copy cut from the meta-parameters' graph (fresh leaves), for sampling and evaluation."""
        return AdaptedModule(self.learner, _detach_tree(self.params), _detach_tree(self.state))


class MetaLearner(nn.Module):
    """Base of gradient-based meta-learners: a wrapped module, which of its parameters adapt, and a
    pure `update(params, grads, state) -> (params, state)` rule that subclasses define.

    `parameters()` are the meta-parameters (the module's initialization plus any learned update
    rule); the outer optimizer trains them.
    """

    def __init__(self, module: nn.Module, first_order: bool = False, parameter_names: Iterable[str] | None = None):
        super().__init__()
        self.module = module
        self.first_order = bool(first_order)
        valid = [name for name, _ in module.named_parameters()]
        names = valid if parameter_names is None else list(parameter_names)
        unknown = [name for name in names if name not in valid]
        if unknown or not names:
            raise ConfigError(f"cannot adapt parameters {unknown or names}; the module's parameters are {valid}")
        self.parameter_names = tuple(names)
        # Not a registered child: the module is already one, and state_dict must not hold it twice.
        object.__setattr__(self, "_method_call", _MethodCall(module))

    def fast_parameters(self) -> Params:
        """The adapted parameters themselves (graph leaves), name -> Parameter."""
        named = dict(self.module.named_parameters())
        return {name: named[name] for name in self.parameter_names}

    def initial_state(self, params: Params) -> Any:
        """State of the update rule before the first inner step (None for stateless rules)."""
        return None

    def update(self, params: Params, grads: Mapping[str, Tensor | None], state: Any) -> tuple[Params, Any]:
        raise NotImplementedError

    def clone(self) -> AdaptedModule:
        """A functional copy whose fast weights start at (and differentiate back to) the module's."""
        params = self.fast_parameters()
        return AdaptedModule(self, params, self.initial_state(params))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class MAML(MetaLearner):
    """MAML: theta' = theta - step_size * grad L_inner(theta) (via `maml_update`).

    Args:
        module: The policy (anything with a `distribution(obs)` method for `MAMLTrainer`).
        step_size: Inner-loop step size alpha.
        first_order: FOMAML: treat the inner gradient as a constant.
        parameter_names: Which of `module.named_parameters()` adapt; default all (a parameter the
            inner loss does not reach, such as a critic, is left unchanged).
    """

    def __init__(
        self,
        module: nn.Module,
        step_size: float = 0.1,
        first_order: bool = False,
        parameter_names: Iterable[str] | None = None,
    ) -> None:
        super().__init__(module, first_order, parameter_names)
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
            raise ConfigError(f"MAML step_size must be a positive number, got {step_size!r}")
        self.step_size = float(step_size)

    def update(self, params: Params, grads: Mapping[str, Tensor | None], state: Any) -> tuple[Params, Any]:
        return maml_update(params, grads, self.step_size), state

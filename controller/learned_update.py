"""Learned inner-loop updaters with MAML's adaptation API (`clone()` / `adapt(loss)`).

`MetaSGD` (Li et al. 2017) meta-learns one step size per parameter coordinate beside the
initialization. `LearnedOptimizer` is a coordinate-wise GRU (Andrychowicz et al. 2016) mapping
each coordinate's preprocessed gradient and its own hidden state to an update; it applies to any
parameter dict, e.g. only the MLSH master's. `LearnedOptimizerMAML` meta-trains it, with the
initialization, on post-update return by backpropagating through the unrolled inner steps
(`controller.maml.MAMLTrainer` runs either).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from controller.errors import ConfigError
from controller.maml import MetaLearner, Params, maml_update


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class MetaSGD(MetaLearner):
    """Meta-SGD: theta' = theta - exp(log_alpha) * grad, with log_alpha [per coordinate] meta-learned.

    Args:
        module: The policy.
        step_size: Initial step size of every coordinate.
        first_order: Treat the inner gradient as a constant (the step sizes still get a meta-gradient).
        parameter_names: Which of `module.named_parameters()` adapt; default all.
    """

    def __init__(
        self,
        module: nn.Module,
        step_size: float = 0.1,
        first_order: bool = False,
        parameter_names: Iterable[str] | None = None,
    ) -> None:
        super().__init__(module, first_order, parameter_names)
        log_step = math.log(_check_positive("MetaSGD step_size", step_size))
        # Log-parametrized so every step size stays positive; a list aligned with parameter_names
        # because ParameterDict keys may not contain the dots of nested parameter names.
        self.log_step_sizes = nn.ParameterList(
            nn.Parameter(torch.full_like(param, log_step)) for param in self.fast_parameters().values()
        )

    def step_sizes(self) -> Params:
        """Current per-coordinate step sizes, name -> tensor shaped like the parameter."""
        return {name: log_step.exp() for name, log_step in zip(self.parameter_names, self.log_step_sizes)}

    def update(self, params: Params, grads: Mapping[str, Tensor | None], state: Any) -> tuple[Params, Any]:
        return maml_update(params, grads, self.step_sizes()), state


def preprocess_gradients(grads: Tensor, scale: float = 10.0) -> Tensor:
    """Gradient features of Andrychowicz et al. (2016, appendix A), robust across magnitudes.

        (log|g| / p, sign(g))   if |g| >= exp(-p)
        (-1, exp(p) * g)        otherwise

    Args:
        grads: [M] gradient coordinates.
        scale: p.

    Returns:
        [M, 2] features.
    """
    threshold = math.exp(-scale)
    large = grads.abs() >= threshold
    # Clamp before the log so the unused branch has a finite (zero) derivative, not inf * 0 = NaN.
    log_magnitude = torch.log(grads.abs().clamp(min=threshold)) / scale
    first = torch.where(large, log_magnitude, torch.full_like(grads, -1.0))
    second = torch.where(large, torch.sign(grads), grads / threshold)
    return torch.stack([first, second], dim=-1)


class LearnedOptimizer(nn.Module):
    """Coordinate-wise GRU optimizer: theta_{t+1}, h_{t+1} = f_phi(theta_t, grad_t, h_t).

    For each coordinate i (all parameters share phi, so any parameter dict fits):
        h_i'      = GRU(preprocess(g_i), h_i)
        theta_i' = theta_i - exp(log_step) * g_i - output_scale * w^T h_i'
    The read-out w starts at zero, so before meta-training the optimizer is SGD with `step_size`
    and meta-training departs from a working rule rather than from noise.

    Args:
        hidden_size: GRU state size per coordinate.
        step_size: Initial step size of the SGD part.
        output_scale: Scale of the learned (GRU) part of the update.
        preprocess_scale: p of `preprocess_gradients`.
    """

    def __init__(
        self,
        hidden_size: int = 16,
        step_size: float = 0.1,
        output_scale: float = 0.1,
        preprocess_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ConfigError(f"LearnedOptimizer hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.output_scale = _check_positive("LearnedOptimizer output_scale", output_scale)
        self.preprocess_scale = _check_positive("LearnedOptimizer preprocess_scale", preprocess_scale)
        self.log_step_size = nn.Parameter(torch.tensor(math.log(_check_positive("step_size", step_size))))
        self.cell = nn.GRUCell(2, hidden_size)
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def initial_state(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Zero hidden state per parameter: name -> [numel, hidden_size]."""
        return {
            name: torch.zeros(param.numel(), self.hidden_size, dtype=param.dtype, device=param.device)
            for name, param in params.items()
        }

    def forward(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None], state: Mapping[str, Tensor]
    ) -> tuple[Params, dict[str, Tensor]]:
        """One update of every parameter with a gradient (None: parameter and its state unchanged).

        Args:
            params: name -> tensor, any shapes.
            grads: name -> gradient shaped like the parameter, or None.
            state: name -> [numel, hidden_size] hidden state (from `initial_state`).

        Returns:
            New params and new state (new dicts; inputs are not modified).
        """
        missing = [name for name in params if name not in grads or name not in state]
        if missing:
            raise ValueError(f"LearnedOptimizer: no gradient or state entry for {missing}")
        new_params, new_state = dict(params), dict(state)
        names = [name for name in params if grads[name] is not None]
        if not names:
            return new_params, new_state
        for name in names:
            if grads[name].shape != params[name].shape or state[name].shape != (params[name].numel(), self.hidden_size):
                raise ValueError(
                    f"LearnedOptimizer: '{name}' has shape {tuple(params[name].shape)}, gradient "
                    f"{tuple(grads[name].shape)}, state {tuple(state[name].shape)}"
                )
        # One GRU call over every coordinate of every parameter.
        flat_grads = torch.cat([grads[name].reshape(-1) for name in names])
        hidden = self.cell(
            preprocess_gradients(flat_grads, self.preprocess_scale), torch.cat([state[n] for n in names])
        )
        delta = -self.log_step_size.exp() * flat_grads - self.output_scale * self.head(hidden).squeeze(-1)
        sizes = [params[name].numel() for name in names]
        for name, part, part_hidden in zip(names, delta.split(sizes), hidden.split(sizes)):
            new_params[name] = params[name] + part.view_as(params[name])
            new_state[name] = part_hidden
        return new_params, new_state


class LearnedOptimizerMAML(MetaLearner):
    """Meta-learns a `LearnedOptimizer` and the module's initialization together.

    Args:
        module: The policy (or e.g. an `MLSHPolicy` with `parameter_names` its master's).
        optimizer: The learned optimizer; default `LearnedOptimizer()`.
        first_order: Treat inner gradients as constants (phi still gets a meta-gradient).
        parameter_names: Which of `module.named_parameters()` adapt; default all.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: LearnedOptimizer | None = None,
        first_order: bool = False,
        parameter_names: Iterable[str] | None = None,
    ) -> None:
        super().__init__(module, first_order, parameter_names)
        self.optimizer = optimizer if optimizer is not None else LearnedOptimizer()

    def initial_state(self, params: Params) -> dict[str, Tensor]:
        return self.optimizer.initial_state(params)

    def update(
        self, params: Params, grads: Mapping[str, Tensor | None], state: Mapping[str, Tensor]
    ) -> tuple[Params, dict[str, Tensor]]:
        return self.optimizer(params, grads, state)

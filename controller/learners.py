"""The gradient-based meta-learners by name: one place that builds them, for training, export and
on-robot adaptation (a bundle stores the plain description `learner_from_spec` reads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from controller.errors import ConfigError
from controller.learned_update import LearnedOptimizer, LearnedOptimizerMAML, MetaSGD
from controller.maml import MAML, MetaLearner
from controller.policies import GaussianMLPPolicy

LEARNERS = ("maml", "meta_sgd", "learned_optimizer")
"""Names of the gradient-based meta-learners `build_learner` makes (the `algorithm` of a config or bundle)."""


def build_learner(
    algorithm: str,
    module: nn.Module,
    *,
    step_size: float = 0.05,
    first_order: bool = False,
    parameter_names: Sequence[str] | None = None,
    optimizer_hidden_size: int = 16,
    optimizer_output_scale: float = 0.1,
) -> MetaLearner:
    """The meta-learner named `algorithm` around `module` (one place, for training, export and adaptation).

    Raises:
        ConfigError: for an unknown algorithm, naming the valid ones.
    """
    if algorithm == "maml":
        return MAML(module, step_size, first_order, parameter_names)
    if algorithm == "meta_sgd":
        return MetaSGD(module, step_size, first_order, parameter_names)
    if algorithm == "learned_optimizer":
        optimizer = LearnedOptimizer(optimizer_hidden_size, step_size, optimizer_output_scale)
        return LearnedOptimizerMAML(module, optimizer, first_order, parameter_names)
    raise ConfigError(f"meta-learner '{algorithm}' unknown; valid: {', '.join(LEARNERS)}")


def actor_parameter_names(module: nn.Module) -> list[str]:
    """What the inner loop of a trained-and-deployed actor adapts: every parameter but the critic's."""
    return [name for name, _ in module.named_parameters() if not name.startswith("critic")]


def learner_from_spec(spec: Mapping[str, Any]) -> MetaLearner:
    """Rebuild a meta-learner around a fresh `GaussianMLPPolicy` from a plain description.

    Args:
        spec: {"algorithm", "policy_config" (GaussianMLPPolicy kwargs), "learner" (`build_learner`
            keyword arguments but `parameter_names`)}; the actor's parameters adapt.
    """
    try:
        policy = GaussianMLPPolicy(**spec["policy_config"])
        return build_learner(
            spec["algorithm"], policy, parameter_names=actor_parameter_names(policy), **spec["learner"]
        )
    except (KeyError, TypeError) as error:
        raise ConfigError(f"not a meta-learner description: {error}") from error

"""Building blocks for policies: a running observation normalizer and orthogonally initialized MLPs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from controller.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "elu": nn.ELU, "relu": nn.ReLU}
"""Activation names accepted by `resolve_activation` and `mlp`."""

HIDDEN_GAIN = math.sqrt(2.0)
"""Orthogonal-init gain of hidden layers (the usual PPO choice, also used for tanh)."""


def resolve_activation(name: str) -> nn.Module:
    """A fresh activation module for `name`.

    Args:
        name: One of "tanh", "elu", "relu".

    Raises:
        ConfigError (a ValueError): for any other name, naming the valid options.
    """
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ConfigError(f"unknown activation {name!r}; valid options: {', '.join(sorted(ACTIVATIONS))}") from None


def init_mlp_(module: nn.Sequential, init_output_gain: float = 1.0, generator: torch.Generator | None = None) -> None:
    """Re-initialize every Linear in `module` in place: orthogonal weights, zero biases.

    Hidden layers get gain sqrt(2); the last Linear gets `init_output_gain` (0.01 for a policy's
    output so the initial action distribution is centred and nearly state-independent, 1.0 for a
    value head).

    Args:
        module: A Sequential as built by `mlp`.
        init_output_gain: Gain of the output layer.
        generator: Random source, for a reproducible re-initialization.
    """
    linears = [layer for layer in module if isinstance(layer, nn.Linear)]
    for index, layer in enumerate(linears):
        gain = init_output_gain if index == len(linears) - 1 else HIDDEN_GAIN
        with torch.no_grad():
            nn.init.orthogonal_(layer.weight, gain=gain, generator=generator)
            nn.init.zeros_(layer.bias)


def mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    activation: str = "tanh",
    init_output_gain: float = 1.0,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A multilayer perceptron: Linear -> activation for each hidden size, then a Linear output.

    Args:
        in_dim: Input features.
        hidden: Hidden layer sizes (may be empty: a single linear layer).
        out_dim: Output features.
        activation: "tanh", "elu" or "relu".
        init_output_gain: Orthogonal-init gain of the output layer (see `init_mlp_`).
        generator: Random source for the initialization; the global one when None.

    Returns:
        A Sequential mapping [..., in_dim] to [..., out_dim].
    """
    sizes = [in_dim, *hidden, out_dim]
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"mlp layer sizes must be positive ints, got {sizes}")
    resolve_activation(activation)  # fail before building anything
    layers: list[nn.Module] = []
    for index in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[index], sizes[index + 1]))
        if index < len(sizes) - 2:
            layers.append(resolve_activation(activation))
    network = nn.Sequential(*layers)
    init_mlp_(network, init_output_gain, generator)
    return network


class RunningNormalizer(nn.Module):
    """Observation normalizer with running statistics, kept as buffers so it saves and exports.

    `update` merges a batch into the statistics (Chan et al. parallel algorithm); `forward` only
    reads them, so it is a pure tensor function that torch.onnx bakes into the graph.

    Buffers:
        mean: [dim] float32 running mean.
        var: [dim] float32 running (population) variance.
        count: [] float64 number of samples seen (starts at 1e-4 so the prior is mean 0, var 1).
    """

    def __init__(self, dim: int, epsilon: float = 1e-8, clip: float = 10.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"normalizer dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.epsilon = epsilon
        self.clip = clip
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float32))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def reset(self) -> None:
        """Forget all statistics: back to mean 0, var 1, count 1e-4."""
        self.mean.zero_()
        self.var.fill_(1.0)
        self.count.fill_(1e-4)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge a batch into the running statistics.

        With (m_a, v_a, n_a) the current statistics and (m_b, v_b, n_b) the batch's:
            n = n_a + n_b,  delta = m_b - m_a
            mean = m_a + delta * n_b / n
            var  = (v_a * n_a + v_b * n_b + delta^2 * n_a * n_b / n) / n

        Args:
            x: [..., dim] samples; all leading dimensions are flattened into the batch.
        """
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"normalizer expects [..., {self.dim}] samples, got shape {tuple(x.shape)}")
        batch = x.reshape(-1, self.dim).to(torch.float64)
        batch_count = batch.shape[0]
        if batch_count == 0:
            return
        # Merge in float64: the running count grows without bound and float32 would drift.
        batch_mean = batch.mean(dim=0)
        batch_var = batch.var(dim=0, correction=0)
        mean = self.mean.to(torch.float64)
        var = self.var.to(torch.float64)
        total = self.count + batch_count
        delta = batch_mean - mean
        new_mean = mean + delta * (batch_count / total)
        m2 = var * self.count + batch_var * batch_count + delta.square() * (self.count * batch_count / total)
        self.mean.copy_(new_mean)
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize: clamp((x - mean) / sqrt(var + eps), -clip, clip).

        Args:
            x: [..., dim] observations.

        Returns:
            [..., dim] normalized observations.
        """
        return torch.clamp((x - self.mean) / torch.sqrt(self.var + self.epsilon), -self.clip, self.clip)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, clip={self.clip}"

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from controller.errors import ConfigError
from controller.networks import RunningNormalizer, init_mlp_, mlp, resolve_activation


def test_normalizer_starts_at_prior() -> None:
    normalizer = RunningNormalizer(3)
    assert normalizer.mean.dtype == torch.float32 and normalizer.var.dtype == torch.float32
    assert normalizer.count.dtype == torch.float64 and normalizer.count.shape == ()
    assert torch.equal(normalizer.mean, torch.zeros(3))
    assert torch.equal(normalizer.var, torch.ones(3))
    assert normalizer.count.item() == pytest.approx(1e-4)
    x = torch.tensor([[0.5, -2.0, 30.0]])
    # Prior statistics: (x - 0) / sqrt(1 + 1e-8), then clamp to [-10, 10].
    expected = torch.tensor([[0.5 / math.sqrt(1 + 1e-8), -2.0 / math.sqrt(1 + 1e-8), 10.0]])
    torch.testing.assert_close(normalizer(x), expected)


def test_normalizer_merged_in_pieces_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(loc=[3.0, -1.0, 0.0, 100.0], scale=[0.5, 2.0, 1.0, 10.0], size=(1000, 4))
    normalizer = RunningNormalizer(4)
    for piece in np.array_split(data, [1, 7, 300, 301, 650]):
        normalizer.update(torch.as_tensor(piece, dtype=torch.float32))
    float_data = data.astype(np.float32).astype(np.float64)

    # Exact: the prior is a pseudo-sample group of count 1e-4, mean 0, var 1.
    prior = 1e-4
    total = len(data) + prior
    mean = float_data.sum(axis=0) / total
    m2 = ((float_data - mean) ** 2).sum(axis=0) + prior * (1.0 + mean**2)
    np.testing.assert_allclose(normalizer.mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(normalizer.var.numpy(), m2 / total, rtol=1e-5)
    assert normalizer.count.item() == pytest.approx(total)
    # And indistinguishable from numpy's statistics of the whole data set.
    np.testing.assert_allclose(normalizer.mean.numpy(), data.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(normalizer.var.numpy(), data.var(axis=0), rtol=1e-4)

    x = torch.as_tensor(data[:5], dtype=torch.float32)
    expected = (data[:5] - data.mean(axis=0)) / np.sqrt(data.var(axis=0))
    np.testing.assert_allclose(normalizer(x).numpy(), expected, rtol=1e-3, atol=1e-4)


def test_normalizer_accepts_leading_dims_and_rejects_wrong_width() -> None:
    normalizer = RunningNormalizer(2)
    normalizer.update(torch.arange(12.0).reshape(3, 2, 2))
    # Six rows [0, 1], [2, 3], ..., [10, 11] plus the 1e-4 prior pseudo-count at mean 0.
    np.testing.assert_allclose(normalizer.mean.numpy(), np.array([30.0, 36.0]) / (6 + 1e-4), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
        normalizer.update(torch.zeros(4, 3))


def test_normalizer_reset_and_state_dict_round_trip() -> None:
    normalizer = RunningNormalizer(2)
    normalizer.update(torch.randn(50, 2) * 4 + 2)
    copy = RunningNormalizer(2)
    copy.load_state_dict(normalizer.state_dict())
    assert torch.equal(copy.mean, normalizer.mean) and torch.equal(copy.count, normalizer.count)
    normalizer.reset()
    assert torch.equal(normalizer.mean, torch.zeros(2)) and torch.equal(normalizer.var, torch.ones(2))


def test_resolve_activation_names_valid_options() -> None:
    assert isinstance(resolve_activation("tanh"), nn.Tanh)
    assert isinstance(resolve_activation("elu"), nn.ELU)
    assert isinstance(resolve_activation("relu"), nn.ReLU)
    with pytest.raises(ValueError, match="elu, relu, tanh") as info:
        resolve_activation("gelu")
    assert "'gelu'" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_mlp_structure_and_orthogonal_init() -> None:
    torch.manual_seed(0)
    network = mlp(6, [8, 8], 3, activation="elu", init_output_gain=0.01)
    kinds = [type(layer) for layer in network]
    assert kinds == [nn.Linear, nn.ELU, nn.Linear, nn.ELU, nn.Linear]
    assert network(torch.zeros(5, 6)).shape == (5, 3)
    hidden = network[2].weight.detach()
    # Square orthogonal matrix with gain g: W W^T = g^2 I.
    torch.testing.assert_close(hidden @ hidden.T, 2.0 * torch.eye(8), atol=1e-5, rtol=0)
    output = network[4].weight.detach()  # [3, 8]: orthonormal rows scaled by the gain
    torch.testing.assert_close(output @ output.T, 1e-4 * torch.eye(3), atol=1e-8, rtol=0)
    assert all(torch.all(layer.bias == 0) for layer in network if isinstance(layer, nn.Linear))
    assert len(mlp(4, [], 2)) == 1


def test_init_mlp_is_reproducible_with_generator() -> None:
    first = mlp(3, [4], 2, generator=torch.Generator().manual_seed(5))
    second = mlp(3, [4], 2)
    init_mlp_(second, 1.0, torch.Generator().manual_seed(5))
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sizes", [(0, [4], 2), (3, [4, -1], 2), (3, [4], 2.5)])
def test_mlp_rejects_bad_sizes(sizes: tuple) -> None:
    with pytest.raises(ConfigError, match="positive ints"):
        mlp(*sizes)

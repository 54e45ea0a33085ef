"""The classic and robust losses against values computed by hand from the papers' formulas (plain
Python floats, no torch), against central finite differences in float64 (inputs and coefficients),
and per-sample (`reduction="none"`) against the mean."""

from __future__ import annotations

import math

import pytest
import torch

from metaloss.errors import ConfigError
from metaloss.losses import LOSSES, get_loss, reduce

LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [-0.5, 1.5, 0.0], [1.0, 1.0, 1.0]]
TARGET = [0, 1, 1, 2]  # the second sample is badly wrong, as a noisy label would be


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def by_hand(name: str, z: list[float], y: int) -> float:
    p = softmax(z)
    py, k = p[y], len(z)
    ce = -math.log(py)
    return {
        "cross_entropy": ce,
        "label_smoothing": -sum(((0.9 if j == y else 0.0) + 0.1 / k) * math.log(p[j]) for j in range(k)),
        "focal": -((1 - py) ** 2) * math.log(py),
        "poly1": ce + 1.0 * (1 - py),
        "gce": (1 - py**0.7) / 0.7,
        "mae": sum(abs(p[j] - (1.0 if j == y else 0.0)) for j in range(k)),
        "rce": -sum(p[j] * (0.0 if j == y else -4.0) for j in range(k)),
        "sce": 0.1 * ce + 1.0 * -sum(p[j] * (0.0 if j == y else -4.0) for j in range(k)),
        "nce_rce": ce / -sum(math.log(v) for v in p) - sum(p[j] * (0.0 if j == y else -4.0) for j in range(k)),
        "taylor_ce": (1 - py) + (1 - py) ** 2 / 2,
        "entropy": -sum(v * math.log(v) for v in p),  # the label is not read
    }[name]


CLASSIFICATION = sorted(n for n in LOSSES if n != "mse")


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_per_sample_values_equal_the_hand_computed_formula(name):
    loss = get_loss(name)
    logits, target = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGET)
    per_sample = loss(logits, target, reduction="none")
    assert per_sample.shape == (4,)
    expected = [by_hand(name, z, y) for z, y in zip(LOGITS, TARGET)]
    torch.testing.assert_close(per_sample, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss(logits, target), per_sample.mean(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_gradients_equal_finite_differences(name):
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True)
    target = torch.tensor(TARGET)
    assert torch.autograd.gradcheck(lambda z: get_loss(name)(z, target, reduction="none"), (logits,), eps=1e-6)


COEFFICIENTS = {"label_smoothing": "smoothing", "focal": "gamma", "poly1": "epsilon", "gce": "q", "sce": "alpha",
                "nce_rce": "beta"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(COEFFICIENTS))
def test_coefficients_can_be_meta_parameters(name):
    """A coefficient given as a tensor gets the finite-difference gradient (a learnable epsilon, q, ...)."""
    logits, target = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGET)
    value = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    fn = get_loss(name)
    assert torch.autograd.gradcheck(lambda c: fn(logits, target, **{COEFFICIENTS[name]: c}), (value,), eps=1e-6)


def test_known_limits():
    """GCE tends to CE as q -> 0 and is MAE / 2 at q = 1; Taylor-CE tends to CE with the order;
    Poly-1 with epsilon 0 and label smoothing 0 are CE; MSE keeps its per-sample mean."""
    logits, target = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGET)
    ce = get_loss("cross_entropy")(logits, target, reduction="none")
    torch.testing.assert_close(get_loss("gce")(logits, target, q=1e-7, reduction="none"), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(get_loss("gce")(logits, target, q=1.0), get_loss("mae")(logits, target) / 2)
    torch.testing.assert_close(get_loss("taylor_ce")(logits, target, order=200, reduction="none"), ce, rtol=1e-4,
                               atol=1e-6)  # fmt: skip
    torch.testing.assert_close(get_loss("poly1")(logits, target, epsilon=0.0), ce.mean())
    torch.testing.assert_close(get_loss("label_smoothing")(logits, target, smoothing=0.0), ce.mean())
    pred, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(get_loss("mse")(pred, y, reduction="none"), ((pred - y) ** 2).mean(-1))
    torch.testing.assert_close(get_loss("mse")(pred, y), ((pred - y) ** 2).mean())


def test_bad_arguments_are_config_errors():
    logits, target = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="unknown reduction 'sum'"):
        reduce(torch.zeros(2), "sum")
    with pytest.raises(ConfigError, match="0 < q <= 1"):
        get_loss("gce")(logits, target, q=1.5)
    with pytest.raises(ConfigError, match="order >= 1"):
        get_loss("taylor_ce")(logits, target, order=0)
    with pytest.raises(ConfigError, match="unknown loss 'nope'"):
        get_loss("nope")

"""LearningRateSchedule2D (PES's toy 2D regression): the written-out gradient, the schedule, the
unroll against a hand-written SGD loop, and the truncation bias that PES and ES-Single avoid."""

from __future__ import annotations

import math

import pytest
import torch

from metaloss.errors import ConfigError
from metaloss.hypergrad import OnlineES, TruncatedBackprop
from metaloss.online import TruncatedSystem, online_meta_train
from tasks.synthetic import LearningRateSchedule2D


def test_is_a_truncated_system() -> None:
    assert isinstance(LearningRateSchedule2D(), TruncatedSystem)


def test_gradient_equals_autograd_of_the_loss() -> None:
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    x = x.requires_grad_()
    (expected,) = torch.autograd.grad(LearningRateSchedule2D.loss(x).sum(), x)
    torch.testing.assert_close(LearningRateSchedule2D.gradient(x), expected, rtol=1e-12, atol=1e-12)


def test_loss_at_the_start_and_at_its_minimum() -> None:
    start = LearningRateSchedule2D.loss(torch.tensor([1.0, 1.0], dtype=torch.float64))
    expected = math.sqrt(6) - math.sqrt(5) + math.sin(1) ** 2 * math.exp(-5) + 0.25 * 99
    assert start.item() == pytest.approx(expected, rel=1e-14)
    assert LearningRateSchedule2D.loss(torch.tensor([0.0, 100.0])).item() == pytest.approx(math.sin(100) ** 2, abs=1e-5)


def test_unroll_in_truncations_equals_a_hand_written_sgd_loop() -> None:
    system, theta = LearningRateSchedule2D(horizon=12), torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    x, losses = torch.tensor([1.0, 1.0], dtype=torch.float64), []
    for t in range(12):  # lr_t interpolates linearly between e^0.5 and e^-1
        lr = math.exp(0.5) * (12 - t) / 12 + math.exp(-1.0) * t / 12
        (g,) = torch.autograd.grad(LearningRateSchedule2D.loss(x.requires_grad_()), x)
        x = (x - lr * g).detach()
        losses.append(LearningRateSchedule2D.loss(x).item())
    state, first = system.unroll(system.init(1), [theta], 5)
    state, second = system.unroll(state, [theta], 7)
    assert state["t"] == 12
    torch.testing.assert_close(state["x"][0], x)
    assert first.item() == pytest.approx(sum(losses[:5]) / 5, rel=1e-12)
    assert second.item() == pytest.approx(sum(losses[5:]) / 7, rel=1e-12)


def test_bad_horizon_is_rejected() -> None:
    with pytest.raises(ConfigError):
        LearningRateSchedule2D(horizon=0)


def whole_problem_loss(theta: torch.Tensor) -> float:
    system = LearningRateSchedule2D()
    return system.unroll(system.init(1), [theta.detach().view(1, 2)], system.horizon)[1].item()


def schedule_run(estimator, truncations: int) -> float:
    theta = torch.nn.Parameter(torch.tensor([-4.0, -4.0], dtype=torch.float64))
    outer = torch.optim.Adam([theta], lr=0.01, betas=(0.99, 0.999))
    online_meta_train(LearningRateSchedule2D(), estimator, [theta], outer, truncations)
    return whole_problem_loss(theta)


def test_truncated_backprop_stalls_where_es_single_finds_the_valley() -> None:
    """The PES paper's fig. 3 claim, shortened: from theta = (-4, -4) (meta-objective 24.9), TBPTT
    with K = 10 settles on a schedule no better than 24; ES-Single (100 particles, sigma 0.3, K = 10)
    reaches the valley near the grid optimum 5.56 (benchmarks/lr_schedule_2d.py has the full run)."""
    assert whole_problem_loss(torch.tensor([-4.0, -4.0])) > 24.8
    assert schedule_run(TruncatedBackprop(10), 300) > 24.0
    assert schedule_run(OnlineES(100, 0.3, 10, resample_every=None, seed=0), 1000) < 8.0

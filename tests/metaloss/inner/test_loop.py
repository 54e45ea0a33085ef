"""The inner loop: its step count, callbacks, and what it keeps in the graph."""

from __future__ import annotations

import pytest
import torch

from metaloss.errors import ConfigError
from metaloss.inner import run_inner_loop, sgd


def quadratic(target: torch.Tensor):
    return lambda params, t: 0.5 * ((params["w"] - target) ** 2).sum()


def test_sgd_on_a_quadratic_contracts_geometrically() -> None:
    # w_t - c = (1 - lr)^t (w_0 - c) exactly
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w0 = torch.zeros(2, dtype=torch.float64)
    result = run_inner_loop({"w": w0}, quadratic(c), sgd(0.25), 5)
    torch.testing.assert_close(result.params["w"] - c, 0.75**5 * (w0 - c))
    assert len(result.losses) == 5
    assert result.losses[0].item() == pytest.approx(0.5 * 5.0)


def test_on_step_sees_every_iterate() -> None:
    seen = []
    run_inner_loop({"w": torch.zeros(1)}, quadratic(torch.ones(1)), sgd(0.5), 3, on_step=lambda t, p: seen.append(t))
    assert seen == [0, 1, 2, 3]


def test_no_graph_when_nothing_is_differentiable() -> None:
    w0 = torch.zeros(2, requires_grad=True)
    result = run_inner_loop({"w": w0 * 1}, quadratic(torch.ones(2)), sgd(0.1), 3, differentiable_steps=0)
    assert result.params["w"].grad_fn is None


def test_full_unroll_keeps_the_dependence_on_w0() -> None:
    w0 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    result = run_inner_loop({"w": w0}, quadratic(torch.ones(2, dtype=torch.float64)), sgd(0.25), 4)
    (g,) = torch.autograd.grad(result.params["w"].sum(), w0)
    torch.testing.assert_close(g, torch.full((2,), 0.75**4, dtype=torch.float64))


def test_zero_steps_returns_w0_and_negative_steps_fail() -> None:
    w0 = torch.ones(2)
    assert run_inner_loop({"w": w0}, quadratic(w0), sgd(0.1), 0).params["w"] is w0
    with pytest.raises(ConfigError):
        run_inner_loop({"w": w0}, quadratic(w0), sgd(0.1), -1)


def test_loss_sees_the_global_step_index() -> None:
    seen = []

    def loss(params, t):
        seen.append(t)
        return (params["w"] ** 2).sum()

    run_inner_loop({"w": torch.ones(1)}, loss, sgd(0.1), 3, first_step=5)
    assert seen == [5, 6, 7]

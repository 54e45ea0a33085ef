"""Implicit hypergradients against exact answers in float64: ridge regression's closed form
(scalar and per-feature L2 coefficients; CG, Neumann and a long unroll), iMAML's proximal
problem against its closed form and a long unrolled inner loop; learned losses (ML3, TaylorGLO) on a
proximal logistic regression against an unroll to convergence."""

from __future__ import annotations

import pytest
import torch
from test_unrolled import summed_and_returned
from torch import nn

from metaloss.errors import ConfigError
from metaloss.hypergrad import Implicit, Unrolled
from metaloss.losses import cross_entropy, mse
from metaloss.meta import (
    FixedInit,
    HyperparameterOptimizer,
    L2Penalty,
    LearnedInit,
    ML3Loss,
    Proximal,
    TaylorGLOLoss,
)
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

D, N, M = 4, 40, 30


def ridge_data(seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(M, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, 1, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 * torch.randn(N, 1, generator=g, dtype=torch.float64)
    yv = xv @ w + 0.5 * torch.randn(M, 1, generator=g, dtype=torch.float64)
    return Episode(x, y, xv, yv)


def ridge_problem(per_element: bool, steps: int) -> BilevelProblem:
    model = nn.Linear(D, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    penalty = L2Penalty(0.3, per_element=per_element, model=model).double()
    if per_element:
        with torch.no_grad():
            penalty.coefficients[0].copy_(torch.tensor([[0.1, 0.3, 0.6, 1.0]], dtype=torch.float64))
    return BilevelProblem(
        model, FixedInit(model), HyperparameterOptimizer("sgd", lr=0.3), mse, mse, steps, inner_regularizer=penalty
    )


def ridge_closed_form(problem: BilevelProblem, e: Episode) -> list[torch.Tensor]:
    """w* = (2/n X^T X + diag(lambda))^{-1} 2/n X^T y; d L_out(w*) / d lambda by autograd through the solve."""
    (lam,) = problem.meta_parameters()
    diag = lam.reshape(-1).expand(D) if lam.numel() == 1 else lam.reshape(-1)
    a = 2 / N * e.support_x.T @ e.support_x + torch.diag(diag)
    w_star = torch.linalg.solve(a, 2 / N * e.support_x.T @ e.support_y)  # [D, 1]
    loss = ((e.query_x @ w_star - e.query_y) ** 2).mean()
    return list(torch.autograd.grad(loss, [lam]))


@pytest.mark.parametrize("per_element", [False, True], ids=["scalar", "per-feature"])
@pytest.mark.parametrize(
    "estimator",
    [
        Implicit("cg", iterations=10, tol=1e-14),
        Implicit("neumann", iterations=400, alpha=0.3),
        "long_unroll",
    ],
    ids=["cg", "neumann", "long-unroll"],
)
def test_ridge_hypergradient_equals_the_closed_form(per_element: bool, estimator) -> None:
    problem, episode = ridge_problem(per_element, steps=400), ridge_data()
    expected = ridge_closed_form(problem, episode)
    out = (Unrolled("full") if estimator == "long_unroll" else estimator).estimate(problem, [episode])
    assert expected[0].abs().min() > 1e-4  # a non-trivial gradient, so the comparison can fail
    torch.testing.assert_close(out.grads[0], expected[0], rtol=1e-6, atol=0)
    if estimator != "long_unroll":
        assert out.metrics["solver_residual"] < 1e-8


def test_a_short_inner_loop_or_a_short_solve_is_visibly_off() -> None:
    episode = ridge_data()
    exact = ridge_closed_form(ridge_problem(True, 400), episode)[0]
    early = Implicit("cg", iterations=10).estimate(ridge_problem(True, 3), [episode]).grads[0]
    truncated_solve = Implicit("neumann", iterations=2, alpha=0.3).estimate(ridge_problem(True, 400), [episode])
    assert (early - exact).abs().max() > 1e-3
    assert (truncated_solve.grads[0] - exact).abs().max() > 1e-3 and truncated_solve.metrics["solver_residual"] > 1e-2


def imaml_problem(nonlinear: bool, steps: int, strength: float = 2.0) -> BilevelProblem:
    torch.manual_seed(0)
    if nonlinear:
        model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    else:
        model = nn.Linear(D, 1).double()
    return BilevelProblem(
        model,
        LearnedInit(model),
        HyperparameterOptimizer("sgd", lr=0.15),
        mse,
        mse,
        steps,
        inner_regularizer=Proximal(strength),
    )


def test_imaml_linear_model_equals_the_closed_form() -> None:
    """w* = (A + lambda I)^{-1} (b + lambda w0) with A = 2/n X1^T X1, X1 = [X, 1]: d L_out / d w0 by autograd."""
    problem, e = imaml_problem(False, 400), ridge_data(1)
    out = Implicit("cg", iterations=20, tol=1e-14).estimate(problem, [e])
    weight, bias = problem.meta_parameters()
    x1 = torch.cat([e.support_x, torch.ones(N, 1, dtype=torch.float64)], 1)
    xv1 = torch.cat([e.query_x, torch.ones(M, 1, dtype=torch.float64)], 1)
    w0 = torch.cat([weight.reshape(-1), bias]).unsqueeze(1)  # [D + 1, 1]
    a = 2 / N * x1.T @ x1 + 2.0 * torch.eye(D + 1, dtype=torch.float64)
    w_star = torch.linalg.solve(a, 2 / N * x1.T @ e.support_y + 2.0 * w0)
    expected = torch.autograd.grad(((xv1 @ w_star - e.query_y) ** 2).mean(), [weight, bias])
    for got, want in zip(out.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_imaml_implicit_gradient_agrees_with_a_long_unrolled_proximal_loop() -> None:
    episodes = [ridge_data(2), ridge_data(3)]
    implicit = Implicit("cg", iterations=50, tol=1e-14).estimate(imaml_problem(True, 600, strength=4.0), episodes)
    unrolled = Unrolled("full").estimate(imaml_problem(True, 600, strength=4.0), episodes)
    first_order = Unrolled("first_order").estimate(imaml_problem(True, 600, strength=4.0), episodes)
    for got, want, fo in zip(implicit.grads, unrolled.grads, first_order.grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
        assert (fo - want).abs().max() > 1e-4 or want.abs().max() < 1e-8  # the check is not trivial


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigError):
        Implicit("lu")
    with pytest.raises(ConfigError):
        Implicit(iterations=0)
    with pytest.raises(ConfigError):
        Proximal(0.0)
    with pytest.raises(ConfigError):
        L2Penalty(-1.0)


def learned_loss_problem(loss: nn.Module, steps: int) -> tuple[BilevelProblem, Episode]:
    """Logistic regression (3 classes) trained with a learned loss plus a proximal term to a fixed w0: the
    inner problem has a unique minimiser, so the implicit gradient of the loss's parameters is exact there."""
    g = torch.Generator().manual_seed(4)
    x, xq = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(M, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, 3, generator=g, dtype=torch.float64)
    episode = Episode(x, (x @ w).argmax(-1), xq, (xq @ w).argmax(-1))
    torch.manual_seed(0)
    model = nn.Linear(D, 3).double()
    problem = BilevelProblem(
        model,
        FixedInit(model),
        HyperparameterOptimizer("sgd", lr=0.3),
        loss.double(),
        cross_entropy,
        steps,
        inner_regularizer=Proximal(1.0),
    )
    return problem, episode


@pytest.mark.parametrize("family", ["ml3", "taylorglo"])
def test_learned_loss_implicit_gradient_equals_an_unroll_to_convergence(family: str) -> None:
    def make() -> nn.Module:
        torch.manual_seed(1)
        if family == "ml3":
            return ML3Loss(hidden=(6,))
        return TaylorGLOLoss((0.1, -0.2), (0.3, -0.5, 0.2, 1.0, 0.4, -0.3))

    problem, episode = learned_loss_problem(make(), 300)
    implicit = Implicit("cg", iterations=40, tol=1e-14).estimate(problem, [episode])
    unrolled = Unrolled("full").estimate(learned_loss_problem(make(), 300)[0], [episode])
    short = Unrolled("full").estimate(learned_loss_problem(make(), 5)[0], [episode])
    assert implicit.metrics["solver_residual"] < 1e-8
    assert len(implicit.grads) == len(list(make().parameters())) > 0
    for got, want in zip(implicit.grads, unrolled.grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
    assert max((e - w).abs().max().item() for e, w in zip(short.grads, unrolled.grads)) > 1e-4  # not trivial


def test_the_task_loop_summed_in_grad_equals_the_sum_of_returned_gradients_bit_for_bit() -> None:
    """iMAML with head-only adaptation: the body's phi has a direct and a mixed term (d - m, summed
    in d's buffer), the head's phi only the proximal term's mixed one (0 - m); both in phi's .grad
    (`add_into_grad`) against the returned sum, and the caller's .grad given back as they were."""
    problem = imaml_problem(True, 30)
    problem = BilevelProblem(problem.model, problem.init, problem.inner_opt, mse, mse, 30, adapt=["2"],
                             inner_regularizer=Proximal(2.0))  # fmt: skip
    episodes, estimator = [ridge_data(s) for s in (4, 5, 6)], Implicit("cg", iterations=8)
    summed, returned = summed_and_returned(problem, episodes, estimator._task)
    assert len(summed.grads) == 4
    for a, b in zip(summed.grads, returned.grads):
        assert a is not None and a.abs().sum() > 0 and torch.equal(a, b)

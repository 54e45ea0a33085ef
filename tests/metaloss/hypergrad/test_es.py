"""Antithetic ES against the exact hypergradient: on a problem whose outer loss is quadratic in phi
(learned initialisation, SGD on a least-squares inner loss), ES is unbiased, so the mean of many
independent estimates must lie within 4 standard errors of the exact gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaloss.errors import ConfigError
from metaloss.hypergrad import AntitheticES, Unrolled
from metaloss.losses import mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


def quadratic_problem() -> tuple[BilevelProblem, list[Episode]]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.1), mse, mse, 3)
    g = torch.Generator().manual_seed(1)
    x, xq = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 1, generator=g, dtype=torch.float64)
    return problem, [Episode(x, x @ w + 0.1, xq, xq @ w + 0.1)]


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_mean_of_es_estimates_is_within_four_standard_errors_of_the_exact_gradient() -> None:
    problem, episodes = quadratic_problem()
    exact = flat(Unrolled("full").estimate(problem, episodes).grads)
    es = AntitheticES(particles=4, sigma=0.5, seed=3)
    samples = torch.stack([flat(es.estimate(problem, episodes).grads) for _ in range(300)])  # [300, 4]
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    assert (se > 0).all()
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    # and the estimate is informative: the standard error is well below the gradient's size
    assert (4 * se < exact.abs().max()).all()


def test_es_leaves_phi_exactly_as_it_was_and_is_reproducible() -> None:
    problem, episodes = quadratic_problem()
    before = [p.detach().clone() for p in problem.meta_parameters()]
    a = AntitheticES(particles=2, sigma=0.1, seed=5).estimate(problem, episodes)
    b = AntitheticES(particles=2, sigma=0.1, seed=5).estimate(problem, episodes)
    for p, q in zip(problem.meta_parameters(), before):
        assert torch.equal(p, q)
    for x, y in zip(a.grads, b.grads):
        assert torch.equal(x, y)


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigError):
        AntitheticES(particles=0)
    with pytest.raises(ConfigError):
        AntitheticES(sigma=0.0)


class QuantizedSGD(nn.Module):
    """SGD whose steps are rounded to multiples of 0.05: piecewise constant in the learning rate, so
    backpropagation through the inner loop gives exactly zero for it."""

    def __init__(self) -> None:
        super().__init__()
        self.lr = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self):
        from metaloss.inner.optim import InnerOptimizer

        lr = self.lr  # read now, not when update runs (see BilevelProblem.with_meta_parameters)

        def update(grads, state, params):
            return {n: p - torch.round(lr * grads[n] / 0.05) * 0.05 for n, p in params.items()}, state

        return InnerOptimizer(lambda params: {}, update)


def test_es_works_where_the_inner_loop_is_not_differentiable() -> None:
    problem, episodes = quadratic_problem()
    problem.init.requires_grad_(False)  # phi = the learning rate alone
    problem.inner_opt = QuantizedSGD()
    (lr,) = problem.meta_parameters()
    assert Unrolled("full").estimate(problem, episodes).grads[0].abs().item() == 0.0
    g = AntitheticES(particles=16, sigma=0.05, seed=0).estimate(problem, episodes).grads[0]
    # the sign of a central difference of the outer loss over a wide step
    with torch.no_grad():
        lr.fill_(0.5)
        hi = AntitheticES()._outer_loss(problem, episodes)
        lr.fill_(0.1)
        lo = AntitheticES()._outer_loss(problem, episodes)
        lr.fill_(0.3)
    assert g.abs().item() > 0 and torch.sign(g).item() == (1.0 if hi > lo else -1.0)

"""Learned losses as meta-objects, in float64: the unrolled hypergradient of the loss's parameters
equals central finite differences of the outer loss; the checkpointed estimator equals the unrolled
one; ES over a learned loss gives the same numbers batched (vmap) and looped; the context contract
hands the loss exactly the rows it scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaloss.hypergrad import AntitheticES, CheckpointedUnrolled, Unrolled
from metaloss.losses import cross_entropy, mse
from metaloss.meta import FixedInit, HyperparameterOptimizer, ML3Loss, ML3RegressionLoss, TaylorGLOLoss
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, LossContext


def classification_episode(seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    x, xq = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64)
    return Episode(x, (x @ w).argmax(-1), xq, (xq @ w).argmax(-1))


def regression_episode(seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(10, 1, generator=g, dtype=torch.float64) * 4 - 2
    xq = torch.rand(8, 1, generator=g, dtype=torch.float64) * 4 - 2
    return Episode(x, torch.sin(2 * x), xq, torch.sin(2 * xq))


def problem_for(name: str, steps: int = 3) -> tuple[BilevelProblem, Episode]:
    torch.manual_seed(0)
    if name == "ml3_regression":
        model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        loss, outer, episode = ML3RegressionLoss(1, 1, hidden=(6,)), mse, regression_episode()
    else:
        model = nn.Linear(3, 3).double()
        loss = ML3Loss(hidden=(6,)) if name == "ml3" else TaylorGLOLoss((0.1, -0.2), (0.3, -0.5, 0.2, 1.0, 0.4, -0.3))
        outer, episode = cross_entropy, classification_episode()
    problem = BilevelProblem(model, FixedInit(model), HyperparameterOptimizer("sgd", lr=0.5), loss, outer, steps)
    return problem, episode


def outer_loss(problem: BilevelProblem, episode: Episode) -> float:
    params, inner = problem.adapt_to(episode, second_order=False)
    return problem.outer_objective(params, inner, episode)[0].item()


FAMILIES = ["ml3", "ml3_regression", "taylorglo"]


@pytest.mark.parametrize("name", FAMILIES)
def test_unrolled_hypergradient_of_a_learned_loss_equals_finite_differences(name):
    problem, episode = problem_for(name)
    phi = problem.meta_parameters()
    assert phi and [p.dtype for p in phi] == [torch.float64] * len(phi)  # the loss follows the model's dtype
    grads = Unrolled("full").estimate(problem, [episode]).grads
    h = 1e-6
    for p, g in zip(phi, grads):
        flat, g_flat = p.data.view(-1), g.reshape(-1)
        for i in range(flat.numel()):
            saved = flat[i].item()
            flat[i] = saved + h
            up = outer_loss(problem, episode)
            flat[i] = saved - h
            down = outer_loss(problem, episode)
            flat[i] = saved
            assert g_flat[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpointed_equals_unrolled_for_a_learned_loss(name):
    problem, episode = problem_for(name, steps=5)
    full = Unrolled("full").estimate(problem, [episode]).grads
    checkpointed = CheckpointedUnrolled(segment=2).estimate(problem, [episode]).grads
    for a, b in zip(full, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_es_over_a_learned_loss_is_the_same_batched_and_looped(name):
    """The batched path swaps phi in with `functional_call` (`WithParameters`), context included."""
    problem, episode = problem_for(name)
    looped = AntitheticES(particles=3, sigma=0.01, seed=2).estimate(problem, [episode])
    batched = AntitheticES(particles=3, sigma=0.01, seed=2, batched=True).estimate(problem, [episode])
    for a, b in zip(looped.grads, batched.grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_context_holds_the_rows_being_scored():
    """With minibatched inner steps, the loss sees the inputs of exactly the rows of its predictions."""
    seen: list[LossContext] = []

    class Recording(nn.Module):
        needs_context = True

        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, prediction, target, context):
            seen.append(context)
            return self.scale * ((prediction - target) ** 2).mean()

    model = nn.Linear(1, 1).double()
    problem = BilevelProblem(model, FixedInit(model), HyperparameterOptimizer("sgd", lr=0.1), Recording(), mse, 3,
                             inner_batch_size=4)  # fmt: skip
    episode = regression_episode()
    problem.adapt_to(episode)
    assert [c.step for c in seen] == [0, 1, 2]
    for c in seen:
        rows = torch.arange(c.step * 4, (c.step + 1) * 4) % 10
        assert torch.equal(c.inputs, episode.support_x[rows]) and c.episode is episode
        assert set(c.params) == {"weight", "bias"}


def test_learned_losses_are_non_negative_and_per_sample():
    logits, target = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    loss = ML3Loss().double()
    per_sample = loss(logits, target, reduction="none")
    assert per_sample.shape == (5,) and (per_sample >= 0).all()
    torch.testing.assert_close(loss(logits, target), per_sample.mean())
    taylor = TaylorGLOLoss().double()
    assert taylor(logits, target, reduction="none").shape == (5,)
    # the default TaylorGLO rewards confidence in the target: its gradient lowers the loss as p_y rises
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    taylor(z, torch.tensor([1])).backward()
    assert z.grad[0, 1] < 0 < z.grad[0, 0]


@pytest.mark.parametrize("kind", ["es", "pes", "es_single"])
def test_es_family_is_unbiased_for_the_unrolled_hypergradient_of_a_learned_loss(kind):
    """TaylorGLO's 8 meta-parameters, T = 3: the mean of 200 estimates lies within 4 standard errors
    of the unrolled hypergradient in every coordinate (sigma 1e-3: the smoothing bias, O(sigma^2),
    is far below the standard error), and the standard error is small enough to mean something."""
    from metaloss.hypergrad import EpisodicOnline

    problem, episode = problem_for("taylorglo")
    exact = torch.cat([g.reshape(-1) for g in Unrolled("full").estimate(problem, [episode]).grads])
    if kind == "es":
        estimator = AntitheticES(particles=8, sigma=1e-3, seed=3, batched=True)
    else:
        estimator = EpisodicOnline(kind, truncation=1, particles=8, sigma=1e-3, seed=3, batched=True)
    samples = torch.stack([torch.cat([g.reshape(-1) for g in estimator.estimate(problem, [episode]).grads])
                           for _ in range(200)])  # fmt: skip
    mean, se = samples.mean(0), samples.std(0) / len(samples) ** 0.5
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    assert (4 * se < exact.abs().max()).all()

"""Initialisations: a fresh random one per episode (ML3's setting) is a function of the episode,
follows the model's own initialisation scheme, and is never phi."""

from __future__ import annotations

import torch
from torch import nn

from metaloss.hypergrad import AntitheticES, Unrolled
from metaloss.losses import cross_entropy
from metaloss.meta import HyperparameterOptimizer, ML3Loss, RandomInit
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


def episode(seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    return Episode(x, y, x[:6], y[:6])


def test_random_init_is_a_function_of_the_episode_and_the_seed():
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    init = RandomInit(model, seed=1)
    a, b = init(episode(0)), init(episode(0))
    assert all(torch.equal(a[n], b[n]) for n in a)  # ES particles, resumes and re-evaluations agree
    c, d = init(episode(1)), RandomInit(model, seed=2)(episode(0))
    assert all(not torch.equal(a[n], c[n]) and not torch.equal(a[n], d[n]) for n in a)
    assert a.keys() == dict(model.named_parameters()).keys() and a["0.weight"].dtype == torch.float64
    before = torch.randn(3)  # the global RNG stream is untouched by a draw
    torch.manual_seed(123)
    first = torch.randn(3)
    torch.manual_seed(123)
    init(episode(3))
    assert torch.equal(torch.randn(3), first) and not torch.equal(before, first)


def test_random_init_follows_the_models_initialisation_scheme():
    """nn.Linear draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the pooled draws of many episodes fill
    that range and nothing lies outside it."""
    model = nn.Linear(64, 32)
    init = RandomInit(model)
    weights = torch.cat([init(episode(i))["weight"].reshape(-1) for i in range(20)])
    bound = 1 / 64**0.5
    assert weights.abs().max() <= bound and weights.abs().max() > 0.99 * bound
    assert abs(weights.mean().item()) < 0.01 and abs(weights.var().item() - bound**2 / 3) < 0.1 * bound**2 / 3


def test_random_init_is_not_phi_and_es_sees_one_draw_per_episode():
    """Only the loss is meta-learned; the batched ES path (vmap) draws w0 once for all particles, as
    the looped path does, so both give the same estimate."""
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    problem = BilevelProblem(model, RandomInit(model, seed=4), HyperparameterOptimizer("sgd", lr=0.5),
                             ML3Loss(hidden=(6,)), cross_entropy, 3)  # fmt: skip
    assert len(problem.meta_parameters()) == len(list(problem.inner_loss.parameters()))
    assert "init" not in problem.state_dict()  # nothing to save: the seed is configuration
    eps = [episode(0), episode(1)]
    looped = AntitheticES(particles=3, sigma=0.01, seed=2).estimate(problem, eps)
    batched = AntitheticES(particles=3, sigma=0.01, seed=2, batched=True).estimate(problem, eps)
    for a, b in zip(looped.grads, batched.grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the unrolled estimate is reproducible: the same episodes give the same w0 and the same gradient
    g1, g2 = (Unrolled("full").estimate(problem, eps).grads for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))

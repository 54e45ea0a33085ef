"""Initialisations: a fresh random one per episode (ML3's setting) is a function of the episode,
follows the model's own initialisation scheme, and is never phi."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaloss.errors import ConfigError
from metaloss.hypergrad import AntitheticES, Unrolled
from metaloss.losses import cross_entropy
from metaloss.meta import HyperparameterOptimizer, LearnedInit, ML3Loss, PrototypeHeadInit, RandomInit
from metaloss.models import MLP, Conv4
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


def test_zeroed_head_starts_every_task_at_zero_and_is_not_phi():
    """Kao et al.'s zeroing trick: the head is held at zero, phi is the body alone, and one inner SGD
    step from W = 0 is the prototype classifier W_k = lr (c_k - c) / N (balanced 3-way 2-shot)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    init = LearnedInit(model, zeroed=["2"])
    problem = BilevelProblem(model, init, HyperparameterOptimizer("sgd", lr=0.5), cross_entropy, cross_entropy, 1)
    assert [p.shape for p in problem.meta_parameters()] == [p.shape for p in model[0].parameters()]
    w0, _ = problem.initial_params()
    assert not w0["2.weight"].any() and not w0["2.bias"].any()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    adapted, _ = problem.adapt_to(Episode(x, y, x, y))
    f = torch.tanh(model[0](x)).detach()  # [6, 5] body features (the body does not move: dL/df = W^T (p - y) = 0)
    c = torch.stack([f[y == k].mean(0) for k in range(3)])  # [3, 5]
    torch.testing.assert_close(adapted["2.weight"], 0.5 * (c - f.mean(0)) / 3)
    torch.testing.assert_close(adapted["0.weight"], model[0].weight)
    grads = Unrolled().estimate(problem, [Episode(x, y, x[:3], y[:3])]).grads  # the body is reached
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_zeroed_names_must_be_modules_with_parameters():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.raises(ConfigError, match="no module 'head'"):
        LearnedInit(model, zeroed=["head"])
    with pytest.raises(ConfigError, match="no module '1'"):
        LearnedInit(model, zeroed=["1"])


def proto_problem(steps: int = 1) -> tuple[BilevelProblem, Episode]:
    torch.manual_seed(0)
    model = MLP(4, [5], 3, "tanh").double()
    problem = BilevelProblem(model, PrototypeHeadInit(model), HyperparameterOptimizer("sgd", lr=0.3), cross_entropy,
                             cross_entropy, steps)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    x, xq = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    return problem, Episode(x, torch.tensor([2, 0, 1, 1, 0, 2]), xq, torch.tensor([0, 1, 2] * 3))


def test_prototype_head_init_is_the_prototypical_networks_classifier():
    """Proto-MAML: W_k = 2 c_k, b_k = -||c_k||^2 from the support features, so the initial logits rank
    the classes by squared Euclidean distance to their prototypes; the model's own head is not phi."""
    problem, e = proto_problem()
    model = problem.model
    assert [p.shape for p in problem.meta_parameters()] == [p.shape for p in model.body.parameters()]
    w0, _ = problem.initial_params(e)
    f = model.body(e.support_x)  # [6, 5]
    c = torch.stack([f[e.support_y == k].mean(0) for k in range(3)])  # [3, 5]
    torch.testing.assert_close(w0["head.weight"], 2 * c)
    torch.testing.assert_close(w0["head.bias"], -(c**2).sum(1))
    fq = model.body(e.query_x)  # [9, 5]
    logits = problem.predict(w0, e.query_x)  # [9, 3]
    torch.testing.assert_close(logits, -torch.cdist(fq, c) ** 2 + (fq**2).sum(1, keepdim=True))
    assert not problem.init()["head.weight"].any()  # without an episode: the held-zero head (shape checks)


def test_the_meta_gradient_through_the_prototypes_equals_finite_differences():
    """Second-order MAML with the prototype head, two inner steps, float64: every body coordinate of
    the hypergradient against central differences of the outer loss."""
    problem, e = proto_problem(steps=2)
    got = Unrolled("full").estimate(problem, [e]).grads
    phi = problem.meta_parameters()

    def outer_loss() -> float:
        params, inner = problem.adapt_to(e)
        return float(problem.outer_objective(params, inner, e)[0].detach())

    h = 1e-6
    for p, g in zip(phi, got):
        flat, expected = p.data.view(-1), torch.empty(p.numel(), dtype=torch.float64)
        for i in range(p.numel()):
            flat[i] += h
            up = outer_loss()
            flat[i] -= 2 * h
            down = outer_loss()
            flat[i] += h
            expected[i] = (up - down) / (2 * h)
        torch.testing.assert_close(g.view(-1), expected, rtol=1e-6, atol=1e-8)
    assert all(g.abs().max() > 1e-3 for g in got)


def test_prototype_head_init_refuses_what_it_cannot_serve():
    with pytest.raises(ConfigError, match="split"):
        PrototypeHeadInit(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(ConfigError, match="per-step BatchNorm"):
        PrototypeHeadInit(Conv4(3, 1, 8, 16, pool="max", norm="batch_per_step"))
    problem, e = proto_problem()
    with pytest.raises(ConfigError, match="class labels"):
        problem.initial_params(Episode(e.support_x, e.support_y.double(), e.query_x, e.query_y.double()))

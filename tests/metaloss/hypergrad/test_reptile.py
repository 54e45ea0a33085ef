"""Reptile's displacement and Fish (Shi et al. 2022) against a hand-written sequence of per-domain SGD
steps and the meta step theta + eps (theta~ - theta), in float64, on domain episodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaloss.errors import ConfigError
from metaloss.hypergrad import Reptile
from metaloss.meta import FixedInit, HyperparameterOptimizer, LearnedInit
from metaloss.problem import BilevelProblem
from tasks.domain_shift import DomainData, DomainEpisodes, leave_one_domain_out

torch.set_num_threads(1)
D, C, B, LR, EPS = 3, 3, 4, 0.2, 0.5


def domains() -> DomainData:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20, D, generator=g, dtype=torch.float64) + d for d in range(4)]
    return DomainData("toy", ["a", "b", "c", "d"], xs, [torch.randint(C, (20,), generator=g) for _ in xs], C)


def fish_problem(model: nn.Module, init: nn.Module, n_sources: int) -> BilevelProblem:
    return BilevelProblem(model=model, init=init, inner_opt=HyperparameterOptimizer(name="sgd", lr=LR),
                          inner_loss=F.cross_entropy, outer_loss=F.cross_entropy, inner_steps=n_sources,
                          inner_batch_size=B)  # fmt: skip


def test_fish_update_equals_hand_written_per_domain_steps_and_the_meta_step():
    split = leave_one_domain_out(domains(), "b", seed=1)
    episodes = DomainEpisodes(split, batch_size=B, mode="fish", seed=2)
    torch.manual_seed(3)
    model = nn.Linear(D, C).double()
    problem = fish_problem(model, LearnedInit(model), len(split.sources))
    theta = [p.detach().clone() for p in model.parameters()]
    batch = [episodes.episode(i) for i in range(2)]

    expected_target = [torch.zeros_like(t) for t in theta]
    for episode in batch:  # Fish: theta~ <- theta~ - lr grad L_d(theta~), domain by domain, in the episode's order
        w = [t.clone().requires_grad_() for t in theta]
        for d, name in enumerate(episode.meta["domain_order"]):
            x, y = episode.support_x[d * B : (d + 1) * B], episode.support_y[d * B : (d + 1) * B]
            source = split.sources[split.source_names.index(name)]
            assert all(any(torch.equal(row, r) for r in split.train[split.sources.index(source)][0]) for row in x)
            grads = torch.autograd.grad(F.cross_entropy(x @ w[0].T + w[1], y), w)
            w = [(wi - LR * gi).detach().requires_grad_() for wi, gi in zip(w, grads)]
        expected_target = [e + wi.detach() / len(batch) for e, wi in zip(expected_target, w)]

    out = Reptile().estimate(problem, batch)
    optimizer = torch.optim.SGD(problem.meta_parameters(), lr=EPS)
    for p, g in zip(problem.meta_parameters(), out.grads):
        p.grad = g
    optimizer.step()
    for p, t, target in zip(model.parameters(), theta, expected_target):
        assert torch.allclose(p.detach(), t + EPS * (target - t), rtol=1e-12, atol=1e-12)


def test_reptile_needs_a_learned_initialisation():
    split = leave_one_domain_out(domains(), "a")
    model = nn.Linear(D, C).double()
    problem = fish_problem(model, FixedInit(model), 3)
    problem.inner_regularizer = None
    with pytest.raises(ConfigError, match="init=learned"):
        Reptile().estimate(problem, [DomainEpisodes(split, B, "fish").episode(0)])

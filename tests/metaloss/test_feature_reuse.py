"""Head-only adaptation (ANIL) with the body's features computed once per inner loop
(`BilevelProblem.reuse_features`): the same hypergradients and metrics as recomputing them at every
step, for MAML-style second order, ES in a vmap batch, a proximal regulariser and a Conv-4 with
transductive BatchNorm; the body really runs once; minibatched inner steps fall back."""

from __future__ import annotations

import copy

import pytest
import torch

from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad import AntitheticES, CheckpointedUnrolled, EpisodicOnline, Implicit, Unrolled
from metaloss.losses import accuracy, cross_entropy, mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit, Proximal
from metaloss.models import MLP, Conv4
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


def mlp_case() -> tuple[BilevelProblem, list[Episode]]:
    torch.manual_seed(0)
    model = MLP(2, (8, 8), 1, activation="tanh").double()
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.3, learn=["lr"]).double(),
                             mse, mse, 3, adapt=["head"], inner_regularizer=Proximal(0.5))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(2, 6, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(2, 7, 2, generator=g, dtype=torch.float64)
    return problem, [Episode(xs[i], xs[i].sin().sum(1, keepdim=True), xq[i], xq[i].sin().sum(1, keepdim=True))
                     for i in range(2)]  # fmt: skip


def conv4_case() -> tuple[BilevelProblem, list[Episode]]:
    torch.manual_seed(0)
    model = apply_batchnorm_policy(Conv4(n_classes=3, filters=4, image_size=12).double(), "transductive")
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.4), cross_entropy,
                             cross_entropy, 2, adapt=["head"], metric=accuracy)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    return problem, [Episode(torch.randn(3, 1, 12, 12, generator=g, dtype=torch.float64), torch.arange(3),
                             torch.randn(6, 1, 12, 12, generator=g, dtype=torch.float64), torch.arange(3).repeat(2))
                     for _ in range(2)]  # fmt: skip


def without_reuse(problem: BilevelProblem) -> BilevelProblem:
    other = copy.copy(problem)
    other.reuse_features = False
    return other


@pytest.mark.parametrize("case", [mlp_case, conv4_case], ids=["mlp", "conv4"])
@pytest.mark.parametrize("estimator", [lambda: Unrolled("full"), lambda: AntitheticES(2, 0.01, seed=0, batched=True)],
                         ids=["unrolled", "es_batched"])  # fmt: skip
def test_reused_features_give_the_same_hypergradient(case, estimator) -> None:
    problem, episodes = case()
    assert problem._head_only() is not None
    reused, recomputed = estimator().estimate(problem, episodes), estimator().estimate(without_reuse(problem), episodes)
    assert reused.outer_loss == pytest.approx(recomputed.outer_loss, rel=1e-10)
    for a, b in zip(reused.grads, recomputed.grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(g.abs().max() > 0 for g in reused.grads)  # the body's init gets its gradient through the features


ESTIMATORS = {
    "implicit_cg": lambda: Implicit("cg", iterations=30),
    "checkpointed": lambda: CheckpointedUnrolled(2),  # several backward passes through the features
    "first_order": lambda: Unrolled("first_order"),
    "truncated": lambda: Unrolled("truncated", truncation=2),
    "tbptt": lambda: EpisodicOnline("tbptt", truncation=2),
    "pes_batched": lambda: EpisodicOnline("pes", truncation=2, particles=4, sigma=0.01, batched=True),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_gets_the_same_hypergradient_with_reused_features(name: str) -> None:
    problem, episodes = mlp_case()
    problem.inner_steps = 6
    reused = ESTIMATORS[name]().estimate(problem, episodes)
    recomputed = ESTIMATORS[name]().estimate(without_reuse(problem), episodes)
    for a, b in zip(reused.grads, recomputed.grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_body_runs_once_per_inner_loop() -> None:
    problem, (episode, _) = conv4_case()
    calls = []
    problem.model.features.register_forward_hook(lambda *args: calls.append(1))
    problem.adapt_to(episode, steps=5)
    reuse = len(calls)
    calls.clear()
    without_reuse(problem).adapt_to(episode, steps=5)
    assert (reuse, len(calls)) == (1, 5)


def test_no_reuse_when_more_than_the_head_adapts_or_with_inner_minibatches() -> None:
    problem, _ = mlp_case()
    for change in ({"adapt": None}, {"inner_batch_size": 2}, {"reuse_features": False}):
        other = copy.copy(problem)
        for key, value in change.items():
            setattr(other, key, value)
        assert other._head_only() is None, change

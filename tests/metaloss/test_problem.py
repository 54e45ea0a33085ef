"""The bilevel problem: which parameters adapt, and which are phi."""

from __future__ import annotations

import copy

import pytest
import torch

from metaloss.errors import ConfigError
from metaloss.losses import mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit, MetaSGD
from metaloss.models import MLP
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


def episode() -> Episode:
    x = torch.linspace(-1, 1, 6).unsqueeze(1)
    return Episode(x, 2 * x, x, 2 * x)


def test_head_only_adaptation_leaves_the_body_at_w0() -> None:
    model = MLP(1, (8,), 1)
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer(lr=0.1), mse, mse, 3, adapt=["head"])
    params, _ = problem.adapt_to(episode())
    assert params["body.0.weight"] is model.body[0].weight
    assert not torch.equal(params["head.weight"], model.head.weight)


def test_meta_parameters_cover_every_meta_module_once() -> None:
    model = MLP(1, (8,), 1)
    problem = BilevelProblem(model, LearnedInit(model), MetaSGD(model), mse, mse, 1)
    n_model = len(list(model.parameters()))
    assert len(problem.meta_parameters()) == 2 * n_model
    assert set(problem.meta_modules()) == {"init", "inner_opt"}
    fixed = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer(lr=0.1), mse, mse, 1)
    assert set(fixed.meta_modules()) == {"init"}


def test_state_dict_round_trip() -> None:
    model = MLP(1, (4,), 1)
    problem = BilevelProblem(model, LearnedInit(model), MetaSGD(model), mse, mse, 1)
    state = copy.deepcopy(problem.state_dict())
    before = [p.detach().clone() for p in problem.meta_parameters()]
    with torch.no_grad():
        for p in problem.meta_parameters():
            p.add_(1.0)
    assert not any(torch.equal(p, b) for p, b in zip(problem.meta_parameters(), before))
    problem.load_state_dict(state)
    for p, b in zip(problem.meta_parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("kwargs", [{"inner_steps": 0}, {"inner_steps": 1, "adapt": ["nothing"]}])
def test_invalid_problems_are_rejected(kwargs) -> None:
    model = MLP(1, (4,), 1)
    with pytest.raises(ConfigError):
        BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer(lr=0.1), mse, mse, **kwargs)


def test_inner_minibatches_walk_the_support_set_and_wrap_around() -> None:
    model = MLP(1, (4,), 1)
    problem = BilevelProblem(
        model, LearnedInit(model), HyperparameterOptimizer(lr=0.1), mse, mse, 3, inner_batch_size=2
    )
    e = episode()  # 6 support rows
    w0, frozen = problem.initial_params()
    objective = problem.inner_objective(e, w0, frozen)
    for t, rows in [(0, [0, 1]), (1, [2, 3]), (3, [0, 1]), (4, [2, 3])]:
        expected = mse(problem.predict(w0, e.support_x[rows]), e.support_y[rows])
        torch.testing.assert_close(objective(w0, t), expected)
    torch.testing.assert_close(objective(w0), mse(problem.predict(w0, e.support_x), e.support_y))  # full batch
    with pytest.raises(ConfigError):
        BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer(lr=0.1), mse, mse, 3, inner_batch_size=0)

"""The bilevel problem: which parameters adapt, and which are phi."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.losses import mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit, MetaSGD
from metaloss.models import MLP
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, LossContext


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


def test_learned_scalars_follow_a_float64_problem_and_give_exact_hypergradients() -> None:
    """A learned lr and L2 coefficient made as float32 scalars are cast to the model's float64, so the
    unrolled hypergradient equals central finite differences in float64 (float32 scalars gave ~1e-7)."""
    from metaloss.hypergrad import Unrolled
    from metaloss.losses import mse
    from metaloss.meta import FixedInit, HyperparameterOptimizer, L2Penalty
    from metaloss.problem import BilevelProblem
    from metaloss.types import Episode

    g = torch.Generator().manual_seed(0)
    x, xq = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(15, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 1, generator=g, dtype=torch.float64)
    episode = Episode(x, x @ w, xq, xq @ w + 0.1)
    model = torch.nn.Linear(3, 1).double()
    inner_opt, penalty = HyperparameterOptimizer("sgd", lr=0.1, learn=["lr"]), L2Penalty(0.2)
    assert {p.dtype for p in (*inner_opt.parameters(), *penalty.parameters())} == {torch.float32}  # as made
    problem = BilevelProblem(model, FixedInit(model), inner_opt, mse, mse, 5, inner_regularizer=penalty)
    phi = problem.meta_parameters()
    assert [p.dtype for p in phi] == [torch.float64, torch.float64]
    grads = Unrolled("full").estimate(problem, [episode]).grads

    def outer(values: list[float]) -> float:
        with torch.no_grad():
            for p, v in zip(phi, values):
                p.fill_(v)
        params, inner = problem.adapt_to(episode, second_order=False)
        return problem.outer_objective(params, inner, episode)[0].item()

    base, h = [p.item() for p in phi], 1e-6
    for i in range(len(phi)):
        up, down = list(base), list(base)
        up[i], down[i] = base[i] + h, base[i] - h
        fd = (outer(up) - outer(down)) / (2 * h)
        assert grads[i].item() == pytest.approx(fd, rel=1e-7, abs=1e-10)


def test_target_params_objective_is_the_squared_distance_to_the_tasks_true_parameters() -> None:
    model = nn.Linear(1, 1)
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer(lr=0.1), mse, mse, 2,
                             meta_objective="target_params")  # fmt: skip
    e = episode()
    target = {"weight": torch.tensor([[2.0]]), "bias": torch.tensor([0.5])}
    e.meta["target_params"] = target
    params, _ = problem.adapt_to(e)
    loss, metrics = problem.query_loss(params, e)
    expected = ((params["weight"] - 2.0) ** 2).sum() + ((params["bias"] - 0.5) ** 2).sum()
    torch.testing.assert_close(loss, expected)
    assert metrics["query_loss"] != metrics["loss"]
    torch.testing.assert_close(metrics["query_loss"], mse(torch.func.functional_call(model, params, (e.query_x,)),
                                                          e.query_y).detach())  # fmt: skip
    with pytest.raises(ConfigError, match="target_params"):
        problem.query_loss(params, episode())  # no true parameters in meta
    e.meta["target_params"] = {"frequency": torch.tensor(1.0)}
    with pytest.raises(ConfigError, match="frequency"):
        problem.query_loss(params, e)


def test_a_loss_that_needs_context_can_predict_with_the_adapted_parameters() -> None:
    """LossContext.predict runs the model with the current (adapted + frozen) parameters on other inputs
    (NPBML's transductive term on the query set); the query labels are never part of the context."""
    seen: list[tuple[Tensor, Tensor]] = []

    class QueryAware(nn.Module):
        needs_context = True

        def forward(self, prediction: Tensor, target: Tensor, context: LossContext) -> Tensor:
            assert context.predict is not None
            query_prediction = context.predict(context.episode.query_x)
            expected = torch.func.functional_call(model, context.params, (context.episode.query_x,))
            seen.append((query_prediction.detach(), expected.detach()))
            return mse(prediction, target) + 0.1 * (query_prediction**2).mean()

    model = MLP(1, (4,), 1)
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer(lr=0.1), QueryAware(), mse, 2,
                             adapt=["head"])  # fmt: skip
    problem.adapt_to(episode())
    assert len(seen) == 2 and not torch.equal(seen[0][0], seen[1][0])  # the second step sees adapted weights
    for got, want in seen:
        torch.testing.assert_close(got, want)


def _mldg_setup():
    from tasks.domain_shift import DomainData, DomainEpisodes, leave_one_domain_out

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 3, generator=g, dtype=torch.float64) + d for d in range(4)]
    data = DomainData("toy", ["a", "b", "c", "d"], xs, [torch.randint(3, (16,), generator=g) for _ in xs], 3)
    episode = DomainEpisodes(leave_one_domain_out(data, "d"), batch_size=5, mode="mldg", seed=1).episode(0)
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    ce = torch.nn.functional.cross_entropy
    problem = BilevelProblem(model=model, init=LearnedInit(model), inner_opt=HyperparameterOptimizer(name="sgd",
                             lr=0.3), inner_loss=ce, outer_loss=ce, inner_steps=1, support_weight=0.7)  # fmt: skip
    return model, problem, episode


def _mldg_loss(model, theta, x, y):
    from torch.func import functional_call

    return torch.nn.functional.cross_entropy(functional_call(model, theta, (x,)), y)


@pytest.mark.parametrize("mode", ["full", "first_order"])
def test_mldg_meta_gradient_equals_the_hand_written_one(mode):
    """MLDG (Li et al. 2018): d/dtheta [lambda F(theta) + G(theta - alpha F'(theta))] (beta = 1 / lambda,
    the objective divided by beta), F on the meta-train domains, G on the meta-test ones; first order:
    the inner gradient F' taken as a constant."""
    from metaloss.hypergrad import Unrolled

    model, problem, episode = _mldg_setup()
    assert episode.meta["meta_test"] and not set(episode.meta["meta_test"]) & set(episode.meta["meta_train"])
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    f = _mldg_loss(model, theta, episode.support_x, episode.support_y)
    inner = torch.autograd.grad(f, list(theta.values()), create_graph=mode == "full", retain_graph=True)
    adapted = {n: theta[n] - 0.3 * g for n, g in zip(names, inner)}
    objective = 0.7 * f + _mldg_loss(model, adapted, episode.query_x, episode.query_y)
    expected = torch.autograd.grad(objective, list(theta.values()))
    out = Unrolled(mode).estimate(problem, [episode])
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(out.grads, expected))
    assert out.metrics["support_loss"] == pytest.approx(float(f))

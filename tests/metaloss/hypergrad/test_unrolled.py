"""The unrolled estimator against exact answers, in float64: central finite differences of the
outer loss, and a hand-written unroll that shares no code with the library's inner loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaloss.errors import ConfigError
from metaloss.hypergrad import Unrolled
from metaloss.hypergrad.base import mean_over_tasks
from metaloss.losses import mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit, MetaSGD, PerStepSGD
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut

T = 3  # inner steps


class TanhMLP(nn.Module):
    """Smooth, so finite differences are exact to O(eps^2) and Hessian terms are non-zero."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh())
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_episodes(n: int = 2, seed: int = 0) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xs, xq = torch.randn(6, 2, generator=g), torch.randn(7, 2, generator=g)
        w = torch.randn(2, 1, generator=g)
        out.append(Episode(xs, torch.sin(xs @ w), xq, torch.sin(xq @ w)).to(dtype=torch.float64))
    return out


def make_problem(inner_opt: str = "sgd", adapt=None, steps: int = T) -> BilevelProblem:
    torch.manual_seed(0)
    model = TanhMLP().double()
    if inner_opt == "sgd":
        opt = HyperparameterOptimizer("sgd", lr=0.3)
    elif inner_opt == "sgd_learned_lr":
        opt = HyperparameterOptimizer("sgd", lr=0.3, learn=["lr"])
    elif inner_opt == "momentum_learned":
        opt = HyperparameterOptimizer("sgd", lr=0.2, momentum=0.6, learn=["lr", "momentum"])
    elif inner_opt == "adam_learned":
        opt = HyperparameterOptimizer("adam", lr=0.05, beta1=0.8, beta2=0.9, learn=["lr", "beta1", "beta2"])
    elif inner_opt == "metasgd":
        opt = MetaSGD(model, lr=0.3)
        with torch.no_grad():  # distinct learning rates per element
            for p in opt.parameters():
                p.uniform_(0.1, 0.5)
    elif inner_opt == "lslr":  # MAML++'s per-layer per-step rates, learned for 2 steps (later steps: the last)
        opt = PerStepSGD(model, steps=2, lr=0.3)
        with torch.no_grad():
            for p in opt.parameters():
                p.uniform_(0.1, 0.5)
    else:
        raise ValueError(inner_opt)
    return BilevelProblem(model, LearnedInit(model), opt.double(), mse, mse, steps, adapt=adapt)


def outer_value(problem: BilevelProblem, episodes: list[Episode]) -> float:
    """J(phi): the mean query loss after the inner loop, with no graph kept."""
    total = 0.0
    for e in episodes:
        params, inner = problem.adapt_to(e, second_order=False, differentiable_steps=0)
        total += problem.outer_objective(params, inner, e)[0].item() / len(episodes)
    return total


def finite_differences(problem: BilevelProblem, episodes: list[Episode], eps: float = 1e-6) -> list[torch.Tensor]:
    grads = []
    for p in problem.meta_parameters():
        g = torch.zeros_like(p)
        flat, gflat = p.data.view(-1), g.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            plus = outer_value(problem, episodes)
            flat[i] = old - eps
            minus = outer_value(problem, episodes)
            flat[i] = old
            gflat[i] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


def assert_grads_close(actual, expected, rtol: float = 1e-6, atol: float = 1e-9) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a = torch.zeros_like(e) if a is None else a
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("inner_opt", ["sgd", "sgd_learned_lr", "momentum_learned", "adam_learned", "metasgd", "lslr"])
def test_full_unroll_matches_finite_differences(inner_opt: str) -> None:
    problem, episodes = make_problem(inner_opt), make_episodes()
    out = Unrolled("full").estimate(problem, episodes)
    assert out.outer_loss == pytest.approx(outer_value(problem, episodes), rel=1e-12)
    assert_grads_close(out.grads, finite_differences(problem, episodes), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("inner_opt", ["sgd_learned_lr", "adam_learned"])
def test_trajectory_meta_objective_matches_finite_differences(inner_opt: str) -> None:
    """meta_objective="inner_mean": (1/T) sum_t L_in(w_t), minibatched (2 of 6 rows per step)."""
    problem, episodes = make_problem(inner_opt), make_episodes()
    problem.meta_objective, problem.inner_batch_size = "inner_mean", 2
    out = Unrolled("full").estimate(problem, episodes)
    assert out.outer_loss == pytest.approx(outer_value(problem, episodes), rel=1e-12)
    assert out.metrics["query_loss"] > 0  # the query loss is still reported
    assert_grads_close(out.grads, finite_differences(problem, episodes), rtol=1e-6, atol=1e-8)


def test_learned_hyperparameters_receive_nonzero_gradients() -> None:
    problem = make_problem("adam_learned")
    out = Unrolled("full").estimate(problem, make_episodes())
    learned = dict(zip([id(p) for p in problem.meta_parameters()], out.grads))
    for name, p in problem.inner_opt.named_parameters():
        assert learned[id(p)] is not None and learned[id(p)].abs().item() > 0, name


def hand_unroll(model: nn.Module, w0: dict, lr, episodes, mode: str, k: int | None = None, adapt=None):
    """Plain SGD unroll written out: w <- w - lr * grad, then the outer loss; returns the mean
    outer loss as a graph over w0 (and lr, when it is a tensor)."""
    total = 0
    for e in episodes:
        frozen = {n: p for n, p in w0.items() if adapt is not None and not n.startswith(adapt)}
        w = {n: p for n, p in w0.items() if n not in frozen}
        for t in range(T):
            if mode == "truncated" and t == T - k:
                w = {n: p.detach().requires_grad_() for n, p in w.items()}
            if mode == "truncated" and t < T - k:
                w = {n: p.detach().requires_grad_() for n, p in w.items()}
            loss = F.mse_loss(functional_call(model, {**frozen, **w}, (e.support_x,)), e.support_y)
            second_order = mode == "full" or (mode == "truncated" and t >= T - k)
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=second_order)
            w = {n: p - lr * g for (n, p), g in zip(w.items(), grads)}
            if mode == "truncated" and t < T - k:
                w = {n: p.detach() for n, p in w.items()}
        total = total + F.mse_loss(functional_call(model, {**frozen, **w}, (e.query_x,)), e.query_y) / len(episodes)
    return total


@pytest.mark.parametrize(("mode", "k"), [("full", None), ("first_order", None), ("truncated", 1), ("truncated", 2)])
def test_matches_hand_written_unroll(mode: str, k: int | None) -> None:
    problem, episodes = make_problem("sgd_learned_lr"), make_episodes(3, seed=1)
    out = Unrolled(mode, truncation=k).estimate(problem, episodes)
    phi = problem.meta_parameters()
    model = problem.model
    lr = problem.inner_opt.learned["lr"]
    expected = torch.autograd.grad(
        hand_unroll(model, dict(model.named_parameters()), lr, episodes, mode, k), phi, allow_unused=True
    )
    assert_grads_close(out.grads, [torch.zeros_like(p) if g is None else g for p, g in zip(phi, expected)], 1e-10)


def test_modes_differ_so_the_comparisons_can_fail() -> None:
    problem, episodes = make_problem(), make_episodes()
    full = Unrolled("full").estimate(problem, episodes).grads
    first = Unrolled("first_order").estimate(problem, episodes).grads
    trunc = Unrolled("truncated", truncation=1).estimate(problem, episodes).grads
    assert max((a - b).abs().max().item() for a, b in zip(full, first)) > 1e-4
    # truncation cuts w0 from the graph: the initialisation gets no gradient at all
    assert all(g is None or g.abs().max().item() == 0 for g in trunc)


def test_truncation_covering_every_step_equals_full() -> None:
    problem, episodes = make_problem("momentum_learned"), make_episodes()
    full = Unrolled("full").estimate(problem, episodes).grads
    assert_grads_close(Unrolled("truncated", truncation=T).estimate(problem, episodes).grads, full, 1e-12, 0)
    assert_grads_close(Unrolled("truncated", truncation=T + 5).estimate(problem, episodes).grads, full, 1e-12, 0)


def test_head_only_adaptation_matches_hand_written_unroll() -> None:
    problem, episodes = make_problem(adapt=["head"]), make_episodes()
    out = Unrolled("full").estimate(problem, episodes)
    model = problem.model
    expected = torch.autograd.grad(
        hand_unroll(model, dict(model.named_parameters()), 0.3, episodes, "full", adapt="head"),
        problem.meta_parameters(),
    )
    assert_grads_close(out.grads, list(expected), 1e-10)
    assert_grads_close(out.grads, finite_differences(problem, episodes), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("adapt", [None, ["head"]])
def test_per_step_batchnorm_matches_hand_written_unroll(adapt) -> None:
    """MAML++'s per-step BatchNorm (Conv-4 with 4 affine pairs, 2 inner steps): support step t runs
    with pair t, the query with the last pair, 3; pair 2 is used by neither and gets no gradient.
    Head-only adaptation must not reuse the body's features across steps."""
    from metaloss.models import Conv4

    torch.manual_seed(0)
    model = Conv4(3, in_channels=1, filters=3, image_size=12, norm="batch_per_step", norm_steps=4).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] == 4:
                p.add_(0.3 * torch.randn_like(p))
    lr = 0.3
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=lr), F.cross_entropy,
                             F.cross_entropy, 2, adapt=adapt)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    episodes = [Episode(torch.randn(3, 1, 12, 12, generator=g, dtype=torch.float64), torch.arange(3),
                        torch.randn(6, 1, 12, 12, generator=g, dtype=torch.float64), torch.arange(3).repeat(2))
                for _ in range(2)]  # fmt: skip
    out = Unrolled("full").estimate(problem, episodes)
    w0 = dict(model.named_parameters())
    total = 0
    for e in episodes:
        frozen = {n: p for n, p in w0.items() if adapt is not None and not n.startswith("head")}
        w = {n: p for n, p in w0.items() if n not in frozen}
        for t in range(2):
            loss = F.cross_entropy(functional_call(model, {**frozen, **w}, (e.support_x,), {"step": t}), e.support_y)
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            w = {n: p - lr * gw for (n, p), gw in zip(w.items(), grads)}
        query = functional_call(model, {**frozen, **w}, (e.query_x,), {"step": 3})
        total = total + F.cross_entropy(query, e.query_y) / len(episodes)
    expected = torch.autograd.grad(total, problem.meta_parameters())
    assert_grads_close(out.grads, list(expected), 1e-10, 1e-13)
    by_name = dict(zip([n for n, _ in model.named_parameters()], out.grads))
    pairs = by_name["features.1.weight"]  # [4, 3]
    assert (pairs[[0, 1, 3]].abs().amax(dim=1) > 0).all() and (pairs[2] == 0).all()


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigError):
        Unrolled("sideways")
    with pytest.raises(ConfigError):
        Unrolled("truncated")
    with pytest.raises(ConfigError):
        Unrolled().estimate(make_problem(), [])


@pytest.mark.parametrize("mode", ["full", "first_order", "truncated"])
def test_the_task_loop_summed_in_grad_equals_the_sum_of_returned_gradients_bit_for_bit(mode: str) -> None:
    """`summed_in_grad` (backward into .grad) against summing each task's `autograd.grad`, and the
    caller's .grad given back as they were; a meta-parameter no task reaches stays None."""
    problem, episodes = make_problem("sgd_learned_lr"), make_episodes(3)
    estimator = Unrolled(mode, truncation=1 if mode == "truncated" else None)
    phi = problem.meta_parameters()
    summed, returned = summed_and_returned(problem, episodes, estimator._task)
    for a, b in zip(summed.grads, returned.grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    # one differentiated step does not reach the initialisation (the learned rate only)
    assert sum(g is None for g in summed.grads) == (len(phi) - 1 if mode == "truncated" else 0)


def summed_and_returned(problem: BilevelProblem, episodes: list[Episode], task) -> tuple[HypergradOut, HypergradOut]:
    """`mean_over_tasks` of `task` summed in .grad and summed from returned gradients; checks that the
    caller's .grad are given back as they were and that the metrics agree."""
    phi = problem.meta_parameters()
    callers = [torch.full_like(p, 7.0) for p in phi]
    for p, g in zip(phi, callers):
        p.grad = g
    summed = mean_over_tasks(problem, episodes, task, accumulates=True)
    returned = mean_over_tasks(problem, episodes, task, accumulates=False)
    assert all(p.grad is g for p, g in zip(phi, callers))
    assert summed.metrics == returned.metrics
    return summed, returned


def test_add_into_grad_owns_its_first_gradient_when_it_is_a_view() -> None:
    """A gradient can arrive as an expanded view (stride 0, as autograd may give for a sum):
    `add_into_grad` copies it before adding in place; a plain tensor is taken over as it is."""
    from metaloss.hypergrad.base import add_into_grad

    p, q = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    expanded, plain = torch.ones(1).expand(3), torch.tensor([1.0, 2.0, 3.0])
    add_into_grad([p, q], [expanded, plain])
    add_into_grad([p, q], [torch.full((3,), 2.0), torch.ones(3)])
    assert torch.equal(p.grad, torch.full((3,), 3.0)) and torch.equal(expanded, torch.ones(3))
    assert q.grad is plain and torch.equal(plain, torch.tensor([2.0, 3.0, 4.0]))


def test_sum_gradients_gives_the_elementwise_sums_bit_for_bit_and_keeps_the_unreached() -> None:
    """The task loop's running sum: one multi-tensor kernel where both lists are full, the same values
    as `a + b` per meta-parameter (float32 rounding included); None where neither side is reached,
    the other side where one is; the inputs are left as they were (expanded views included)."""
    from metaloss.hypergrad.base import sum_gradients

    torch.manual_seed(0)
    a = [torch.randn(5, 3), torch.randn(7), torch.ones(1).expand(4)]
    b = [torch.randn(5, 3), torch.randn(7), torch.randn(4)]
    copies = [t.clone() for t in a + b]
    full = sum_gradients(a, b)
    assert all(torch.equal(s, x + y) for s, x, y in zip(full, a, b))
    assert all(torch.equal(t, c) for t, c in zip(a + b, copies))
    mixed = sum_gradients([None, a[1], None], [b[0], b[1], None])
    assert mixed[0] is b[0] and torch.equal(mixed[1], a[1] + b[1]) and mixed[2] is None
    assert sum_gradients([], []) == []  # no meta-parameters: no multi-tensor kernel (it refuses empty lists)

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
from metaloss.meta import FixedInit, HyperparameterOptimizer, ML3Loss, ML3RegressionLoss, NPBMLLoss, TaylorGLOLoss
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
        loss = {
            "ml3": lambda: ML3Loss(hidden=(6,)),
            "taylorglo": lambda: TaylorGLOLoss((0.1, -0.2), (0.3, -0.5, 0.2, 1.0, 0.4, -0.3)),
            "npbml": lambda: _perturbed_film(NPBMLLoss(3, hidden=(5, 4))),
        }[name]()
        outer, episode = cross_entropy, classification_episode()
    problem = BilevelProblem(model, FixedInit(model), HyperparameterOptimizer("sgd", lr=0.5), loss, outer, steps)
    return problem, episode


def outer_loss(problem: BilevelProblem, episode: Episode) -> float:
    params, inner = problem.adapt_to(episode, second_order=False)
    return problem.outer_objective(params, inner, episode)[0].item()


def _perturbed_film(loss: NPBMLLoss) -> NPBMLLoss:
    """FiLM starts at the identity (gamma = beta = 0); move it off, so the test sees FiLM at work."""
    with torch.no_grad():
        for p in loss.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return loss


FAMILIES = ["ml3", "ml3_regression", "taylorglo", "npbml"]


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


def test_residual_ml3_starts_as_cross_entropy_and_learns_a_correction():
    logits, target = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    loss = ML3Loss(hidden=(8,), residual=True).double()
    torch.testing.assert_close(loss(logits, target, reduction="none"),
                               torch.nn.functional.cross_entropy(logits, target, reduction="none"))  # fmt: skip
    loss(logits, target).backward()
    assert loss.net.head.weight.grad.abs().sum() > 0  # the meta-gradient reaches the zero-started layer
    with torch.no_grad():
        loss.net.head.bias.fill_(0.25)
    torch.testing.assert_close(loss(logits, target) - torch.nn.functional.cross_entropy(logits, target),
                               torch.tensor(4 * 0.25, dtype=torch.float64))  # fmt: skip
    assert ML3Loss(residual=True).config() == {"hidden": [50, 50], "residual": True}


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


def npbml_context(episode: Episode, params: dict) -> LossContext:
    model = nn.Linear(3, 3).double()
    from metaloss.functional import forward

    return LossContext(episode.support_x, params, 0, episode, lambda x: forward(model, params, x))


def test_npbml_loss_reads_the_query_inputs_but_never_the_query_labels():
    """The transductive term and FiLM change with the query inputs; the query labels are not read."""
    torch.manual_seed(0)
    loss = _perturbed_film(NPBMLLoss(3, hidden=(5,))).double()
    episode = classification_episode()
    params = {n: p.detach() for n, p in nn.Linear(3, 3).double().named_parameters()}
    logits = npbml_context(episode, params).predict(episode.support_x)
    value = loss(logits, episode.support_y, npbml_context(episode, params))
    relabelled = Episode(episode.support_x, episode.support_y, episode.query_x, (episode.query_y + 1) % 3)
    assert loss(logits, episode.support_y, npbml_context(relabelled, params)) == value
    moved = Episode(episode.support_x, episode.support_y, episode.query_x + 1.0, episode.query_y)
    assert loss(logits, episode.support_y, npbml_context(moved, params)) != value


@pytest.mark.parametrize("switch", ["transductive", "regularizer", "film"])
def test_npbml_ablation_switches_remove_their_term(switch):
    """Each switch removes exactly its term: the loss without it equals the full loss with that
    term's network silenced (FiLM: gamma = beta = 0; a term: its output pushed to softplus ~ 0)."""
    torch.manual_seed(1)
    full = _perturbed_film(NPBMLLoss(3, hidden=(5,))).double()
    reduced = NPBMLLoss(3, hidden=(5,), **{switch: False}).double()
    reduced.load_state_dict(full.state_dict(), strict=False)
    episode = classification_episode()
    params = {n: p.detach() for n, p in nn.Linear(3, 3).double().named_parameters()}
    context = npbml_context(episode, params)
    logits = context.predict(episode.support_x)
    with torch.no_grad():
        if switch == "film":
            for layer in [*full.inductive_net.film, *full.transductive_net.film]:
                layer.weight.zero_()
                layer.bias.zero_()
        else:
            net = full.transductive_net if switch == "transductive" else full.regularizer_net
            net.out.weight.zero_()
            net.out.bias.fill_(-60.0)  # softplus(-60) ~ 1e-26
    torch.testing.assert_close(full(logits, episode.support_y, context), reduced(logits, episode.support_y, context))


def test_npbml_weight_statistics_are_the_papers_four():
    from metaloss.meta.loss import _weight_statistics

    w = torch.tensor([[1.0, -2.0], [3.0, -4.0]], dtype=torch.float64)
    mean, std, l1, l2 = _weight_statistics(w).tolist()
    assert mean == pytest.approx(-0.5)
    assert std == pytest.approx((sum((v + 0.5) ** 2 for v in (1, -2, 3, -4)) / 4) ** 0.5)
    assert l1 == pytest.approx(10 / 4)  # the L1 norm (p = 1), size-normalised: not the p = 2 of the public code
    assert l2 == pytest.approx((30 / 4) ** 0.5)


def test_npbml_meta_gradient_is_finite_with_constant_parameters_such_as_batchnorm():
    """Regression: a BatchNorm weight starts at ones and its bias at zeros; torch's std has a NaN
    double backward at a constant tensor, so the regulariser's std made the unrolled meta-gradient
    NaN (every meta-step of algorithm=npbml on Conv-4 was skipped)."""
    from metaloss.functional import apply_batchnorm_policy
    from metaloss.meta import LearnedInit
    from metaloss.meta.loss import _weight_statistics

    w = torch.ones(4, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((a * _weight_statistics(w)).sum(), w, create_graph=True)
    (h,) = torch.autograd.grad((g * torch.arange(4.0, dtype=torch.float64)).sum(), a)
    assert torch.isfinite(h)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
    apply_batchnorm_policy(model, "transductive")
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.5),
                             NPBMLLoss(3, hidden=(5,)).double(), cross_entropy, 2)  # fmt: skip
    out = Unrolled("full").estimate(problem, [classification_episode()])
    assert all(g is not None and torch.isfinite(g).all() for g in out.grads)
    assert all(g.abs().sum() > 0 for g in out.grads[2:4])  # the BatchNorm weight and bias are learned

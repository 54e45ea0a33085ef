"""Learned inner optimizers (NPBML's warp preconditioner, the MLP update rule) as meta-objects, in
float64: at the start the preconditioner is plain SGD; the unrolled hypergradient equals central
finite differences; the checkpointed and the full-window truncated estimators equal the unrolled
one; ES gives the same numbers batched and looped; ES, PES and ES-Single are unbiased for the
unrolled hypergradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaloss.hypergrad import AntitheticES, CheckpointedUnrolled, EpisodicOnline, Unrolled
from metaloss.inner.optim import sgd
from metaloss.losses import cross_entropy
from metaloss.meta import FixedInit, LearnedInit, MLPUpdateRule, WarpPreconditioner
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


def episode(seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    x, xq = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64)
    return Episode(x, (x @ w).argmax(-1), xq, (xq @ w).argmax(-1))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def warp(m: nn.Module, max_block: int = 1024) -> WarpPreconditioner:
    """Factors moved off the identity (a symmetric point would hide transposition mistakes)."""
    opt = WarpPreconditioner(m, lr=0.3, max_block=max_block).double()
    with torch.no_grad():
        for p in opt.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return opt


def problem_for(name: str, steps: int = 3) -> BilevelProblem:
    m = model()
    if name == "warp":
        return BilevelProblem(m, LearnedInit(m), warp(m), cross_entropy, cross_entropy, steps)
    if name == "warp_diagonal":  # factors over 3 rows are diagonal
        return BilevelProblem(m, LearnedInit(m), warp(m, max_block=3), cross_entropy, cross_entropy, steps)
    torch.manual_seed(1)
    rule = MLPUpdateRule(hidden=5, step_mult=0.1, exp_mult=0.5).double()
    return BilevelProblem(m, FixedInit(m), rule, cross_entropy, cross_entropy, steps)


NAMES = ["warp", "warp_diagonal", "mlp_update_rule"]


def outer_loss(problem: BilevelProblem, ep: Episode) -> float:
    params, inner = problem.adapt_to(ep, second_order=False)
    return problem.outer_objective(params, inner, ep)[0].item()


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_the_preconditioner_starts_as_sgd():
    m = model()
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    expected, _ = sgd(0.3).update(grads, {}, params)
    opt = WarpPreconditioner(m, lr=0.3)()
    got, _ = opt.update(grads, opt.init(params), params)
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=0)


def test_the_preconditioner_is_the_kronecker_block_it_claims():
    """vec(L G R) = (R^T kron L) vec(G), column-major: one block per tensor."""
    m = model()
    opt_module = warp(m)  # float64, like the model
    w = dict(m.named_parameters())["2.weight"].detach()
    g = torch.randn_like(w)
    new, _ = opt_module().update({"2.weight": g}, {}, {"2.weight": w})
    left, right = opt_module.left["2__weight"].detach(), opt_module.right["2__weight"].detach()
    block = torch.kron(right.T.contiguous(), left)  # acts on column-major vec
    step = (block @ g.T.reshape(-1)).reshape(w.shape[1], w.shape[0]).T
    torch.testing.assert_close(w - new["2.weight"], 0.3 * step)


@pytest.mark.parametrize("name", NAMES)
def test_unrolled_hypergradient_of_a_learned_optimizer_equals_finite_differences(name):
    problem, ep = problem_for(name), episode()
    phi = problem.meta_parameters()
    grads = Unrolled("full").estimate(problem, [ep]).grads
    h = 1e-6
    checked = 0
    for p, g in zip(phi, grads):
        if isinstance(problem.init, LearnedInit) and any(p is q for q in problem.init.parameters()):
            continue  # the initialisation's gradient is tested elsewhere; the optimizer's is the point here
        flat_p, g_flat = p.data.view(-1), g.reshape(-1)
        for i in range(flat_p.numel()):
            saved = flat_p[i].item()
            flat_p[i] = saved + h
            up = outer_loss(problem, ep)
            flat_p[i] = saved - h
            down = outer_loss(problem, ep)
            flat_p[i] = saved
            assert g_flat[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
            checked += 1
    assert checked > 20 and flat(grads).abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_and_full_window_truncated_equal_unrolled(name):
    problem, ep = problem_for(name, steps=5), episode()
    full = Unrolled("full").estimate(problem, [ep]).grads
    checkpointed = CheckpointedUnrolled(segment=2).estimate(problem, [ep]).grads
    truncated = Unrolled("truncated", truncation=5).estimate(problem, [ep]).grads
    for a, b, c in zip(full, checkpointed, truncated):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_truncation_cuts_the_learned_optimizer_gradient_to_the_last_steps():
    """K < T: the hypergradient is that of the last K steps from a detached state, not the full one
    (and not zero: the update rule's weights act inside the window)."""
    problem, ep = problem_for("mlp_update_rule", steps=4), episode()
    full = flat(Unrolled("full").estimate(problem, [ep]).grads)
    truncated = flat(Unrolled("truncated", truncation=2).estimate(problem, [ep]).grads)
    assert truncated.abs().sum() > 0 and not torch.allclose(full, truncated)


@pytest.mark.parametrize("name", NAMES)
def test_es_over_a_learned_optimizer_is_the_same_batched_and_looped(name):
    problem, ep = problem_for(name), episode()
    looped = AntitheticES(particles=3, sigma=0.01, seed=2).estimate(problem, [ep])
    batched = AntitheticES(particles=3, sigma=0.01, seed=2, batched=True).estimate(problem, [ep])
    for a, b in zip(looped.grads, batched.grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["es", "pes", "es_single"])
def test_es_family_is_unbiased_for_a_learned_optimizer(kind):
    """The MLP update rule on a fixed init, T = 2: the mean of 300 estimates lies within 4 standard
    errors of the unrolled hypergradient in every coordinate, and the standard error is small
    enough to mean something."""
    problem, ep = problem_for("mlp_update_rule", steps=2), episode()
    exact = flat(Unrolled("full").estimate(problem, [ep]).grads)
    if kind == "es":
        estimator = AntitheticES(particles=8, sigma=1e-3, seed=3, batched=True)
    else:
        estimator = EpisodicOnline(kind, truncation=1, particles=8, sigma=1e-3, seed=3, batched=True)
    samples = torch.stack([flat(estimator.estimate(problem, [ep]).grads) for _ in range(300)])
    mean, se = samples.mean(0), samples.std(0) / len(samples) ** 0.5
    assert ((mean - exact).abs() < 4 * se + 1e-9).all(), (mean, exact, se)
    assert (se < exact.abs().max()).all()

"""The identity-Hessian look-ahead estimator (MLC's and EMLC's approximation) against exact answers in
float64: at K = 1 both modes equal the exact one-step meta-gradient (truncated backpropagation) through
SGD with momentum and weight decay and through Adam; EMLC's forward-mode (jvp) terms equal the
reverse-mode ones; at K = 3 the estimate equals the discounted sum of one-step terms computed by central
differences; the exact K-step label-correction meta-gradient equals central differences of the
look-ahead's meta loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaloss.errors import ConfigError
from metaloss.hypergrad import EpisodicOnline, IdentityHessian, TruncatedBackprop
from metaloss.lookahead import LookaheadTraining
from metaloss.meta import FixedInit, HyperparameterOptimizer
from metaloss.meta.correction import CorrectedLoss, GatedCorrector, LabelCorrector
from metaloss.online import broadcast
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

torch.set_num_threads(1)
N, M, D, C, B = 24, 10, 4, 3, 4  # training rows, meta rows, features, classes, batch
OPTIMIZERS = {
    "momentum": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.05},
}
CORRECTORS = {
    "mlc": lambda: LabelCorrector(C, hidden=(5,), embed=2, seed=2),
    "mlc_inputs": lambda: LabelCorrector(C, features="inputs", in_features=D, hidden=(5,), embed=2, seed=2),
    "emlc": lambda: GatedCorrector(C, D, hidden=(5,), embed=2, gate_hidden=(3,), seed=2),
}


def setup(optimizer: str, corrector: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    episode = Episode(
        torch.randn(N, D, generator=g, dtype=torch.float64),
        torch.randint(C, (N,), generator=g),
        torch.randn(M, D, generator=g, dtype=torch.float64),
        torch.randint(C, (M,), generator=g),
    )
    model = nn.Linear(D, C).double()
    problem = BilevelProblem(model=model, init=FixedInit(model), inner_opt=HyperparameterOptimizer(
        **OPTIMIZERS[optimizer]), inner_loss=CorrectedLoss(CORRECTORS[corrector]()), outer_loss=F.cross_entropy,
        inner_steps=1, inner_batch_size=B, shuffle_seed=3)  # fmt: skip
    system = LookaheadTraining(problem, episode, horizon=12, meta_batch_size=5, seed=4)
    phi = problem.meta_parameters()
    state = system.init(1)
    state, _ = system.unroll(state, broadcast(phi, 1), 2)  # two steps in: non-zero momentum / Adam moments
    state = system._real_steps(state, broadcast(phi, 1))  # taken now, so the start does not move with phi
    return problem, system, phi, state


def estimate(estimator, system, state, phi):
    estimator.state, estimator.count = state, 0
    return estimator.estimate(system, phi).grads


def close(a, b, rtol=1e-7, atol=1e-10):
    return all(torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b))


@pytest.mark.parametrize("corrector", sorted(CORRECTORS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_one_step_identity_hessian_is_the_exact_meta_gradient_in_both_modes(optimizer, corrector):
    problem, system, phi, state = setup(optimizer, corrector)
    exact = estimate(TruncatedBackprop(1), system, state, phi)
    reverse = estimate(IdentityHessian(1, eta=0.3, mode="reverse"), system, state, phi)
    forward = estimate(IdentityHessian(1, eta=0.3, mode="forward"), system, state, phi)
    assert all(g is not None and g.abs().sum() > 0 for g in exact)
    assert close(reverse, exact) and close(forward, exact)


def test_k_step_estimate_is_the_discounted_sum_of_finite_difference_one_step_terms():
    problem, system, phi, state = setup("momentum", "emlc")
    eta, K, h = 0.3, 3, 1e-6
    reverse = estimate(IdentityHessian(K, eta=eta, mode="reverse"), system, state, phi)
    forward = estimate(IdentityHessian(K, eta=eta, mode="forward"), system, state, phi)
    assert close(reverse, forward)

    _, look = system.lookahead(state, broadcast(phi, 1), K)
    final = {n: w.detach().requires_grad_() for n, w in look.final.items()}
    g = torch.autograd.grad(system.meta_loss(look.problem, final, look.meta), list(final.values()))

    def scalar(values):  # sum_k (1-eta)^(K-1-k) <g, w_{k+1}(phi)> from the recorded w_k, + the direct phi terms
        at = dataclasses.replace(look, problem=problem.with_meta_parameters(values))
        with torch.no_grad():
            total = system.meta_loss(at.problem, look.final, look.meta)
            for k in range(K):
                stepped = system.step_from(at, k)
                total = total + (1 - eta) ** (K - 1 - k) * sum((gi * stepped[n]).sum() for gi, n in zip(g, stepped))
        return float(total)

    expected = []
    for i, p in enumerate(phi):
        grad = torch.zeros_like(p)
        for j in range(p.numel()):
            up = [q.detach().clone() for q in phi]
            down = [q.detach().clone() for q in phi]
            up[i].view(-1)[j] += h
            down[i].view(-1)[j] -= h
            grad.view(-1)[j] = (scalar(up) - scalar(down)) / (2 * h)
        expected.append(grad)
    assert close(reverse, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_exact_k_step_label_correction_meta_gradient_equals_finite_differences(optimizer):
    # the corrector on the inputs: with the model's (stop-gradient) logits as features, the engine's
    # meta-gradient leaves out, by design, what finite differences see through them at steps k >= 1
    problem, system, phi, state = setup(optimizer, "mlc_inputs")
    K, h = 3, 1e-6
    exact = estimate(TruncatedBackprop(K), system, state, phi)

    def meta_loss(values):
        return float(system.unroll(state, [v[None] for v in values], K)[1].sum())

    for i, p in enumerate(phi):
        for j in range(p.numel()):
            up = [q.detach().clone() for q in phi]
            down = [q.detach().clone() for q in phi]
            up[i].view(-1)[j] += h
            down[i].view(-1)[j] -= h
            fd = (meta_loss(up) - meta_loss(down)) / (2 * h)
            assert abs(exact[i].view(-1)[j].item() - fd) < 1e-6 + 1e-5 * abs(fd)


def test_k_step_identity_hessian_differs_from_the_exact_meta_gradient():
    problem, system, phi, state = setup("momentum", "mlc")
    exact = torch.cat([g.flatten() for g in estimate(TruncatedBackprop(3), system, state, phi)])
    approx = torch.cat([g.flatten() for g in estimate(IdentityHessian(3, eta=0.3), system, state, phi)])
    cosine = F.cosine_similarity(exact, approx, dim=0)
    assert 0 < cosine < 1 - 1e-6  # an approximation: aligned, not equal


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="mode"):
        IdentityHessian(1, eta=0.1, mode="sideways")
    with pytest.raises(ConfigError, match="eta"):
        IdentityHessian(1, eta=2.5)
    with pytest.raises(ConfigError, match="hypergrad.eta"):
        EpisodicOnline(kind="identity_hessian", update="truncation")
    with pytest.raises(ConfigError, match="one particle"):
        EpisodicOnline(kind="identity_hessian_jvp", eta=0.1, batched=True)

"""The meta-learned transition matrix (forward loss correction): T's rows are distributions and start
at the symmetric-noise matrix of `init_rate`; the loss is -log (softmax(f) T)[y~] computed naively;
the one-step look-ahead's meta-gradient with respect to T's logits, through SGD with momentum and
weight decay, equals central finite differences in float64; bad settings are one clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaloss.errors import ConfigError
from metaloss.lookahead import LookaheadTraining
from metaloss.meta import FixedInit, HyperparameterOptimizer
from metaloss.meta.transition import TransitionLoss, symmetric_transition
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

torch.set_num_threads(1)


def test_the_matrix_starts_as_symmetric_noise_and_its_rows_are_distributions():
    t = symmetric_transition(4, 0.6)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert torch.allclose(t.diagonal(), torch.full((4,), 0.4)) and torch.allclose(t[0, 1:], torch.full((3,), 0.2))
    loss = TransitionLoss(4, init_rate=0.6)
    torch.testing.assert_close(loss.transition(), t, atol=1e-6, rtol=0)
    assert [n for n, _ in loss.named_parameters()] == ["theta"]
    fixed = TransitionLoss(4, init_rate=0.6, learn=False)
    assert list(fixed.parameters()) == [] and torch.equal(fixed.transition(), loss.transition().detach())


def test_the_loss_is_the_forward_corrected_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(5, (6,), generator=g)
    loss = TransitionLoss(5, init_rate=0.3).double()
    with torch.no_grad():
        loss.theta.add_(torch.randn(5, 5, generator=g, dtype=torch.float64))  # an asymmetric T
    noisy = logits.softmax(1) @ loss.transition()  # [B, C], P(noisy label | x)
    torch.testing.assert_close(loss(logits, y), -noisy[torch.arange(6), y].log().mean())
    # T = I (up to the 1e-6 floor): plain cross-entropy
    torch.testing.assert_close(TransitionLoss(5, init_rate=0.0).double()(logits, y), F.cross_entropy(logits, y),
                               atol=1e-5, rtol=0)  # fmt: skip
    # stable where the model is certain: no log(0)
    sure = torch.tensor([[60.0, -60.0, -60.0]], dtype=torch.float64)
    assert torch.isfinite(TransitionLoss(3, 0.2).double()(sure, torch.tensor([1])))


def test_the_lookahead_meta_gradient_of_the_matrix_equals_finite_differences():
    n, m, d, c, b = 16, 8, 3, 3, 4
    g = torch.Generator().manual_seed(1)
    episode = Episode(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(c, (n,), generator=g),
                      torch.randn(m, d, generator=g, dtype=torch.float64), torch.randint(c, (m,), generator=g))
    torch.manual_seed(0)
    model = nn.Linear(d, c).double()
    loss = TransitionLoss(c, init_rate=0.4).double()
    with torch.no_grad():
        loss.theta.add_(0.3 * torch.randn(c, c, generator=g, dtype=torch.float64))
    inner_opt = HyperparameterOptimizer("sgd", lr=0.5, momentum=0.9, weight_decay=0.01)
    problem = BilevelProblem(model=model, init=FixedInit(model), inner_opt=inner_opt, inner_loss=loss,
                             outer_loss=F.cross_entropy, inner_steps=1, inner_batch_size=b, shuffle_seed=3)  # fmt: skip
    system = LookaheadTraining(problem, episode, horizon=8, meta_batch_size=5, seed=4)
    phi = problem.meta_parameters()
    assert len(phi) == 1 and phi[0] is loss.theta
    theta0 = [loss.theta.detach().unsqueeze(0)]
    start, _ = system.unroll(system.init(1), theta0, 2)  # a look-ahead over steps 0-1, real steps pending
    start = system._real_steps(start, theta0)  # taken with the starting T: momentum built up, nothing pending

    def meta_loss(theta):
        return system.unroll(start, [theta.unsqueeze(0)], 2)[1].sum()  # a two-step look-ahead from there

    theta = loss.theta.detach().clone().requires_grad_()
    got = torch.autograd.grad(meta_loss(theta), theta)[0]
    want, eps = torch.zeros_like(got), 1e-6
    for i in range(c):
        for j in range(c):
            e = torch.zeros_like(got)
            e[i, j] = eps
            with torch.no_grad():
                want[i, j] = (meta_loss(theta + e) - meta_loss(theta - e)) / (2 * eps)
    assert want.abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_classes": 1}, "n_classes >= 2"),
    ({"n_classes": 10, "init_rate": 1.0}, r"init_rate must be in \[0, 1\)"),
    ({"n_classes": 10, "init_rate": -0.1}, r"init_rate must be in \[0, 1\)"),
    ({"n_classes": 4, "init_rate": 0.8}, "no more likely than any other"),
    ({"n_classes": 4, "init_rate": 0.75}, "no more likely than any other"),  # a uniform T: nothing to learn from
])  # fmt: skip
def test_bad_settings_are_one_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TransitionLoss(**kwargs)


def test_a_model_of_another_width_is_refused():
    with pytest.raises(ConfigError, match="3 classes, the model 4"):
        TransitionLoss(3)(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))

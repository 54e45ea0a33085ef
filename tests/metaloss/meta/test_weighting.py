"""Per-sample weighting meta-objects: MW-Net's loss-to-weight net and weighted loss, L2RW's weights
from the look-ahead's meta-gradient (an online L2RW step equals a hand-written one in float64, momentum
included), and the clean/noisy separation metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaloss.errors import ConfigError
from metaloss.hypergrad import TruncatedBackprop
from metaloss.lookahead import LookaheadTraining, meta_rows
from metaloss.meta import FixedInit, HyperparameterOptimizer
from metaloss.meta.weighting import AssignGradient, ExampleWeights, LossToWeight, WeightedLoss, weight_separation
from metaloss.online import online_meta_train
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

torch.set_num_threads(1)


def test_the_weight_net_is_mwnets_1_100_1_sigmoid_mlp_and_seeded():
    net = LossToWeight(seed=3)
    linears = [m for m in net.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1, 100), (100, 1)]
    v = net(torch.linspace(0, 5, 7))
    assert v.shape == (7,) and ((v > 0) & (v < 1)).all()
    assert torch.equal(v, LossToWeight(seed=3)(torch.linspace(0, 5, 7)))
    assert not torch.equal(v, LossToWeight(seed=4)(torch.linspace(0, 5, 7)))


class Fixed(nn.Module):
    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        self.v = v

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.v


@pytest.mark.parametrize("normalize", [False, True])
def test_the_weighted_loss_is_the_weighted_mean_or_the_normalised_sum(normalize):
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 0, 1])
    v = torch.tensor([1.0, 0.5, 0.0])
    per_sample = F.cross_entropy(logits, y, reduction="none")
    expected = (v * per_sample).sum() / (v.sum() if normalize else 3)
    torch.testing.assert_close(WeightedLoss(Fixed(v), normalize=normalize)(logits, y), expected)
    torch.testing.assert_close(WeightedLoss(Fixed(v)).weights(logits, y), v)


def test_the_weight_net_reads_detached_losses():
    seen = {}

    class Spy(nn.Module):
        def forward(self, losses):
            seen["requires_grad"] = losses.requires_grad
            return torch.ones_like(losses)

    logits = torch.randn(4, 3, requires_grad=True)
    WeightedLoss(Spy())(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert seen["requires_grad"] is False and logits.grad is not None


def test_l2rw_weights_are_zero_with_the_identity_derivative_in_the_lookahead_and_normalised_after():
    weights = ExampleWeights(4)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    v = weights(losses)
    assert torch.equal(v.detach(), torch.zeros(4))
    (g,) = torch.autograd.grad((v * losses).sum(), weights.eps)
    assert torch.equal(g, losses)
    eps = torch.tensor([-2.0, 1.0, -6.0, 0.0])  # phi after AssignGradient: the meta-gradient
    detached = torch.func.functional_call(weights, {"eps": eps}, (losses,))
    assert torch.allclose(detached, torch.tensor([2.0, 0.0, 6.0, 0.0]) / 8 * 4)  # v_i * B, sum v_i = 1
    nothing = torch.func.functional_call(weights, {"eps": torch.ones(4)}, (losses,))
    assert torch.equal(nothing, torch.zeros(4))  # no example helps: no step
    with pytest.raises(ConfigError, match="minibatches of 4"):
        weights(torch.ones(5))


def test_an_online_l2rw_run_equals_hand_written_l2rw_with_momentum():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n, m, d, c, b = 16, 6, 3, 3, 4
    episode = Episode(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(c, (n,), generator=g),
                      torch.randn(m, d, generator=g, dtype=torch.float64), torch.randint(c, (m,), generator=g))
    model = nn.Linear(d, c).double()
    opt = {"name": "sgd", "lr": 0.5, "momentum": 0.9}
    problem = BilevelProblem(model, FixedInit(model), HyperparameterOptimizer(**opt),
                             WeightedLoss(ExampleWeights(b)).double(), F.cross_entropy, 1, inner_batch_size=b,
                             shuffle_seed=2)  # fmt: skip
    system = LookaheadTraining(problem, episode, horizon=8, meta_batch_size=4, seed=5)
    estimator, phi = TruncatedBackprop(1), problem.meta_parameters()
    online_meta_train(system, estimator, phi, AssignGradient(phi), truncations=4)
    trained = system.finish(estimator.state, phi)

    w, buf = [model.weight.detach(), model.bias.detach()], None
    for t in range(4):
        rows = problem.batch_rows(t, n)
        x, y = episode.support_x[rows], episode.support_y[rows]
        eps = torch.zeros(b, dtype=torch.float64, requires_grad=True)
        wv = [p.clone().requires_grad_() for p in w]
        loss = (eps * F.cross_entropy(x @ wv[0].T + wv[1], y, reduction="none")).mean()
        grads = torch.autograd.grad(loss, wv, create_graph=True)
        new_buf = grads if buf is None else [0.9 * bb + gg for bb, gg in zip(buf, grads)]
        virtual = [p - 0.5 * bb for p, bb in zip(wv, new_buf)]
        meta = meta_rows(5, t, m, 4)
        meta_loss = F.cross_entropy(episode.query_x[meta] @ virtual[0].T + virtual[1], episode.query_y[meta])
        (g_eps,) = torch.autograd.grad(meta_loss, eps)
        v = torch.clamp(-g_eps, min=0)
        v = v / v.sum() if v.sum() > 0 else v
        assert (v > 0).any()
        wr = [p.clone().requires_grad_() for p in w]
        loss = (v * F.cross_entropy(x @ wr[0].T + wr[1], y, reduction="none")).sum()
        grads = torch.autograd.grad(loss, wr)
        buf = list(grads) if buf is None else [0.9 * bb + gg for bb, gg in zip(buf, grads)]
        w = [p.detach() - 0.5 * bb for p, bb in zip(wr, buf)]
    torch.testing.assert_close(trained["weight"], w[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(trained["bias"], w[1], rtol=1e-9, atol=1e-12)


def test_weight_separation_counts_clean_above_noisy_with_ties_halved():
    weights = torch.tensor([0.9, 0.5, 0.5, 0.1])
    is_noisy = torch.tensor([False, False, True, True])
    out = weight_separation(weights, is_noisy)
    # pairs (clean, noisy): 0.9>0.5, 0.9>0.1, 0.5=0.5 (a half), 0.5>0.1 -> 3.5 / 4
    assert out["weight_auc"] == pytest.approx(0.875)
    assert out["weight_clean"] == pytest.approx(0.7) and out["weight_noisy"] == pytest.approx(0.3)
    assert weight_separation(-weights, is_noisy)["weight_auc"] == pytest.approx(0.125)
    assert weight_separation(torch.ones(4), is_noisy)["weight_auc"] == pytest.approx(0.5)


def test_assign_gradient_puts_the_gradient_in_place():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    AssignGradient([p]).step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0, 3.0]))
    with pytest.raises(ConfigError, match="lr > 0"):
        AssignGradient([p], lr=0.0)

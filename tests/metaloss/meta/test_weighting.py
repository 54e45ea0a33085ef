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
from metaloss.meta.weighting import (
    AssignGradient,
    ExampleWeights,
    LossToWeight,
    ModelFeatureRescaler,
    WeightedLoss,
    weight_separation,
)
from metaloss.online import online_meta_train
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, LossContext

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


def storm_setup(query_value: float = float("nan")):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    n, d, c = 40, 5, 3
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(c, (n,), generator=g)
    clean = Episode(x, y, torch.full((6, d), query_value, dtype=torch.float64), torch.zeros(6, dtype=torch.long))
    model = nn.Linear(d, c).double()
    loss = WeightedLoss(ModelFeatureRescaler(hidden=(6,), passes=3, dropout=0.2, seed=1)).double()
    problem = BilevelProblem(model, FixedInit(model), HyperparameterOptimizer("sgd", lr=0.3, momentum=0.9), loss,
                             F.cross_entropy, 1, inner_batch_size=8, shuffle_seed=2)  # fmt: skip
    return problem, clean, loss


def test_the_rescaler_reads_loss_confidence_entropy_and_dropout_passes_of_the_model():
    problem, episode, loss = storm_setup()
    params = {k: v.detach() for k, v in problem.model.named_parameters()}
    x, y = episode.support_x[:8], episode.support_y[:8]
    logits = problem.predict(params, x)
    context = LossContext(x, params, None, episode, lambda inputs: problem.predict(params, inputs))
    losses = F.cross_entropy(logits, y, reduction="none")
    torch.manual_seed(5)
    features = loss.weighter.features(losses, logits, y, context)
    p = logits.softmax(-1)
    torch.testing.assert_close(features[:, 0], losses)
    torch.testing.assert_close(features[:, 1], p.max(-1).values)
    torch.testing.assert_close(features[:, 2], -(p * p.log()).sum(-1))
    torch.manual_seed(5)
    passes = torch.stack([F.cross_entropy(problem.predict(params, F.dropout(x, 0.2, True)), y, reduction="none")
                          for _ in range(3)])  # fmt: skip
    torch.testing.assert_close(features[:, 3], passes.mean(0))
    torch.testing.assert_close(features[:, 4], passes.std(0, unbiased=False))
    assert (features[:, 4] > 0).sum() >= 6  # the passes differ
    with pytest.raises(ConfigError, match="needs a LossContext"):
        loss(logits, y)


def test_self_taught_meta_batches_are_the_top_weighted_noisy_rows_and_never_the_clean_set():
    problem, episode, loss = storm_setup()
    system = LookaheadTraining(problem, episode, horizon=10, meta_batch_size=4, seed=7, meta_source="train",
                               select_factor=3)  # fmt: skip
    params = {k: v.detach() for k, v in problem.model.named_parameters()}
    torch.manual_seed(11)
    meta = system._meta_batch(2, params)
    candidates = meta_rows(7, 2, 40, 12, stream=8)
    x, y = episode.support_x[candidates], episode.support_y[candidates]
    torch.manual_seed(11)
    context = LossContext(x, params, None, episode, lambda inputs: problem.predict(params, inputs))
    with torch.no_grad():
        v = loss.weights(problem.predict(params, x), y, context)
    keep = candidates[v.topk(4).indices]
    assert torch.equal(meta.query_x, episode.support_x[keep]) and torch.equal(meta.query_y, episode.support_y[keep])
    # a whole run with a meta set of NaNs: it is never read, so everything stays finite
    phi = problem.meta_parameters()
    start = [p.detach().clone() for p in phi]
    estimator = TruncatedBackprop(1)
    online_meta_train(system, estimator, phi, torch.optim.Adam(phi, lr=0.01), truncations=5)
    trained = system.finish(estimator.state, phi)
    assert all(torch.isfinite(p).all() for p in phi) and all(torch.isfinite(w).all() for w in trained.values())
    assert any((p - s).abs().max() > 0 for p, s in zip(phi, start))


def test_self_taught_selection_needs_a_weighted_loss():
    model = nn.Linear(3, 2)
    problem = BilevelProblem(model, FixedInit(model), HyperparameterOptimizer("sgd", lr=0.1), F.cross_entropy,
                             F.cross_entropy, 1, inner_batch_size=2)  # fmt: skip
    episode = Episode(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="weighted inner loss"):
        LookaheadTraining(problem, episode, 4, meta_batch_size=2, meta_source="train")

"""LookaheadTraining: a training run as the online regime's inner problem. Exact answers in float64:
the K-step look-ahead's meta-gradient through SGD with momentum and weight decay, and through Adam,
equals a hand-written unroll from the carried optimizer state; a whole online MW-Net run equals a
hand-written MW-Net loop (virtual step through the real optimizer, weight-net update, real step)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaloss.errors import ConfigError
from metaloss.hypergrad import TruncatedBackprop
from metaloss.lookahead import LookaheadTraining, meta_rows
from metaloss.meta import FixedInit, HyperparameterOptimizer
from metaloss.meta.weighting import LossToWeight, WeightedLoss
from metaloss.online import online_meta_train
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

torch.set_num_threads(1)
N, M, D, C, B = 24, 10, 4, 3, 4  # training rows, meta rows, features, classes, batch

OPTIMIZERS = {
    "momentum": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.05},
}


def setup(optimizer: str, normalize: bool = False, meta_batch: int | None = 5):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    episode = Episode(torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(C, (N,), generator=g),
                      torch.randn(M, D, generator=g, dtype=torch.float64), torch.randint(C, (M,), generator=g))
    model = nn.Linear(D, C).double()
    loss = WeightedLoss(LossToWeight(hidden=(5,), seed=2), normalize=normalize)
    inner_opt = HyperparameterOptimizer(**OPTIMIZERS[optimizer])
    problem = BilevelProblem(model=model, init=FixedInit(model), inner_opt=inner_opt, inner_loss=loss,
                             outer_loss=F.cross_entropy, inner_steps=1, inner_batch_size=B, shuffle_seed=3)  # fmt: skip
    system = LookaheadTraining(problem, episode, horizon=12, meta_batch_size=meta_batch, seed=4)
    return problem, episode, system, loss


def weighter_of(loss: WeightedLoss, phi):
    """The weight net as a function of phi (its parameters in order), for the hand-written unroll."""
    linears = [m for m in loss.weighter.net if isinstance(m, nn.Linear)]

    def v(losses):
        h = losses[:, None]
        for i, _ in enumerate(linears):
            h = h @ phi[2 * i].T + phi[2 * i + 1]
            h = torch.relu(h) if i < len(linears) - 1 else h
        return torch.sigmoid(h).squeeze(1)

    return v


def hand_step(optimizer: str, w, state, grads):
    """One step of the named optimizer on lists of tensors; state: momentum buffers or (m, v, step)."""
    h = OPTIMIZERS[optimizer]
    if optimizer == "momentum":
        g = [gi + h["weight_decay"] * wi for gi, wi in zip(grads, w)]
        buf = [h["momentum"] * b + gi for b, gi in zip(state, g)] if state is not None else g
        return [wi - h["lr"] * b for wi, b in zip(w, buf)], buf
    m, v, t = state if state is not None else ([0 * x for x in w], [0 * x for x in w], 0)
    t += 1
    m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, grads)]
    v = [0.999 * vi + 0.001 * gi * gi for vi, gi in zip(v, grads)]
    new = [wi - h["lr"] * (mi / (1 - 0.9**t)) / (torch.sqrt(vi / (1 - 0.999**t) + 1e-12) + 1e-8)
           for wi, mi, vi in zip(w, m, v)]  # fmt: skip
    return new, (m, v, t)


def hand_train_loss(problem, episode, weight, w, t, normalize=False):
    rows = problem.batch_rows(t, N)
    logits = episode.support_x[rows] @ w[0].T + w[1]
    losses = F.cross_entropy(logits, episode.support_y[rows], reduction="none")
    v = weight(losses.detach())
    return (v * losses).sum() / v.sum() if normalize else (v * losses).mean()


def hand_steps(optimizer, problem, episode, weight, w, state, t0, steps, graph):
    for t in range(t0, t0 + steps):
        if not graph:
            w = [x.detach().requires_grad_() for x in w]
        grads = torch.autograd.grad(hand_train_loss(problem, episode, weight, w, t), w, create_graph=graph)
        w, state = hand_step(optimizer, w, state, grads)
        if not graph:
            w = [x.detach() for x in w]
            state = state if state is None else _detach(state)
    return w, state


def _detach(state):
    if isinstance(state, tuple):
        return ([x.detach() for x in state[0]], [x.detach() for x in state[1]], state[2])
    return [x.detach() for x in state]


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_the_k_step_lookahead_meta_gradient_equals_a_hand_written_unroll(optimizer):
    problem, episode, system, loss = setup(optimizer)
    phi = problem.meta_parameters()
    broadcast = [p.unsqueeze(0) for p in phi]
    state, _ = system.unroll(system.init(1), broadcast, 2)  # look-ahead over steps 0-1, real steps pending
    state, meta_loss = system.unroll(state, broadcast, 3)  # the real steps 0-1, then the look-ahead over 2-4
    got = torch.autograd.grad(meta_loss.sum(), phi)

    weight = weighter_of(loss, phi)
    w0 = [problem.model.weight.detach(), problem.model.bias.detach()]
    w, opt = hand_steps(optimizer, problem, episode, weighter_of(loss, [p.detach() for p in phi]), w0, None, 0, 2,
                        graph=False)  # fmt: skip
    assert opt is not None  # the look-ahead starts from a non-zero optimizer state
    w = [x.detach().requires_grad_() for x in w]
    w, _ = hand_steps(optimizer, problem, episode, weight, w, opt, 2, 3, graph=True)
    rows = meta_rows(4, 2, M, 5)
    want_loss = F.cross_entropy(episode.query_x[rows] @ w[0].T + w[1], episode.query_y[rows])
    want = torch.autograd.grad(want_loss, phi)
    torch.testing.assert_close(meta_loss[0], want_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_an_online_mwnet_run_equals_the_hand_written_mwnet_loop(normalize):
    problem, episode, system, loss = setup("momentum", normalize=normalize)
    phi = problem.meta_parameters()
    start = [p.detach().clone() for p in phi]
    estimator = TruncatedBackprop(1)
    online_meta_train(system, estimator, phi, torch.optim.Adam(phi, lr=0.01), truncations=5)
    assert estimator.state["pending"] == 1  # the last real step waits for the last update
    trained = system.finish(estimator.state, phi)

    # hand-written MW-Net: virtual step -> weight-net update (Adam) -> real step with the new net
    theta = [p.clone().requires_grad_() for p in start]
    adam = torch.optim.Adam(theta, lr=0.01)
    w, buf = [problem.model.weight.detach(), problem.model.bias.detach()], None
    for t in range(5):
        wv = [x.clone().requires_grad_() for x in w]
        grads = torch.autograd.grad(hand_train_loss(problem, episode, weighter_of(loss, theta), wv, t, normalize), wv,
                                    create_graph=True)  # fmt: skip
        virtual, _ = hand_step("momentum", wv, buf, grads)
        rows = meta_rows(4, t, M, 5)
        meta = F.cross_entropy(episode.query_x[rows] @ virtual[0].T + virtual[1], episode.query_y[rows])
        adam.zero_grad()
        meta.backward()
        adam.step()
        wr = [x.clone().requires_grad_() for x in w]
        detached = weighter_of(loss, [p.detach() for p in theta])
        grads = torch.autograd.grad(hand_train_loss(problem, episode, detached, wr, t, normalize), wr)
        w, buf = hand_step("momentum", wr, buf, grads)
        w, buf = [x.detach() for x in w], [b.detach() for b in buf]
    for a, b in zip(phi, theta):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12)
    assert any((a - s).abs().max() > 1e-4 for a, s in zip(phi, start))  # the weight net did move
    torch.testing.assert_close(trained["weight"], w[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(trained["bias"], w[1], rtol=1e-9, atol=1e-12)


def test_averaging_leaves_the_meta_gradient_alone_and_averages_the_real_iterates():
    problem, episode, plain, _ = setup("momentum")
    averaging = LookaheadTraining(problem, episode, horizon=12, meta_batch_size=5, seed=4, average=0.5)
    phi = problem.meta_parameters()
    broadcast = [p.unsqueeze(0) for p in phi]
    s_plain, s_avg = plain.init(1), averaging.init(1)
    assert averaging.averaged_params(s_avg) is None and plain.averaged_params(plain.finish_state(s_plain, phi)) is None
    want = plain.params(s_plain)
    for n in range(1, 6):
        s_plain, loss_plain = plain.unroll(s_plain, broadcast, 1)
        s_avg, loss_avg = averaging.unroll(s_avg, broadcast, 1)
        for a, b in zip(torch.autograd.grad(loss_plain.sum(), phi), torch.autograd.grad(loss_avg.sum(), phi)):
            assert torch.equal(a, b)
        w = plain.params(plain.finish_state(s_plain, phi))  # w_n, the n-th real iterate
        d = min(0.5, (1 + n) / (10 + n))
        want = {k: d * want[k] + (1 - d) * w[k] for k in want}
        done = averaging.finish_state(s_avg, phi)
        assert all(torch.equal(w[k], averaging.params(done)[k]) for k in w)  # the same iterates
        got = averaging.averaged_params(done)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)
    assert (got["weight"] - w["weight"]).abs().max() > 1e-3  # the average is not the last iterate
    with pytest.raises(ConfigError, match="averaging decay"):
        LookaheadTraining(problem, episode, 10, average=1.0)


def test_the_training_stream_is_a_permutation_per_epoch_and_reproducible():
    problem, *_ = setup("momentum")
    per_epoch = N // B
    epoch0 = torch.cat([problem.batch_rows(t, N) for t in range(per_epoch)])
    epoch1 = torch.cat([problem.batch_rows(t, N) for t in range(per_epoch, 2 * per_epoch)])
    assert sorted(epoch0.tolist()) == list(range(N)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    again, *_ = setup("momentum")
    assert torch.equal(epoch1, torch.cat([again.batch_rows(t, N) for t in range(per_epoch, 2 * per_epoch)]))


def test_each_truncation_gets_a_fresh_meta_batch():
    assert not torch.equal(meta_rows(0, 0, 100, 10), meta_rows(0, 1, 100, 10))
    assert torch.equal(meta_rows(0, 3, 100, 10), meta_rows(0, 3, 100, 10))
    assert torch.equal(meta_rows(0, 3, 100, None), torch.arange(100))


def test_bad_settings_are_one_clear_error():
    problem, episode, *_ = setup("momentum")
    with pytest.raises(ConfigError, match="real_step"):
        LookaheadTraining(problem, episode, 10, real_step="later")
    problem.inner_batch_size = None
    with pytest.raises(ConfigError, match="inner_batch_size"):
        LookaheadTraining(problem, episode, 10)


def test_a_data_parallel_run_refuses_what_its_ranks_cannot_split():
    from metaloss.distributed import Distributed
    from metaloss.meta.weighting import ExampleWeights

    problem, episode, _, _ = setup("momentum")
    problem.data_parallel = Distributed(0, 2)  # two ranks (the checks come before any collective)
    LookaheadTraining(problem, episode, horizon=12, meta_batch_size=5, seed=4)  # a mean over rows: fine
    with pytest.raises(ConfigError, match="draws its meta batches from the clean meta set"):
        LookaheadTraining(problem, episode, horizon=12, meta_batch_size=5, meta_source="train")
    with pytest.raises(ConfigError, match="batches of at least 2 rows, got 4 training and 1 meta rows"):
        LookaheadTraining(problem, episode, horizon=12, meta_batch_size=1)
    normalized, episode, _, _ = setup("momentum", normalize=True)
    normalized.data_parallel = Distributed(0, 2)
    with pytest.raises(ConfigError, match="needs an inner loss that is a mean over rows"):
        LookaheadTraining(normalized, episode, horizon=12, meta_batch_size=5)
    normalized.inner_loss = WeightedLoss(ExampleWeights(B))  # L2RW's weights of batch positions
    with pytest.raises(ConfigError, match="needs an inner loss that is a mean over rows"):
        LookaheadTraining(normalized, episode, horizon=12, meta_batch_size=5)
    problem.model = nn.Sequential(nn.Linear(D, C), nn.BatchNorm1d(C)).double()
    with pytest.raises(ConfigError, match="does not synchronise BatchNorm statistics"):
        LookaheadTraining(problem, episode, horizon=12, meta_batch_size=5)

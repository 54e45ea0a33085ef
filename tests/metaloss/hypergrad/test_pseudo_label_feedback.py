"""Meta Pseudo Labels' teacher feedback against exact answers in float64: one estimate equals the
hand-written (before - after) x score-term formula for the labels it drew; its expectation over the
drawn label (enumerated) is exactly grad_theta E[L_l(w'(yhat))]; for a small student step it has the
sign and the value of the engine's exact one-step meta-gradient of soft pseudo-labels, and the official
code's sign (after - before) points the other way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaloss.errors import ConfigError
from metaloss.hypergrad import PseudoLabelFeedback, TruncatedBackprop
from metaloss.lookahead import LookaheadTraining
from metaloss.meta import FixedInit, HyperparameterOptimizer
from metaloss.meta.pseudo_label import PseudoLabelLoss
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

torch.set_num_threads(1)
N, M, D, C = 6, 8, 4, 3  # unlabelled rows, labelled rows, features, classes


def setup(mode: str, lr: float, batch: int = 1, supervised_weight: float = 0.0):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    episode = Episode(
        torch.randn(N, D, generator=g, dtype=torch.float64),
        torch.full((N,), -1),
        torch.randn(M, D, generator=g, dtype=torch.float64),
        torch.randint(C, (M,), generator=g),
    )
    student = nn.Linear(D, C).double()
    loss = PseudoLabelLoss(C, D, hidden=(5,), mode=mode, supervised_weight=supervised_weight, seed=2)
    problem = BilevelProblem(model=student, init=FixedInit(student), inner_opt=HyperparameterOptimizer(
        name="sgd", lr=lr), inner_loss=loss, outer_loss=F.cross_entropy, inner_steps=1, inner_batch_size=batch,
        shuffle_seed=3)  # fmt: skip
    system = LookaheadTraining(problem, episode, horizon=4, meta_batch_size=None, seed=4)
    return problem, episode, system, loss, problem.meta_parameters()


def labelled_loss(student_w, episode):
    return F.cross_entropy(episode.query_x @ student_w[0].T + student_w[1], episode.query_y)


def after_step(w, x, label, lr):
    """The student after one SGD step on CE(S(x), label), x [1, D]."""
    w = [p.detach().requires_grad_() for p in w]
    grads = torch.autograd.grad(F.cross_entropy(x @ w[0].T + w[1], label), w)
    return [p - lr * q for p, q in zip(w, grads)]


def test_one_estimate_is_the_hand_written_feedback_for_the_labels_it_drew():
    problem, episode, system, loss, phi = setup("hard", lr=0.5, batch=2, supervised_weight=0.7)
    out = PseudoLabelFeedback(1).estimate(system, phi)
    w = [problem.init()["weight"], problem.init()["bias"]]
    x = episode.support_x[problem.batch_rows(0, N)]
    drawn = loss.pseudo_labels(x, 0)
    before, after = labelled_loss(w, episode), labelled_loss(after_step(w, x, drawn, 0.5), episode)
    score = F.cross_entropy(loss.teacher_logits(x), drawn, reduction="sum")
    supervised = 0.7 * F.cross_entropy(loss.teacher_logits(episode.query_x), episode.query_y)
    expected = torch.autograd.grad((before - after).detach() * score + supervised, phi)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(out.grads, expected))
    assert out.metrics["feedback"] == pytest.approx(float(before - after))


def expected_feedback(problem, episode, loss, phi, lr):
    """E over yhat ~ T(x) of (L_l(w) - L_l(w'(yhat))) grad CE(T(x), yhat), by enumeration (one row),
    and grad_theta E[L_l(w'(yhat))] by autograd through the teacher's probabilities."""
    w = [problem.init()["weight"], problem.init()["bias"]]
    x = episode.support_x[problem.batch_rows(0, N)]
    p = loss.teacher_logits(x).softmax(-1)[0]  # [C]
    before = labelled_loss(w, episode).detach()
    afters = [labelled_loss(after_step(w, x, torch.tensor([c]), lr), episode).detach() for c in range(C)]
    feedback = [torch.zeros_like(q) for q in phi]
    for c in range(C):
        score = torch.autograd.grad(F.cross_entropy(loss.teacher_logits(x), torch.tensor([c])), phi)
        feedback = [f + p[c].detach() * (before - afters[c]) * s for f, s in zip(feedback, score)]
    direct = torch.autograd.grad(sum(p[c] * afters[c] for c in range(C)), phi)
    return torch.cat([f.flatten() for f in feedback]), torch.cat([d.flatten() for d in direct])


def test_the_feedback_is_unbiased_for_the_expected_post_step_loss_at_any_step_size():
    problem, episode, system, loss, phi = setup("hard", lr=2.0)
    feedback, direct = expected_feedback(problem, episode, loss, phi, 2.0)
    assert torch.allclose(feedback, direct, rtol=1e-9, atol=1e-12)


def test_for_a_small_step_the_feedback_has_the_sign_and_value_of_the_exact_meta_gradient():
    lr = 1e-3
    problem, episode, system, loss, phi = setup("hard", lr=lr)
    feedback, _ = expected_feedback(problem, episode, loss, phi, lr)
    _, _, soft_system, _, soft_phi = setup("soft", lr=lr)
    exact = torch.cat([g.flatten() for g in TruncatedBackprop(1).estimate(soft_system, soft_phi).grads])
    assert F.cosine_similarity(feedback, exact, dim=0) > 0.999
    assert torch.allclose(feedback, exact, rtol=5e-3, atol=1e-3 * float(exact.abs().max()))
    official_sign = -feedback  # after - before, as in the official code
    assert F.cosine_similarity(official_sign, exact, dim=0) < -0.999


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="truncation must be 1"):
        PseudoLabelFeedback(2)
    _, _, system, _, phi = setup("soft", lr=0.1)
    with pytest.raises(ConfigError, match="hard"):
        PseudoLabelFeedback(1).estimate(system, phi)
    with pytest.raises(ConfigError, match="mode"):
        PseudoLabelLoss(C, D, mode="medium")
    with pytest.raises(ConfigError, match="LossContext"):
        PseudoLabelLoss(C, D)(torch.zeros(2, C), torch.zeros(2, dtype=torch.long))


def test_hard_labels_are_drawn_once_per_step_and_follow_the_teacher():
    loss = PseudoLabelLoss(C, D, hidden=(5,), seed=2)
    x = torch.randn(4000, D)
    assert torch.equal(loss.pseudo_labels(x, 7), loss.pseudo_labels(x, 7))
    assert not torch.equal(loss.pseudo_labels(x, 7), loss.pseudo_labels(x, 8))
    one = x[:1].expand(4000, D)
    counts = torch.bincount(loss.pseudo_labels(one, 3), minlength=C).double() / 4000
    p = loss.teacher_logits(x[:1]).softmax(-1)[0].double().detach()
    assert torch.allclose(counts, p, atol=4 * (0.25 / 4000) ** 0.5)

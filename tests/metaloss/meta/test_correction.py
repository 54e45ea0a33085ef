import pytest
import torch
import torch.nn.functional as F

from metaloss.errors import ConfigError
from metaloss.meta.correction import CorrectedLoss, GatedCorrector, LabelCorrector, flipped_labels, soft_cross_entropy
from metaloss.types import Episode, LossContext

torch.manual_seed(0)
B, C, D = 12, 4, 6


def context(x):
    return LossContext(x, {}, 0, Episode(x, x, x, x), None)


def test_corrected_labels_are_distributions_and_the_prior_leans_on_the_given_label():
    logits, y, x = torch.randn(B, C), torch.randint(C, (B,)), torch.randn(B, D)
    for corrector in (LabelCorrector(C, seed=1), LabelCorrector(C, "inputs", D, seed=1), GatedCorrector(C, D)):
        q = corrector(logits, y, context(x))
        assert q.shape == (B, C) and (q >= 0).all() and torch.allclose(q.sum(1), torch.ones(B))
    plain, leaning = LabelCorrector(C, seed=1), LabelCorrector(C, label_prior=20.0, seed=1)
    assert (leaning(logits, y, context(x)).argmax(1) == y).all()
    assert not torch.allclose(plain(logits, y, context(x)), leaning(logits, y, context(x)))


def test_the_gate_mixes_the_given_label_and_the_teachers_prediction():
    teacher, x, y = GatedCorrector(C, D, seed=3), torch.randn(B, D), torch.randint(C, (B,))
    logits_t, gate = teacher._parts(x, y)
    g = torch.sigmoid(gate)[:, None]
    expected = g * F.one_hot(y, C) + (1 - g) * logits_t.softmax(-1)
    assert torch.allclose(teacher(torch.zeros(B, C), y, context(x)), expected)


def test_the_corrected_loss_is_the_soft_cross_entropy_and_features_are_stop_gradient():
    loss = CorrectedLoss(LabelCorrector(C, seed=2))
    logits, y, x = torch.randn(B, C, requires_grad=True), torch.randint(C, (B,)), torch.randn(B, D)
    q = loss.corrected(logits, y, context(x))
    value = loss(logits, y, context(x))
    assert torch.allclose(value, soft_cross_entropy(logits, q).mean())
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.allclose(grad, (logits.softmax(-1) - q.detach()) / B, atol=1e-6)  # no path through the features


def test_outer_terms_train_the_teacher_and_vanish_for_mlc():
    x, y = torch.randn(B, D), torch.randint(C, (B,))
    assert CorrectedLoss(LabelCorrector(C)).outer_terms(x, y) == 0
    teacher = GatedCorrector(C, D, clean_weight=0.0, retain_weight=1.0)
    _, keep = teacher._parts(x, y)
    _, drop = teacher._parts(x, flipped_labels(y, C))
    expected = (F.softplus(-keep).mean() + F.softplus(drop).mean()) / 2  # BCE with targets 1 and 0
    assert torch.allclose(CorrectedLoss(teacher).outer_terms(x, y), expected)


def test_flipped_labels_are_always_wrong_and_cover_every_other_class():
    y = torch.randint(C, (300,))
    flipped = flipped_labels(y, C)
    assert (flipped != y).all() and set(((flipped - y) % C).tolist()) == set(range(1, C))
    # a rank's share of the batch, told where it starts, flips its rows as the whole batch does
    assert torch.equal(torch.cat([flipped_labels(y[:120], C), flipped_labels(y[120:], C, first_row=120)]), flipped)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="features"):
        LabelCorrector(C, features="pixels")
    with pytest.raises(ConfigError, match="in_features"):
        LabelCorrector(C, features="inputs")
    with pytest.raises(ConfigError, match="loss weights"):
        GatedCorrector(C, D, clean_weight=-1)
    with pytest.raises(ConfigError, match="LossContext"):
        CorrectedLoss(LabelCorrector(C))(torch.zeros(2, C), torch.zeros(2, dtype=torch.long))

"""Loss plots: the curves are the losses' own values along each axis; the figure is a PNG."""

from __future__ import annotations

import math

import torch

from metaloss.meta import ML3Loss, ML3RegressionLoss
from metaloss.plots import loss_curves, save_loss_plot


def test_curves_follow_their_axes():
    torch.manual_seed(0)
    loss = ML3Loss(hidden=(5,)).double()
    curves = loss_curves(loss, n_classes=4, points=11)
    p, learned, ce = curves["true-class probability"]
    assert torch.allclose(ce, -p.log())  # the logits put probability p on the true class
    margin, _, ce_margin = curves["logit margin"]
    expected = torch.tensor([-m + math.log(math.exp(m) + 3) for m in margin.tolist()], dtype=torch.float64)
    assert torch.allclose(ce_margin, expected)
    logits = torch.tensor([[math.log(p[3].item()), *[math.log((1 - p[3].item()) / 3)] * 3]], dtype=torch.float64)
    assert torch.allclose(learned[3], loss(logits, torch.tensor([0])))  # the learned loss at that point
    regression = loss_curves(ML3RegressionLoss(2, 1, hidden=(3,)), points=7)
    residual, _, squared = regression["residual (input 0, target 0)"]
    assert torch.allclose(squared, residual**2)


def test_the_plot_is_a_png(tmp_path):
    path = save_loss_plot(ML3Loss(hidden=(5,)), tmp_path / "loss.png", n_classes=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = save_loss_plot(ML3RegressionLoss(1, 1, hidden=(3,)), tmp_path / "regression.png")
    assert path.stat().st_size > 1000

"""Learned inner losses: `nn.Module`s whose parameters are meta-parameters.

The contract: `loss(prediction, target) -> scalar` (the mean over the batch), or with
`reduction="none"` the per-sample losses [n]. A loss that needs more than (prediction, target)
sets the class attribute `needs_context = True` and is called as
`loss(prediction, target, context)` with a `metaloss.types.LossContext` (the batch's inputs, the
adapted parameters, the inner step, the episode); the inner objective passes it, nothing else does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.losses import reduce
from metaloss.models import MLP
from metaloss.types import LossContext


class ML3Loss(nn.Module):
    """ML3 for classification (Bechtle et al. 2021, "Meta Learning via Learned Loss"): one small
    network applied to each class's (softmax probability p_k, one-hot target y_k), made
    non-negative by a softplus and summed over the K classes:

        l(logits, y) = sum_k softplus(g_phi(p_k, y_k)),   p = softmax(logits)

    logits [n, K], target [n] class indices."""

    def __init__(self, hidden: Sequence[int] = (50, 50)) -> None:
        super().__init__()
        self.hidden = [int(h) for h in hidden]
        self.net = MLP(2, hidden, 1)

    def config(self) -> dict:
        """The constructor arguments that rebuild this module (`metaloss.io`)."""
        return {"hidden": self.hidden}

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        _class_indices(target, type(self).__name__)
        features = torch.stack([logits.softmax(-1), F.one_hot(target, logits.shape[-1]).to(logits.dtype)], -1)
        per_sample = F.softplus(self.net(features)).squeeze(-1).sum(-1)  # [n, K, 2] -> [n, K] -> [n]
        return reduce(per_sample, reduction)


class ML3RegressionLoss(nn.Module):
    """ML3's regression form: a network on (x, prediction, target), softplus output,

        l(x, f(x), y) = softplus(g_phi([x, f(x), y]))

    as in ML3's shaped-sine experiment. prediction and target [n, d]; x from the context [n, d_x]."""

    needs_context = True

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: Sequence[int] = (50, 50)) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError(f"ML3 regression loss needs in_features, out_features >= 1, got {in_features}, "
                              f"{out_features}")  # fmt: skip
        self.in_features, self.out_features, self.hidden = in_features, out_features, [int(h) for h in hidden]
        self.net = MLP(in_features + 2 * out_features, hidden, 1)

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "hidden": self.hidden}

    def forward(self, prediction: Tensor, target: Tensor, context: LossContext, reduction: str = "mean") -> Tensor:
        x = context.inputs.reshape(len(prediction), -1)  # [n, d_x]
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"ML3 regression loss built for {self.in_features} input features, got {x.shape[-1]}")
        features = torch.cat([x, prediction.reshape(len(x), -1), target.reshape(len(x), -1)], -1)
        return reduce(F.softplus(self.net(features)).squeeze(-1), reduction)


class TaylorGLOLoss(nn.Module):
    """TaylorGLO (Gonzalez & Miikkulainen 2021): the third-order bivariate Taylor polynomial in
    (target x, prediction y) around a learned centre (c_x, c_y), without the terms in x alone
    (they have no gradient in y), with 8 parameters theta = (c_x, c_y, t_1 .. t_6):

        f(x, y) = t_1 (y - c_y) + t_2 (y - c_y)^2 / 2 + t_3 (y - c_y)^3 / 6 + t_4 (x - c_x)(y - c_y)
                  + t_5 (x - c_x)(y - c_y)^2 / 2 + t_6 (x - c_x)^2 (y - c_y) / 2

    applied to every class of (one-hot target, softmax probability) and summed, negated as in the
    paper: l = -sum_k f(y_k, p_k). The default theta gives a loss whose gradient in p_y is
    negative (more confidence in the target is rewarded): t_4 = 1, everything else 0."""

    def __init__(self, centre: tuple[float, float] = (0.0, 0.0),
                 coefficients: Sequence[float] = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0)) -> None:  # fmt: skip
        super().__init__()
        if len(coefficients) != 6:
            raise ConfigError(f"TaylorGLO has 6 coefficients (and a 2-number centre), got {len(coefficients)}")
        self.centre = nn.Parameter(torch.tensor([float(c) for c in centre]))
        self.coefficients = nn.Parameter(torch.tensor([float(c) for c in coefficients]))

    def config(self) -> dict:  # the values live in the weights; these only give the shapes
        return {}

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        _class_indices(target, type(self).__name__)
        y = logits.softmax(-1) - self.centre[1]  # [n, K]
        x = F.one_hot(target, logits.shape[-1]).to(logits.dtype) - self.centre[0]
        t = self.coefficients
        f = t[0] * y + t[1] * y**2 / 2 + t[2] * y**3 / 6 + t[3] * x * y + t[4] * x * y**2 / 2 + t[5] * x**2 * y / 2
        return reduce(-f.sum(-1), reduction)


def _class_indices(target: Tensor, name: str) -> None:
    if target.is_floating_point():
        raise ConfigError(f"{name} is a classification loss (class-index targets) but the targets are real numbers; "
                          "for regression use inner_loss=ml3_regression")  # fmt: skip

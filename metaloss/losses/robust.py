"""Classification losses from the noisy-label and loss-design literature, on logits [n, K] and class
indices [n]. Each returns the mean (`reduction="mean"`) or the per-sample losses [n]
(`reduction="none"`, what reweighting and label correction act on). A coefficient (epsilon, q,
alpha, beta, gamma) may be a tensor, e.g. a meta-parameter: the loss is differentiable in it.

With p = softmax(logits) and p_y the probability of the target class:
- cross-entropy: -log p_y
- label smoothing (Szegedy et al. 2016): CE against (1 - s) one_hot(y) + s / K
- focal (Lin et al. 2017): -(1 - p_y)^gamma log p_y
- Poly-1 (Leng et al. 2022, PolyLoss): -log p_y + epsilon (1 - p_y)
- GCE (Zhang & Sabuncu 2018): (1 - p_y^q) / q   (q -> 0: CE; q = 1: MAE / 2)
- MAE (Ghosh et al. 2017): sum_k |p_k - one_hot(y)_k| = 2 (1 - p_y)
- RCE (reverse CE; Wang et al. 2019): -sum_k p_k log one_hot(y)_k with log 0 := A = -4, i.e. -A (1 - p_y)
- SCE (Wang et al. 2019, symmetric CE): alpha CE + beta RCE
- NCE+RCE (Ma et al. 2020, active-passive loss): alpha NCE + beta RCE, NCE = log p_y / sum_k log p_k
- Taylor-CE (Feng et al. 2020): sum_{i=1..t} (1 - p_y)^i / i   (t -> infinity: CE)
- entropy: -sum_k p_k log p_k, reading no labels (Tent's test-time objective, Wang et al. 2021)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metaloss.errors import ConfigError

REDUCTIONS = ("mean", "none")
Coefficient = float | Tensor


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """per_sample [n] -> its mean (a scalar) or itself."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    return per_sample.mean() if reduction == "mean" else per_sample


def one_hot(target: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """target [n] (class indices) -> [n, classes] indicator rows. Unlike `F.one_hot` it runs inside
    `torch.func.vmap` (no check of the labels' range, which reads their values)."""
    return (target.unsqueeze(-1) == torch.arange(classes, device=target.device)).to(dtype)


def class_means(values: Tensor, onehot: Tensor) -> Tensor:
    """values [n, D], onehot [n, K] -> [K, D]: the mean of each class's rows (zero for a class with none)."""
    return onehot.T @ values / onehot.sum(0).clamp(min=1).unsqueeze(1)


def _log_p_target(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(log softmax [n, K], log p_y [n])."""
    if target.is_floating_point():
        raise ConfigError("a classification loss needs class-index targets, but the targets are real numbers "
                          "(a regression task?)")  # fmt: skip
    log_p = F.log_softmax(logits, dim=-1)
    return log_p, log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    if reduction == "mean":
        return F.cross_entropy(logits, target)  # torch's fused kernel, as every result so far used
    return reduce(-_log_p_target(logits, target)[1], reduction)


def entropy(logits: Tensor, target: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """The prediction entropy H(softmax(logits)) per row [n]; `target` is not read (unlabelled rows)."""
    log_p = F.log_softmax(logits, dim=-1)
    return reduce(-(log_p.exp() * log_p).sum(-1), reduction)


def label_smoothing(logits: Tensor, target: Tensor, smoothing: Coefficient = 0.1, reduction: str = "mean") -> Tensor:
    log_p, log_p_y = _log_p_target(logits, target)
    return reduce(-(1 - smoothing) * log_p_y - smoothing * log_p.mean(-1), reduction)


def focal(logits: Tensor, target: Tensor, gamma: Coefficient = 2.0, reduction: str = "mean") -> Tensor:
    log_p_y = _log_p_target(logits, target)[1]
    return reduce(-((1 - log_p_y.exp()) ** gamma) * log_p_y, reduction)


def poly1(logits: Tensor, target: Tensor, epsilon: Coefficient = 1.0, reduction: str = "mean") -> Tensor:
    log_p_y = _log_p_target(logits, target)[1]
    return reduce(-log_p_y + epsilon * (1 - log_p_y.exp()), reduction)


def gce(logits: Tensor, target: Tensor, q: Coefficient = 0.7, reduction: str = "mean") -> Tensor:
    if not isinstance(q, Tensor) and not 0 < q <= 1:
        raise ConfigError(f"GCE needs 0 < q <= 1, got {q}")
    p_y = _log_p_target(logits, target)[1].exp()
    return reduce((1 - p_y**q) / q, reduction)


def mae(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    p_y = _log_p_target(logits, target)[1].exp()
    return reduce(2 * (1 - p_y), reduction)


def rce(logits: Tensor, target: Tensor, log_zero: float = -4.0, reduction: str = "mean") -> Tensor:
    p_y = _log_p_target(logits, target)[1].exp()
    return reduce(-log_zero * (1 - p_y), reduction)


def sce(
    logits: Tensor, target: Tensor, alpha: Coefficient = 0.1, beta: Coefficient = 1.0, reduction: str = "mean"
) -> Tensor:
    log_p_y = _log_p_target(logits, target)[1]
    return reduce(alpha * -log_p_y + beta * 4.0 * (1 - log_p_y.exp()), reduction)


def nce_rce(
    logits: Tensor, target: Tensor, alpha: Coefficient = 1.0, beta: Coefficient = 1.0, reduction: str = "mean"
) -> Tensor:
    log_p, log_p_y = _log_p_target(logits, target)
    nce = log_p_y / log_p.sum(-1)  # (-log p_y) / (-sum_k log p_k), in [0, 1]
    return reduce(alpha * nce + beta * 4.0 * (1 - log_p_y.exp()), reduction)


def taylor_ce(logits: Tensor, target: Tensor, order: int = 2, reduction: str = "mean") -> Tensor:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ConfigError(f"Taylor-CE needs an int order >= 1, got {order!r}")
    one_minus = 1 - _log_p_target(logits, target)[1].exp()
    return reduce(sum(one_minus**i / i for i in range(1, order + 1)), reduction)


def mse(prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error over the output dimensions; prediction and target [n, d]."""
    if reduction == "mean":
        return F.mse_loss(prediction, target)
    return reduce(((prediction - target) ** 2).reshape(len(prediction), -1).mean(-1), reduction)


__all__ = [
    "cross_entropy",
    "focal",
    "gce",
    "label_smoothing",
    "mae",
    "mse",
    "nce_rce",
    "poly1",
    "rce",
    "reduce",
    "sce",
    "taylor_ce",
]

"""Task losses and metrics, looked up by name from configs: the plain ones (MSE, cross-entropy) and
the robust classification losses of `metaloss.losses.robust`, each with `reduction="mean" | "none"`."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.losses.robust import (
    class_means,
    cross_entropy,
    entropy,
    focal,
    gce,
    label_smoothing,
    mae,
    mse,
    nce_rce,
    one_hot,
    poly1,
    rce,
    reduce,
    sce,
    taylor_ce,
)


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of argmax predictions equal to the target; logits [n, classes], target [n]."""
    return (logits.argmax(dim=-1) == target).float().mean()


LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": mse,
    "cross_entropy": cross_entropy,
    "entropy": entropy,
    "label_smoothing": label_smoothing,
    "focal": focal,
    "poly1": poly1,
    "gce": gce,
    "mae": mae,
    "rce": rce,
    "sce": sce,
    "nce_rce": nce_rce,
    "taylor_ce": taylor_ce,
}
METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"accuracy": accuracy}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss called `name`, or a ConfigError listing the known ones."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]


def get_metric(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The metric called `name`, or a ConfigError listing the known ones."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; expected one of {sorted(METRICS)}")
    return METRICS[name]


__all__ = ["LOSSES", "METRICS", "accuracy", "class_means", "get_loss", "get_metric", "one_hot", "reduce",
           *sorted(LOSSES)]

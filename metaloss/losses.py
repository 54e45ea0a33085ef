"""Plain task losses and metrics, looked up by name from configs.

(The later `losses/` package of robust losses grows from here.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from metaloss.errors import ConfigError


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error; pred and target of shape [n, d]."""
    return F.mse_loss(pred, target)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy; logits [n, classes], target [n] class indices."""
    return F.cross_entropy(logits, target)


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of argmax predictions equal to the target; logits [n, classes], target [n]."""
    return (logits.argmax(dim=-1) == target).float().mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": mse, "cross_entropy": cross_entropy}
METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"accuracy": accuracy}


def get_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss called `name`, or a ConfigError listing the known ones."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]


def get_metric(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The metric called `name`, or a ConfigError listing the known ones."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; expected one of {sorted(METRICS)}")
    return METRICS[name]

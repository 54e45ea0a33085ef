"""Inner optimizers as meta-learned objects: `forward()` returns an `InnerOptimizer`
built from the module's current tensors, so gradients reach its hyperparameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from metaloss.errors import ConfigError
from metaloss.inner.optim import OPTIMIZERS, InnerOptimizer


def _key(name: str) -> str:
    return name.replace(".", "__")  # nn.ParameterDict keys may not contain dots


class HyperparameterOptimizer(nn.Module):
    """A named inner optimizer (`sgd`, `adam`) whose hyperparameters in `learn` are meta-parameters.

    HyperparameterOptimizer("sgd", lr=0.01) is a fixed SGD; with learn=["lr", "momentum"]
    the scalar learning rate and momentum receive hypergradients (Maclaurin et al. 2015).
    """

    def __init__(self, name: str = "sgd", learn: Iterable[str] = (), **hyperparameters: float) -> None:
        super().__init__()
        if name not in OPTIMIZERS:
            raise ConfigError(f"unknown inner optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
        self.name = name
        try:
            OPTIMIZERS[name](**hyperparameters)  # validates names and values now, not mid-run
        except TypeError as err:
            raise ConfigError(f"inner optimizer {name!r}: {err}") from None
        learn = list(learn)
        unknown = [h for h in learn if h not in hyperparameters]
        if unknown:
            raise ConfigError(f"cannot learn {unknown}: give them a starting value among {sorted(hyperparameters)}")
        self.fixed = {h: v for h, v in hyperparameters.items() if h not in learn}
        self.learned = nn.ParameterDict({h: nn.Parameter(torch.tensor(float(hyperparameters[h]))) for h in learn})

    def forward(self) -> InnerOptimizer:
        return OPTIMIZERS[self.name](**self.fixed, **dict(self.learned.items()))


class MetaSGD(nn.Module):
    """Meta-SGD (Li et al. 2017): SGD with a learned learning rate for every element of every parameter.

    w <- w - alpha (elementwise) grad, alpha has the shape of w and is a meta-parameter.
    """

    def __init__(self, model: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        if lr < 0:
            raise ConfigError(f"inner learning rate must be >= 0, got {lr}")
        self.names = [name for name, _ in model.named_parameters()]
        self.lrs = nn.ParameterDict(
            {_key(name): nn.Parameter(torch.full_like(p.detach(), float(lr))) for name, p in model.named_parameters()}
        )

    def forward(self) -> InnerOptimizer:
        return OPTIMIZERS["sgd"](lr={name: self.lrs[_key(name)] for name in self.names})

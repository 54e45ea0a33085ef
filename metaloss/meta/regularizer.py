"""Inner-loss regularisers: R(w, w0) added to L_inner. A module's parameters are meta-parameters."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.types import Params


class L2Penalty(nn.Module):
    """R(w) = 1/2 sum_i lambda_i w_i^2 with learned lambda: one scalar, or one per element of every
    parameter (`per_element=True`, needs `model`), e.g. ridge regression's per-feature coefficients
    (the hyperparameter-optimisation benchmark of Pedregosa 2016; Lorraine et al. 2020)."""

    def __init__(self, coefficient: float = 0.1, per_element: bool = False, model: nn.Module | None = None) -> None:
        super().__init__()
        if coefficient < 0:
            raise ConfigError(f"L2 coefficient must be >= 0, got {coefficient}")
        if per_element:
            if model is None:
                raise ConfigError("per-element L2 coefficients need the model")
            self.names = [name for name, _ in model.named_parameters()]
            self.coefficients = nn.ParameterList(
                [nn.Parameter(torch.full_like(p.detach(), float(coefficient))) for _, p in model.named_parameters()]
            )
        else:
            self.names = []
            self.coefficient = nn.Parameter(torch.tensor(float(coefficient)))

    def forward(self, params: Params, w0: Params) -> Tensor:
        if self.names:
            by_name = dict(zip(self.names, self.coefficients))
            return 0.5 * sum((by_name[n] * p * p).sum() for n, p in params.items())
        return 0.5 * self.coefficient * sum((p * p).sum() for p in params.values())


class Proximal(nn.Module):
    """iMAML's proximal term (Rajeswaran et al. 2019): R(w, w0) = lambda/2 ||w - w0||^2, so that the
    inner solution depends on the learned initialisation w0 and the implicit gradient applies:
    d w*/d w0 = (I + H / lambda)^{-1}. lambda is a fixed hyperparameter (no meta-parameters)."""

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        if strength <= 0:
            raise ConfigError(f"proximal strength must be > 0, got {strength}")
        self.strength = strength

    def forward(self, params: Params, w0: Params) -> Tensor:
        return 0.5 * self.strength * sum(((p - w0[n]) ** 2).sum() for n, p in params.items())

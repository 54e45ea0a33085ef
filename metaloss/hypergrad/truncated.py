"""Truncated backpropagation through time in the online regime (Williams & Peng 1990; the
"TBPTT" baseline of Tallec & Ollivier 2017 and Vicol et al. 2021): the inner state is cut from the
graph at the start of every truncation, so phi's influence on later truncations through the state
is ignored. Biased (short-horizon bias), memory O(K)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import OnlineEstimator
from metaloss.online import TruncatedSystem, broadcast, detach_state
from metaloss.types import HypergradOut


class TruncatedBackprop(OnlineEstimator):
    """Backpropagate the loss of each K-step truncation into phi, from a detached state."""

    def __init__(self, truncation: int) -> None:
        if truncation < 1:
            raise ConfigError(f"truncation must be >= 1, got {truncation}")
        self.truncation = truncation
        self.state: dict[str, Any] | None = None

    def estimate(self, system: TruncatedSystem, phi: list[Tensor]) -> HypergradOut:
        if self.state is None or self.state["t"] >= system.horizon:
            self.state = system.init(1)
        steps = min(self.truncation, system.horizon - self.state["t"])
        state, loss = system.unroll(detach_state(self.state), broadcast(phi, 1), steps)
        grads = torch.autograd.grad(loss.sum(), phi, allow_unused=True)
        self.state = detach_state(state)
        value = loss.item()
        return HypergradOut(grads=list(grads), outer_loss=value, metrics={"loss": value, "t": float(state["t"])})

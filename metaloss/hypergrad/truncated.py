"""Truncated backpropagation through time in the online regime (Williams & Peng 1990; the
"TBPTT" baseline of Tallec & Ollivier 2017 and Vicol et al. 2021): the inner state is cut from the
graph at the start of every truncation, so phi's influence on later truncations through the state
is ignored. Biased (short-horizon bias), memory O(K)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metaloss.functional import tree_detach
from metaloss.hypergrad.base import OnlineEstimator
from metaloss.online import TruncatedSystem, Truncation, broadcast, check_truncation, detach_state, truncation_length
from metaloss.types import HypergradOut


class TruncatedBackprop(OnlineEstimator):
    """Backpropagate the loss of each K-step truncation into phi, from a detached state.
    truncation: K, or a schedule of lengths (see `metaloss.online.check_truncation`)."""

    def __init__(self, truncation: Truncation) -> None:
        self.lengths = check_truncation(truncation)
        self.state: dict[str, Any] | None = None
        self.count = 0  # truncations since the inner problem began

    def next_truncation(self, system: TruncatedSystem) -> int:
        """The length of the truncation to take now (a fresh inner problem after the horizon)."""
        if self.state is None or self.state["t"] >= system.horizon:
            self.state, self.count = system.init(1), 0
        self.count += 1
        return truncation_length(self.lengths, self.count - 1, system.horizon - self.state["t"])

    def estimate(self, system: TruncatedSystem, phi: list[Tensor]) -> HypergradOut:
        steps = self.next_truncation(system)
        state, loss = system.unroll(detach_state(self.state), broadcast(phi, 1), steps)
        grads = torch.autograd.grad(loss.sum(), phi, allow_unused=True) if phi else ()  # no phi: a plain run
        self.state = detach_state(state)
        value = loss.item()
        return HypergradOut(grads=list(grads), outer_loss=value, metrics={"loss": value, "t": float(state["t"])})

    def state_dict(self) -> dict:
        """The carried inner state and the truncation count, to resume a run exactly."""
        return {"state": tree_detach(self.state), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.state, self.count = state["state"], state["count"]

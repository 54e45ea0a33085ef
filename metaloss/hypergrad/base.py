"""The estimator contract: a meta-batch of episodes in, d L_outer / d phi out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class HypergradEstimator(ABC):
    """Estimates the gradient of the mean outer loss over `episodes` with respect to
    `problem.meta_parameters()`. It runs the inner loop through `problem.adapt_to`
    and never re-implements it; it does not step the outer optimizer."""

    @abstractmethod
    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        """Return grads aligned with `problem.meta_parameters()`, the mean outer loss and metrics."""


class OnlineEstimator(ABC):
    """The online-regime contract: each call advances the estimator's persistent inner states
    (particles) by one truncation of a `metaloss.online.TruncatedSystem` and returns the
    hypergradient estimate for that truncation, aligned with `phi`. States reset with the
    inner problem (after `system.horizon` steps)."""

    @abstractmethod
    def estimate(self, system: Any, phi: list[Tensor]) -> HypergradOut:
        """Return grads aligned with `phi`, the truncation's mean loss and metrics."""

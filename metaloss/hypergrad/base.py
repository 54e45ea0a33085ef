"""The estimator contract: a meta-batch of episodes in, d L_outer / d phi out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class HypergradEstimator(ABC):
    """Estimates the gradient of the mean outer loss over `episodes` with respect to
    `problem.meta_parameters()`. It runs the inner loop through `problem.adapt_to`
    and never re-implements it; it does not step the outer optimizer."""

    @abstractmethod
    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        """Return grads aligned with `problem.meta_parameters()`, the mean outer loss and metrics."""

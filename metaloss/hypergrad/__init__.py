"""Hypergradient estimators: one contract (`HypergradEstimator`), one file per estimator."""

from metaloss.hypergrad.base import HypergradEstimator
from metaloss.hypergrad.es import AntitheticES
from metaloss.hypergrad.implicit import Implicit
from metaloss.hypergrad.unrolled import Unrolled

__all__ = ["AntitheticES", "HypergradEstimator", "Implicit", "Unrolled"]

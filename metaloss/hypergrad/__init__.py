"""Hypergradient estimators: one contract (`HypergradEstimator`), one file per estimator."""

from metaloss.hypergrad.base import HypergradEstimator, OnlineEstimator
from metaloss.hypergrad.checkpointed import CheckpointedUnrolled
from metaloss.hypergrad.es import AntitheticES, OnlineES
from metaloss.hypergrad.identity_hessian import IdentityHessian
from metaloss.hypergrad.implicit import Implicit
from metaloss.hypergrad.online import EpisodicOnline
from metaloss.hypergrad.pseudo_label_feedback import PseudoLabelFeedback
from metaloss.hypergrad.reptile import Reptile
from metaloss.hypergrad.truncated import TruncatedBackprop
from metaloss.hypergrad.unrolled import Unrolled

__all__ = [
    "AntitheticES",
    "CheckpointedUnrolled",
    "EpisodicOnline",
    "HypergradEstimator",
    "IdentityHessian",
    "Implicit",
    "OnlineES",
    "OnlineEstimator",
    "PseudoLabelFeedback",
    "Reptile",
    "TruncatedBackprop",
    "Unrolled",
]

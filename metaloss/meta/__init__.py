"""What is meta-learned. Each object is an ordinary `nn.Module` whose parameters are (part of) phi."""

from metaloss.meta.init import FixedInit, LearnedInit, PrototypeHeadInit, RandomInit
from metaloss.meta.loss import ML3Loss, ML3RegressionLoss, NPBMLLoss, TaylorGLOLoss
from metaloss.meta.optimizer import (
    HyperparameterOptimizer,
    MetaSGD,
    MLPUpdateRule,
    PerStepSGD,
    WarpPreconditioner,
)
from metaloss.meta.regularizer import L2Penalty, Proximal

__all__ = [
    "FixedInit",
    "HyperparameterOptimizer",
    "L2Penalty",
    "LearnedInit",
    "MetaSGD",
    "PerStepSGD",
    "MLPUpdateRule",
    "ML3Loss",
    "ML3RegressionLoss",
    "NPBMLLoss",
    "Proximal",
    "PrototypeHeadInit",
    "RandomInit",
    "TaylorGLOLoss",
    "WarpPreconditioner",
]

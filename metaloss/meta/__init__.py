"""What is meta-learned. Each object is an ordinary `nn.Module` whose parameters are (part of) phi."""

from metaloss.meta.init import FixedInit, LearnedInit
from metaloss.meta.loss import ML3Loss, ML3RegressionLoss, TaylorGLOLoss
from metaloss.meta.optimizer import HyperparameterOptimizer, MetaSGD
from metaloss.meta.regularizer import L2Penalty, Proximal

__all__ = [
    "FixedInit",
    "HyperparameterOptimizer",
    "L2Penalty",
    "LearnedInit",
    "MetaSGD",
    "ML3Loss",
    "ML3RegressionLoss",
    "Proximal",
    "TaylorGLOLoss",
]

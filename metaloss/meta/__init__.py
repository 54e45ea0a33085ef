"""What is meta-learned. Each object is an ordinary `nn.Module` whose parameters are (part of) phi."""

from metaloss.meta.init import LearnedInit
from metaloss.meta.optimizer import HyperparameterOptimizer, MetaSGD

__all__ = ["HyperparameterOptimizer", "LearnedInit", "MetaSGD"]

"""The inner problem: differentiable optimizers and the one inner loop."""

from metaloss.inner.loop import InnerResult, run_inner_loop
from metaloss.inner.optim import InnerOptimizer, adam, sgd

__all__ = ["InnerOptimizer", "InnerResult", "adam", "run_inner_loop", "sgd"]

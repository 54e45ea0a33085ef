"""Implicit differentiation at the inner solution (implicit function theorem).

At a stationary point grad_w L_in(w*, phi) = 0,

    d L_out / d phi = dL_out/dphi - (d^2 L_in / dphi dw) v,    (H + damping I) v = dL_out/dw*,

with H = d^2 L_in / dw^2 at w* (Bengio 2000; Pedregosa 2016; Lorraine et al. 2020). The inner loop
only has to reach w* (its graph is not kept); H enters only through Hessian-vector products,
solved by conjugate gradient or a Neumann series. The estimate is exact when w_T = w* and the
solve converges; it needs phi to act on L_in (a regulariser, a learned loss, iMAML's proximal term)
or on L_out: a plain learned initialisation has no implicit gradient (w* forgets w0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import HypergradEstimator, add_into_grad, mean_over_tasks
from metaloss.hypergrad.linalg import conjugate_gradient, neumann_series, relative_residual
from metaloss.hypergrad.threads import check_threads
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut

SOLVERS = ("cg", "neumann")


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


class Implicit(HypergradEstimator):
    """Implicit hypergradient. solver: "cg" or "neumann"; iterations: CG iterations or Neumann terms;
    tol: CG's relative residual target; damping: added to H (Tikhonov); alpha: Neumann step size;
    threads: tasks side by side on this many CPU threads (`metaloss.hypergrad.threads`)."""

    def __init__(
        self, solver: str = "cg", iterations: int = 20, tol: float = 1e-10, damping: float = 0.0, alpha: float = 1.0,
        threads: int | str = 1,
    ) -> None:
        if solver not in SOLVERS:
            raise ConfigError(f"unknown implicit solver {solver!r}; expected one of {SOLVERS}")
        if iterations < 1 or tol < 0 or damping < 0 or alpha <= 0:
            raise ConfigError("implicit: need iterations >= 1, tol >= 0, damping >= 0 and alpha > 0")
        self.solver, self.iterations, self.tol, self.damping, self.alpha = solver, iterations, tol, damping, alpha
        self.threads = check_threads(threads)

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        if problem.trajectory_objective:
            raise ConfigError(
                "implicit differentiation supports meta_objective='query' only: the trajectory objective "
                "depends on every iterate, not only on the inner solution (use unrolled or checkpointed)"
            )
        return mean_over_tasks(problem, episodes, self._task, self.threads, accumulates=True)

    def _task(
        self, problem: BilevelProblem, episode: Episode, phi: list[Tensor], scale: float, accumulate: bool = False
    ) -> tuple[list[Tensor | None] | None, dict[str, Tensor | float]]:
        """scale * d L_out / d phi for one episode, and its metrics; with `accumulate`, added into
        phi's .grad instead (`add_into_grad`), and None returned."""
        solved, inner = problem.adapt_to(episode, second_order=False, differentiable_steps=0)
        w0, frozen = problem.initial_params(episode)  # phi-dependent: the graph of the mixed term
        w = {name: solved[name].detach().requires_grad_() for name in w0}
        ws = list(w.values())
        loss, metrics = problem.query_loss({**frozen, **w}, episode)
        outer = torch.autograd.grad(loss * scale, ws + phi, allow_unused=True)
        dl_dw, direct = _zeros_for_none(outer[: len(ws)], ws), outer[len(ws) :]
        inner_grad = torch.autograd.grad(problem.inner_objective(episode, w0, frozen)(w), ws, create_graph=True)

        def hvp(v: list[Tensor]) -> list[Tensor]:  # (H + damping I) v
            hv = torch.autograd.grad(inner_grad, ws, grad_outputs=v, retain_graph=True, allow_unused=True)
            return [h + self.damping * vi for h, vi in zip(_zeros_for_none(hv, ws), v)]

        if self.solver == "cg":
            v, used = conjugate_gradient(hvp, dl_dw, self.iterations, self.tol)
        else:
            v, used = neumann_series(hvp, dl_dw, self.iterations, self.alpha)
        metrics["solver_residual"] = relative_residual(hvp, v, dl_dw) if any(x.any() for x in dl_dw) else 0.0
        mixed = list(torch.autograd.grad(inner_grad, phi, grad_outputs=v, allow_unused=True))
        grads: list[Tensor | None] = []
        for j, (p, d) in enumerate(zip(phi, direct)):  # None where phi reaches neither term (no implicit gradient)
            m, mixed[j] = mixed[j], None
            grads.append(_difference(p, d, m))
        metrics["solver_iterations"] = used
        metrics["inner_loss_last"] = inner.losses[-1].detach() if inner.losses else float("nan")
        if accumulate:
            add_into_grad(phi, grads)
            return None, metrics
        return grads, metrics


def _difference(p: Tensor, d: Tensor | None, m: Tensor | None) -> Tensor | None:
    """d - m (either may be None: not reached), in d's own buffer where autograd handed over a plain
    one (a fresh contiguous tensor, not a view): one gradient copy less at the peak, same rounding."""
    if d is None and m is None:
        return None
    if m is None:
        return d
    if d is None:
        return torch.zeros_like(p).sub_(m)
    if d._base is None and d.is_contiguous():
        return d.sub_(m)
    return d - m

"""Exact reverse-mode through a long inner loop in bounded memory, by recomputation.

The forward pass keeps no graph and stores the inner state (w_t, s_t) only every S steps. The
backward pass walks the segments in reverse: it recomputes one segment from its checkpoint with
its graph (second order), and pulls the adjoint (dL/dw_t, dL/ds_t) back through it with a
vector-Jacobian product, collecting d L / d phi on the way. Memory is O(T / S + S) states instead
of O(T); S = ceil(sqrt(T)) gives O(sqrt(T)) at the price of one extra forward pass (Griewank 1992's
checkpointing; the idea of REPLAY in Engstrom et al. 2025). Equal to `Unrolled("full")` up to
floating-point rounding. With meta_objective="inner_mean", J = (1/T) sum_t L_in(w_t): there is no
terminal adjoint, and each recomputed segment adds the gradient of its own steps' losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.functional import tree_map, tree_tensors
from metaloss.hypergrad.base import HypergradEstimator, add_into_grad, mean_over_tasks
from metaloss.hypergrad.threads import check_threads
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


def as_leaf(t: Tensor) -> Tensor:
    """A fresh leaf tracking grad with `t`'s value: a segment's recomputation starts there."""
    return t.detach().requires_grad_()


class CheckpointedUnrolled(HypergradEstimator):
    """Full second-order unrolled hypergradient with segment checkpoints every `segment` inner
    steps (None: ceil(sqrt(T))); threads: tasks side by side on this many CPU threads
    (`metaloss.hypergrad.threads`)."""

    def __init__(self, segment: int | None = None, threads: int | str = 1) -> None:
        if segment is not None and segment < 1:
            raise ConfigError(f"segment must be >= 1 or None, got {segment}")
        self.segment, self.threads = segment, check_threads(threads)

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        return mean_over_tasks(problem, episodes, self._task, self.threads, accumulates=True)

    def _task(self, problem: BilevelProblem, episode: Episode, phi: list[Tensor], scale: float,
              accumulate: bool = False):  # fmt: skip
        """scale * d L_outer / d phi for one episode, and its metrics; with `accumulate`, added into
        phi's .grad instead (`add_into_grad`), and None returned."""
        steps = problem.inner_steps
        segment = self.segment or max(1, math.ceil(math.sqrt(steps)))
        w0, frozen = problem.initial_params(episode)
        optimizer = problem.inner_opt()
        # forward, no graph: checkpoints (w_t, s_t) at t = 0, S, 2S, ...
        checkpoints = []
        params, state = {n: p.detach() for n, p in w0.items()}, optimizer.init(w0)
        trajectory: list[Tensor] = []  # L_in(w_t) for t = 0 .. T-1, detached
        for start in range(0, steps, segment):
            checkpoints.append((start, params, {k: v for k, v in state.items()}))
            result = problem.run_inner(
                episode,
                params,
                w0,
                frozen,
                min(segment, steps - start),
                optimizer=optimizer,
                opt_state=state,
                differentiable_steps=0,
                first_step=start,
            )
            params, state = result.params, result.opt_state
            trajectory += result.losses
        # outer loss at w_T: the adjoint to carry back, and phi's direct gradient
        w_t = {n: p.detach().requires_grad_() for n, p in params.items()}
        loss, metrics = problem.query_loss({**frozen, **w_t}, episode)
        along_trajectory = problem.trajectory_objective
        if along_trajectory:  # J does not depend on w_T: no terminal adjoint
            metrics["query_loss"], metrics["loss"] = metrics["loss"], torch.stack(trajectory).mean()
            outer: Sequence[Tensor | None] = [None] * (len(w_t) + len(phi))
        else:
            outer = torch.autograd.grad(loss * scale, list(w_t.values()) + phi, allow_unused=True)
        adjoint_w = dict(zip(w_t, outer[: len(w_t)]))
        adjoint_s: list[Tensor | None] = [None] * len(tree_tensors(state))
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(phi, outer[len(w_t) :])]
        # backward, segment by segment: recompute with graph, pull the adjoint back
        for start, params_k, state_k in reversed(checkpoints):
            if start == 0:
                params_k, state_k = w0, optimizer.init(w0)  # the graph of w0(phi) itself
            else:
                params_k, state_k = tree_map(as_leaf, params_k), tree_map(as_leaf, state_k)
            result = problem.run_inner(
                episode,
                params_k,
                w0,
                frozen,
                min(segment, steps - start),
                optimizer=optimizer,
                opt_state=state_k,
                first_step=start,
                keep_loss_graph=along_trajectory,
            )
            outputs = list(result.params.values()) + tree_tensors(result.opt_state)
            cotangents = [adjoint_w[n] for n in result.params] + adjoint_s
            if along_trajectory:  # this segment's own terms of J
                outputs.append(torch.stack(result.losses).sum())
                cotangents.append(torch.tensor(scale / steps, dtype=outputs[-1].dtype, device=outputs[-1].device))
            keep = [i for i, (o, c) in enumerate(zip(outputs, cotangents)) if c is not None and o.requires_grad]
            inputs = list(params_k.values()) + tree_tensors(state_k) if start > 0 else []
            pulled = torch.autograd.grad(
                [outputs[i] for i in keep], inputs + phi, [cotangents[i] for i in keep], allow_unused=True
            )
            grads = [g if p is None else g + p for g, p in zip(grads, pulled[len(inputs) :])]
            if start > 0:
                adjoint_w = {n: g for n, g in zip(params_k, pulled[: len(params_k)])}
                adjoint_s = list(pulled[len(params_k) : len(inputs)])
        metrics["checkpoints"] = len(checkpoints)
        metrics["inner_loss_last"] = trajectory[-1]
        if accumulate:
            add_into_grad(phi, grads)
            return None, metrics
        return grads, metrics

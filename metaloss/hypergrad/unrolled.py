"""Reverse-mode differentiation through the unrolled inner loop.

    d L_outer / d phi = dL/dw_T * d w_T / d phi + dL/dphi,
    d w_{t+1}/d phi   = (d update / d w_t) d w_t / d phi + d update / d phi.

Modes: ``full`` (exact, memory O(T); MAML, Finn et al. 2017), ``first_order``
(inner gradients taken as constants, memory O(1) in graph depth of Hessians;
FOMAML), ``truncated`` (backpropagate through the last K steps only; Shaban et
al. 2019, biased, memory O(K)).

batched=True runs the meta-batch's tasks as one `torch.func.vmap` batch with `torch.func` inner and
outer gradients (`mean_over_tasks_batched`), the same hypergradient as the task-by-task loop:
faster where one task is too small to keep the machine busy (the sinusoid MLP on a CPU), slower
where one task already is (a Conv-4 on 2 CPU cores), at the memory of `chunk` tasks at once.
threads=N runs the loop's tasks side by side on N CPU threads instead (`metaloss.hypergrad.threads`),
the loop's hypergradient bit for bit at one intra-op thread.
batched="auto" decides per meta-batch by the measured rule of `batching_pays`, and falls back to the
loop for good (with a warning) where vmap refuses an operation of the problem.
compile=True computes each task that is not batched (in the loop, or in threads=N) by one
`torch.compile`d pure function (`metaloss.hypergrad.compiled`): the same hypergradient, faster per
task once compiled, at a compile time paid once per episode shape; threads="auto" chooses as for
uncompiled tasks (compiled tasks in threads were the fastest path on 2 cores, benchmarks/peers).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import (
    HypergradEstimator,
    batching_pays,
    chunk_for_budget,
    mean_over_tasks,
    mean_over_tasks_batched,
    saved_bytes_per_task,
    vmap_refusal,
)
from metaloss.hypergrad.compiled import CompiledTask
from metaloss.hypergrad.threads import check_threads, first_device, resolve_threads
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut

MODES = ("full", "first_order", "truncated")


class Unrolled(HypergradEstimator):
    """Unrolled hypergradient; `truncation` K is required by (and only used in) mode ``truncated``.
    batched: the tasks of a meta-batch as one vmap batch, `chunk` at a time (None: all); "auto": where
    `batching_pays`. graph_budget_mb: instead of a fixed chunk, as many tasks at once as their saved
    graphs fit in this many MB (`saved_bytes_per_task`, measured on the first meta-batch of each
    episode shape). threads: tasks that are not batched run side by side on this many CPU threads
    (`metaloss.hypergrad.threads`; "auto": one per intra-op thread where the model allows it).
    compile: tasks that are not batched run as one compiled function each (`CompiledTask`; backend
    "inductor", or "aot_eager" to trace without code generation)."""

    def __init__(self, mode: str = "full", truncation: int | None = None, batched: bool | str = False,
                 chunk: int | None = None, threads: int | str = 1,
                 graph_budget_mb: float | None = None, compile: bool = False,
                 compile_backend: str = "inductor") -> None:  # fmt: skip
        if mode not in MODES:
            raise ConfigError(f"unknown unrolled mode {mode!r}; expected one of {MODES}")
        if mode == "truncated" and (truncation is None or truncation < 1):
            raise ConfigError(f"mode 'truncated' needs truncation >= 1, got {truncation}")
        if batched not in (False, True, "auto"):
            raise ConfigError(f"batched must be true, false or 'auto', got {batched!r}")
        if chunk is not None and chunk < 1:
            raise ConfigError(f"chunk must be >= 1 or None, got {chunk}")
        if graph_budget_mb is not None and (graph_budget_mb <= 0 or chunk is not None):
            raise ConfigError(f"graph_budget_mb must be > 0 and needs chunk=null (it chooses the chunk), got "
                              f"{graph_budget_mb} with chunk={chunk}")  # fmt: skip
        self.mode = mode
        self.truncation = truncation if mode == "truncated" else None
        self.batched, self.chunk, self.threads = batched, chunk, check_threads(threads)
        self.graph_budget_mb = graph_budget_mb
        self.saved_bytes: dict[tuple, int] = {}  # per episode shape, for graph_budget_mb
        self.vmap_refused = False  # batched="auto" met an op that vmap cannot batch
        self.compiled = CompiledTask(self._task_loss, self._task, compile_backend) if compile else None

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        if self.batches(problem, episodes):
            try:
                return mean_over_tasks_batched(problem, episodes, self._task_loss, self.chunk_for(problem, episodes))
            except RuntimeError as err:  # an op vmap cannot batch (data-dependent control flow, .item())
                if self.batched != "auto" or not vmap_refusal(err):
                    raise
                self.vmap_refused = True  # the loop from now on: the same hypergradient
                warnings.warn(f"hypergrad.batched=auto: the tasks run one by one, vmap refused the problem: "
                              f"{str(err).splitlines()[0][:200]}", stacklevel=2)  # fmt: skip
        if self.compiled is not None:  # compiled for the workers' one intra-op thread, or the caller's count
            # threads="auto" as for uncompiled tasks: with Inductor's C++ wrapper, compiled tasks in threads took
            # 0.59x to 1.06x the compiled loop's time on 2 cores, faster in 15 of 17 comparisons (benchmarks/README.md)
            device = first_device(problem.meta_parameters())
            workers = resolve_threads(self.threads, problem.model, len(episodes), device)
            self.compiled.prepare(problem, episodes, 1 if workers > 1 else torch.get_num_threads())
            return mean_over_tasks(problem, episodes, self.compiled, workers, local_models=False)
        return mean_over_tasks(problem, episodes, self._task, self.threads, accumulates=True)

    def chunk_for(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> int | None:
        """The tasks per vmap call: `chunk`, or what `graph_budget_mb` allows."""
        if self.graph_budget_mb is None:
            return self.chunk
        shape = tuple(tuple(t.shape) for t in (episodes[0].support_x, episodes[0].query_x))
        if shape not in self.saved_bytes:
            self.saved_bytes[shape] = saved_bytes_per_task(problem, episodes[0], self._task_loss)
        return chunk_for_budget(self.graph_budget_mb, self.saved_bytes[shape], len(episodes))

    def batches(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> bool:
        """Whether this meta-batch runs as one vmap batch."""
        if self.batched == "auto":
            return not self.vmap_refused and batching_pays(problem, episodes)
        return bool(self.batched)

    def _task_loss(self, problem: BilevelProblem, episode: Episode, functional: bool = True):
        """The outer loss of one episode after its inner loop, and its detached metrics."""
        params, inner = problem.adapt_to(episode, second_order=self.mode != "first_order",
                                         differentiable_steps=self.truncation, functional=functional)  # fmt: skip
        loss, metrics = problem.outer_objective(params, inner, episode)
        metrics["inner_loss_first"] = inner.losses[0].detach()
        metrics["inner_loss_last"] = inner.losses[-1].detach()
        return loss, metrics

    def _task(self, problem: BilevelProblem, episode: Episode, phi: list[Tensor], scale: float,
              accumulate: bool = False):  # fmt: skip
        """scale * d L_outer / d phi for one episode (None where phi is not reached), and its metrics;
        with `accumulate`, added into phi's .grad instead (`summed_in_grad`), and None returned."""
        loss, metrics = self._task_loss(problem, episode, functional=False)
        if accumulate:
            torch.autograd.backward(loss * scale, inputs=phi)
            return None, metrics
        grads = torch.autograd.grad(loss * scale, phi, allow_unused=True)
        return grads, metrics

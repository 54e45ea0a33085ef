"""One task's meta-gradient as one compiled function (`torch.compile`), for the task loop and threads.

    g(phi; episode) = d L_outer(A(phi; support), phi; query) / d phi

is written as a pure function of (phi, support x, y, query x, y) with `torch.func.grad` of the
functional inner loop (`run_inner_loop(functional=True)`, the very function that `vmap` batches), so
no autograd graph is built at run time and a second-order meta-gradient needs no double backward
through a compiled autograd graph (which `torch.compile` does not support). `torch.compile` traces
it once per episode shape (`dynamic=False`; `fullgraph=True`, so a problem it cannot trace whole is a
clear error, not a slow partial graph) and Inductor generates fused kernels for forward, inner
gradient, inner update and outer gradient together.

Exact: the same hypergradient as the autograd task (float64 agreement to rounding,
tests/metaloss/hypergrad/test_compiled.py); in float32 the fused kernels round differently (on the
peers' Conv-4 as far from the float64 answer as the eager kernels, benchmarks/README.md). A
meta-parameter that the autograd task does not reach (None) is found once per problem by one
autograd task and stays None, so an outer optimizer treats it as the loop does. Measured on a 2-core
CPU (benchmarks/peers): compiling takes 20 s to 4 minutes per episode shape, paid on the first
meta-batch of that shape, so it pays on long runs of fixed-shape episodes; more shapes per problem
than dynamo's `recompile_limit` (8) are refused. On a CPU, Inductor's layout optimisation (which
turns convolution graphs channels-last) is off (`CPU_INDUCTOR_OPTIONS`): with it, one task's small
batches paid a layout conversion around the convolutions, and without it the same compiled tasks
took 0.94x to 1.00x the time side by side, compiled in 0.6x to 0.9x the time (MAML, FOMAML, ANIL,
Meta-SGD on the peers' Conv-4, benchmarks/peers/compile_layout.py). Inductor's C++ wrapper
(`cpp_wrapper`) launches the kernels from C++ instead of generated Python: one-step tasks on that
Conv-4 took 0.91x to 0.96x the time with it in the loop, and 0.72x to 0.76x in threads, whose
kernel launches no longer take turns on the GIL (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import TaskEstimate, TaskLoss, check_pure_task
from metaloss.hypergrad.threads import first_device, thread_safe_model
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

BACKENDS = ("inductor", "aot_eager")  # aot_eager: the same tracing without code generation (fast; for tests)
CPU_INDUCTOR_OPTIONS = {"layout_optimization": False, "cpp_wrapper": True}  # NCHW; C++ wrapper (module docstring)


def check_compilable(problem: BilevelProblem) -> None:
    """What a compiled task needs: a pure function of the episode's tensors (`check_pure_task`, as
    the vmap batch needs), no dropout (a compiled graph draws other masks than the eager loop) and no
    BatchNorm that updates running statistics (a side effect of the task): `thread_safe_model`'s
    conditions, for the same reasons."""
    check_pure_task(problem, "compiled tasks", "compile=false")
    reason = thread_safe_model(problem.model)
    if reason is not None:
        raise ConfigError(f"compile=true: {reason}, which a compiled task cannot reproduce; use compile=false "
                          f"(for BatchNorm: the transductive policy)")  # fmt: skip


class CompiledTask:
    """A `TaskEstimate` (for `mean_over_tasks`) whose scaled gradient comes from
    `torch.compile(grad_and_value(task_loss))`. `prepare(problem, episodes)` runs on the calling
    thread before the tasks (it compiles for a new episode shape and finds the unreached
    meta-parameters); the task calls then only run the compiled function, from any thread, and never
    touch the model's modules (no per-thread copies needed). `autograd_task`: the uncompiled task,
    used once per problem for reachability."""

    def __init__(self, task_loss: TaskLoss, autograd_task: TaskEstimate, backend: str = "inductor") -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown compile backend {backend!r}; expected one of {BACKENDS}")
        self.task_loss, self.autograd_task, self.backend = task_loss, autograd_task, backend
        self.problem: BilevelProblem | None = None
        self.fn: Callable[..., Any] | None = None
        self.reached: list[bool] = []
        self.shapes: set[tuple] = set()

    def prepare(self, problem: BilevelProblem, episodes: Sequence[Episode], intra_op_threads: int) -> None:
        """Build the compiled function for `problem` (once) and compile it for every new episode shape
        among `episodes` (on this thread, one at a time) for tasks that run with `intra_op_threads`
        (1 in worker threads): dynamo guards on the thread count, so a graph compiled under another
        count would be compiled again by the first task that calls it."""
        if self.problem is not problem:
            check_compilable(problem)

            def one_task(phi_values: list[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
                return self.task_loss(problem.with_meta_parameters(phi_values), Episode(sx, sy, qx, qy))

            task_gradient = grad_and_value(one_task, has_aux=True)

            def entry(*args: Tensor | list[Tensor]):
                return task_gradient(*args)

            # dynamo caches compiled graphs per code object, at most `recompile_limit` of them: a code
            # object of its own per problem keeps one problem's graphs from crowding out another's
            entry.__code__ = entry.__code__.replace()
            phi = problem.meta_parameters()
            on_cpu = first_device(phi).type == "cpu"
            options = CPU_INDUCTOR_OPTIONS if self.backend == "inductor" and on_cpu else None
            self.fn = torch.compile(entry, backend=self.backend, fullgraph=True, dynamic=False, options=options)
            grads, _ = self.autograd_task(problem, episodes[0], phi, 1.0)
            self.problem, self.reached, self.shapes = problem, [g is not None for g in grads], set()
        for episode in episodes:
            shape = episode_shape(episode)
            if shape not in self.shapes:
                limit = torch._dynamo.config.recompile_limit
                if len(self.shapes) >= limit:
                    raise ConfigError(f"compile=true compiles once per episode shape, at most {limit} shapes "
                                      f"(torch._dynamo.config.recompile_limit); this run has more: use episodes "
                                      f"of fixed shape or compile=false")  # fmt: skip
                threads = torch.get_num_threads()
                torch.set_num_threads(intra_op_threads)
                try:
                    self.run(episode)
                except Exception as err:  # dynamo's Unsupported, Inductor's errors: one clear message
                    raise ConfigError(f"compile=true: torch.compile cannot compile this task whole "
                                      f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                                      f"use compile=false") from err  # fmt: skip
                finally:
                    torch.set_num_threads(threads)
                self.shapes.add(shape)

    def run(self, episode: Episode, phi: list[Tensor] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """The unscaled meta-gradient of one episode (zeros where phi is not reached) and its metrics.
        phi: the problem's meta-parameters (read from the problem if not given)."""
        assert self.problem is not None and self.fn is not None, "prepare() first"
        phi = [p.detach() for p in (self.problem.meta_parameters() if phi is None else phi)]
        grads, (_, metrics) = self.fn(phi, episode.support_x, episode.support_y, episode.query_x, episode.query_y)
        return list(grads), metrics

    def __call__(self, problem: BilevelProblem, episode: Episode, phi: list[Tensor], scale: float):
        """scale * d L_outer / d phi for one episode (None where phi is not reached), and its metrics.
        `problem` must be the one given to `prepare`. The scaling is one multi-tensor kernel in place
        on the compiled function's fresh outputs: the same products as `g * scale`, fewer launches."""
        grads, metrics = self.run(episode, phi)
        if any(self.reached):  # a multi-tensor kernel refuses an empty list
            torch._foreach_mul_([g for g, reached in zip(grads, self.reached) if reached], scale)
        return [g if reached else None for g, reached in zip(grads, self.reached)], metrics


def episode_shape(episode: Episode) -> tuple:
    """What a compiled task is specialised to: the shapes and dtypes of the episode's tensors."""
    tensors = (episode.support_x, episode.support_y, episode.query_x, episode.query_y)
    return tuple((tuple(t.shape), t.dtype) for t in tensors)

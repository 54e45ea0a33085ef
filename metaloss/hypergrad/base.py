"""The estimator contract: a meta-batch of episodes in, d L_outer / d phi out."""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.hypergrad.threads import first_device, local_copy, map_in_threads, resolve_threads
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class HypergradEstimator(ABC):
    """Estimates the gradient of the mean outer loss over `episodes` with respect to
    `problem.meta_parameters()`. It runs the inner loop through `problem.adapt_to`
    and never re-implements it; it does not step the outer optimizer. `task_offset`: the meta-batch
    position of the first episode it is given (a rank's share of a meta-batch split over ranks,
    `metaloss.distributed`), for estimators that draw noise per task."""

    task_offset: int = 0
    particle_range: tuple[int, int] | None = None  # ES over ranks: the antithetic pairs this rank runs

    @abstractmethod
    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        """Return grads aligned with `problem.meta_parameters()`, the mean outer loss and metrics."""

    def updates(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> Iterator[HypergradOut]:
        """The outer updates of one meta-step, lazily: the caller applies each estimate to phi before
        it asks for the next, so an estimator in the online regime sees the updated phi in its next
        truncation. By default a meta-step is one update, `estimate`."""
        yield self.estimate(problem, episodes)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs for its next estimates to equal the uninterrupted run's (e.g. the
        call counter that seeds ES noise): tensors and plain values only. Empty for a stateless one."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`."""
        if state:
            raise ConfigError(f"{type(self).__name__} is stateless but was given estimator state {sorted(state)}")


# (problem, episode, phi, scale) -> (scale * d L_outer / d phi, metrics); None instead of the gradients when
# called with accumulate=True (`summed_in_grad`)
TaskEstimate = Callable[..., tuple[Sequence[Tensor | None] | None, dict[str, Any]]]


def mean_over_tasks(problem: BilevelProblem, episodes: Sequence[Episode], task: TaskEstimate, threads: int | str = 1,
                    local_models: bool = True, accumulates: bool = False) -> HypergradOut:  # fmt: skip
    """Sum `task(problem, episode, phi, 1 / B)` (its scaled gradient and metrics) over a meta-batch
    of B episodes, task by task, so one task's graph is freed before the next is built. A gradient
    stays None where no task reached that meta-parameter (an optimizer then leaves it alone).
    threads: tasks run side by side on this many CPU threads (`metaloss.hypergrad.threads`; "auto":
    one per intra-op thread where the model allows it), summed in the same task order; each thread runs
    the model through its own copy of the module tree unless `local_models` is false (a task that
    never runs the modules, such as a compiled one, `metaloss.hypergrad.compiled`).
    accumulates: the task also takes `accumulate=True`, adding its gradient into phi's `.grad`
    instead of returning it, which the loop on the calling thread uses (`summed_in_grad`)."""
    if not episodes:
        raise ConfigError("a meta-batch needs at least one episode")
    phi = problem.meta_parameters()
    scale = 1.0 / len(episodes)
    workers = resolve_threads(threads, problem.model, len(episodes), first_device(phi))
    in_grad = workers == 1 and accumulates and bool(phi)
    if workers > 1:

        def one(i: int):  # this thread's copy of the model's module tree, the same tensors
            local = dataclasses.replace(problem, model=local_copy(problem.model)) if local_models else problem
            return task(local, episodes[i], phi, scale)

        results = map_in_threads(one, len(episodes), workers)
    elif in_grad:
        results = (task(problem, episode, phi, scale, accumulate=True) for episode in episodes)
    else:
        results = (task(problem, episode, phi, scale) for episode in episodes)
    grads: list[Tensor | None] = [None] * len(phi)
    sums: dict[str, float] = {}
    with summed_in_grad(phi) if in_grad else contextlib.nullcontext():
        for task_grads, metrics in results:
            if task_grads is not None:
                grads = sum_gradients(grads, task_grads)
            for k, value in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(value)
        if in_grad:
            grads = [p.grad for p in phi]
    means = {k: v / len(episodes) for k, v in sums.items()}
    return HypergradOut(grads=grads, outer_loss=means["loss"], metrics=means)


def sum_gradients(grads: Sequence[Tensor | None], more: Sequence[Tensor | None]) -> list[Tensor | None]:
    """grads + more elementwise, new tensors (None: not reached, the other kept). Where both lists are
    full, one multi-tensor kernel (`torch._foreach_add`): the same sums, one launch instead of one
    per meta-parameter (a compiled task's sum was a visible share of its time)."""
    if grads and all(g is not None for g in grads) and all(t is not None for t in more):
        return list(torch._foreach_add(list(grads), list(more)))  # type: ignore[arg-type]
    return [t if g is None else (g if t is None else g + t) for g, t in zip(grads, more)]


@contextlib.contextmanager
def summed_in_grad(phi: list[Tensor]) -> Iterator[None]:
    """Leaves the sum of the tasks' gradients to autograd: inside, phi's `.grad` start at None and
    each task runs its backward into them (`torch.autograd.backward` with `inputs=phi`), which adds
    every arriving gradient in place, as `loss.backward()` in a hand-written loop does. The running
    sum is then the only gradient buffer: summing returned gradients holds the sum beside a task's
    fresh gradient during its backward, one copy of the gradients more at the memory peak
    (benchmarks/peers: `tensor_peak_mb`). The same values in the same order (a + b, task by task).
    The callers' `.grad` are set aside and given back on the way out."""
    saved = [p.grad for p in phi]
    for p in phi:
        p.grad = None  # no other reference may hold a sum: AccumulateGrad adds in place only then
    try:
        yield
    finally:
        for p, g in zip(phi, saved):
            p.grad = g


def add_into_grad(phi: list[Tensor], grads: Sequence[Tensor | None]) -> None:
    """What `summed_in_grad`'s backward does, for a task that computes its gradients by hand (the
    implicit estimator's d - m): the first task's gradient becomes phi's `.grad` (no copy unless it is
    a view or not contiguous, e.g. autograd's expanded gradient of a sum), later ones are added in
    place, so that the sum is the same a + b, task by task, as summing returned ones."""
    for p, g in zip(phi, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g if g._base is None and g.is_contiguous() else g.clone()
        else:
            p.grad.add_(g)


MIN_BATCHED_TASKS = 4  # batched="auto": fewer tasks run faster one by one (benchmarks/peers/scaling.py)
TaskLoss = Callable[[BilevelProblem, Episode], tuple[Tensor, dict[str, Tensor]]]


def check_batchable(problem: BilevelProblem, episodes: Sequence[Episode]) -> None:
    """What one `vmap` over the tasks needs: episodes of one shape, and a problem that reads only the
    episodes' tensors (not `episode.meta`, which differs per task; a learned loss's `LossContext`
    never shows it) and is not data-parallel."""
    if not episodes:
        raise ConfigError("a meta-batch needs at least one episode")
    shapes = {tuple(tuple(t.shape) for t in (e.support_x, e.support_y, e.query_x, e.query_y)) for e in episodes}
    if len(shapes) > 1:
        raise ConfigError(f"tasks batched in one vmap need episodes of one shape, got {len(shapes)} different ones")
    check_pure_task(problem, "tasks batched in one vmap", "batched=false")


def check_pure_task(problem: BilevelProblem, path: str, remedy: str) -> None:
    """What a task written as a pure function of the episode's tensors needs (`path`: the vmap batch,
    compiled tasks): an initialisation not made per episode (a random draw, Proto-MAML's head), the
    query-loss meta-objective or the inner losses (not target_params, which reads `episode.meta`), no
    data-parallel inner loop. `remedy`: the setting that runs the problem another way."""
    if getattr(problem.init, "needs_episode", False) or problem.meta_objective == "target_params":
        raise ConfigError(f"{path} read only the episodes' tensors: an initialisation made per episode (a random "
                          f"draw, Proto-MAML's head) and meta_objective=target_params run task by task "
                          f"({remedy})")  # fmt: skip
    if problem.data_parallel is not None and problem.data_parallel.enabled:
        raise ConfigError(f"a data-parallel inner loop is not run as {path} ({remedy})")


def batching_pays(problem: BilevelProblem, episodes: Sequence[Episode]) -> bool:
    """The rule of `batched="auto"`: one vmap over the tasks where it was measured faster, the task
    loop elsewhere. On a 2-core CPU (benchmarks/peers: run.py and scaling.py) the vmap batch of the
    sinusoid MLP took 0.19x the loop's meta-step at meta-batch 25, 0.1x at 64, but 2.4x at 1 and
    1.5x at 2 (even at 4); for a Conv-4 it was 1.6x to 3.7x slower at every meta-batch (one task's
    convolutions already keep the cores busy; vmapped convolutions run slower kernels). So: batched
    when the tasks can be batched (`check_batchable`), there are at least `MIN_BATCHED_TASKS` of
    them and the model has no convolution. Not measured on a GPU, where the same rule applies. A
    model with dropout runs task by task too: in one vmap every task would draw the same masks, in
    the loop each task draws its own."""
    if len(episodes) < MIN_BATCHED_TASKS or not model_batches_well(problem.model):
        return False
    try:
        check_batchable(problem, episodes)
    except ConfigError:
        return False
    return True


def model_batches_well(model: torch.nn.Module) -> bool:
    """The model part of `batching_pays`: no convolution (slower batched) and no dropout (one mask
    for every task in a vmap)."""
    slower_or_different = (torch.nn.modules.conv._ConvNd, torch.nn.modules.dropout._DropoutNd)
    return not any(isinstance(m, slower_or_different) for m in model.modules())


def vmap_refusal(err: RuntimeError) -> bool:
    """Whether `err` is torch.func.vmap refusing an operation (data-dependent control flow, `.item()`,
    an op without a batching rule), not an error of the problem itself."""
    message = str(err).lower()
    return "vmap" in message or "batching rule" in message


def saved_bytes_per_task(problem: BilevelProblem, episode: Episode, task_loss: Callable[..., Any]) -> int:
    """Bytes of the tensors that one task's graph saves for its backward pass (each storage once),
    measured on the task loop's autograd graph of `episode`: what a task adds to a vmap batch, up to
    the batch's temporaries (a Conv-4's batch peaked at about 2x this per task, benchmarks/README.md)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task_loss(problem, episode, functional=False)
    return sum(storages.values())


def chunk_for_budget(budget_mb: float, per_task_bytes: int, tasks: int) -> int:
    """The most tasks whose saved graphs fit in `budget_mb` (at least one, at most `tasks`)."""
    return max(1, min(tasks, int(budget_mb * 2**20 // max(per_task_bytes, 1))))


def mean_over_tasks_batched(problem: BilevelProblem, episodes: Sequence[Episode], task_loss: TaskLoss,
                            chunk: int | None = None) -> HypergradOut:  # fmt: skip
    """The mean of `mean_over_tasks` from one batch: the B episodes stacked, and the gradient of
    `task_loss` (the outer loss of one task with phi in place, through `problem.with_meta_parameters`,
    and its detached metrics) by `torch.func.grad`, which differentiates the functional inner loops
    (`run_inner_loop`) exactly, vmapped over them (`chunk` tasks at a time; None: all) and averaged.
    Memory grows with the chunk: every task of a chunk holds its graph at once. A gradient that is
    zero everywhere is reported as None (not reached), as the task loop reports it."""
    from torch.func import grad_and_value, vmap

    check_batchable(problem, episodes)
    phi = problem.meta_parameters()
    data = [torch.stack([getattr(e, f) for e in episodes]) for f in ("support_x", "support_y", "query_x", "query_y")]

    def one_task(phi_values: list[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        return task_loss(problem.with_meta_parameters(phi_values), Episode(sx, sy, qx, qy))

    # vmap of the per-task gradient, not the gradient of a vmapped mean: with transductive BatchNorm the
    # latter came out wrong in torch 2.13 (second-order terms; tests/metaloss/hypergrad/test_unrolled_batched.py)
    per_task = vmap(grad_and_value(one_task, has_aux=True), in_dims=(None, 0, 0, 0, 0), chunk_size=chunk,
                    randomness="same")  # one minibatch order for every task, as in the loop  # fmt: skip
    task_grads, (_, metrics) = per_task([p.detach() for p in phi], *data)  # each [B, *phi_j.shape]
    grads = [g.mean(0) for g in task_grads]
    means = {k: float(v.double().mean()) for k, v in metrics.items()}  # [B] -> the mean, as the loop sums
    # torch.func gives zeros where phi is not reached; the task loop's None (the outer optimizer leaves
    # such a parameter alone, weight decay included) is reported for an all-zero gradient instead
    reached = [None if not bool(g.any()) else g for g in grads]
    return HypergradOut(grads=reached, outer_loss=means["loss"], metrics=means)


class OnlineEstimator(ABC):
    """The online-regime contract: each call advances the estimator's persistent inner states
    (particles) by one truncation of a `metaloss.online.TruncatedSystem` and returns the
    hypergradient estimate for that truncation, aligned with `phi`. States reset with the
    inner problem (after `system.horizon` steps)."""

    @abstractmethod
    def estimate(self, system: Any, phi: list[Tensor]) -> HypergradOut:
        """Return grads aligned with `phi`, the truncation's mean loss and metrics."""

    @abstractmethod
    def state_dict(self) -> dict:
        """The persistent state (inner states, particles, counters, noise), for checkpoints."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: the next estimates equal those of the uninterrupted run."""

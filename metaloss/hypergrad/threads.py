"""A meta-batch's tasks on several CPU threads at once, each task's inner loop and meta-gradient in
one worker thread with one intra-op thread.

A Conv-4 task is too small for two intra-op threads to split its convolutions well (5 support
images), and `vmap` over the tasks runs slower grouped kernels on a CPU (`batching_pays`). Running
whole tasks side by side instead keeps every core busy with a full task of the ordinary kernels:
task-level (inter-op) parallelism. PyTorch releases the GIL inside its kernels and runs a CPU
graph's backward on the thread that asks for it, so the tasks proceed in parallel.

Exact: every task computes what the loop computes, and the per-task gradients are summed in task
order, so the result does not depend on scheduling and equals the task loop run with one intra-op
thread bit for bit (tests/metaloss/hypergrad/test_threads.py). Each worker runs the model through
its own shallow copy of the module tree (the same Parameter and buffer tensors), because
`functional_call` swaps parameters into a module while it runs. Memory: one task graph per worker
at once, against one for the loop.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from metaloss.errors import ConfigError

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_local = threading.local()


def _forget_pools_in_child() -> None:
    """A forked child has none of the parent's worker threads: it starts its own pools when asked."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def _start_pool(workers: int) -> ThreadPoolExecutor:
    """`workers` threads, each pinned to one intra-op thread. PyTorch's OpenMP thread count is a
    per-thread setting that a thread takes from the process-wide value at its first parallel
    operation: the workers start while that value is 1, then the caller's own count is restored."""
    main = torch.get_num_threads()
    barrier = threading.Barrier(workers + 1, timeout=60)  # a pool that never starts its threads fails, not hangs

    def pin() -> int:
        torch.ones(1 << 16).sum()  # the first parallel op fixes this thread's count at 1
        barrier.wait()
        return torch.get_num_threads()

    torch.set_num_threads(1)
    try:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="metaloss-task")
        futures = [pool.submit(pin) for _ in range(workers)]  # each blocks until all have started
        try:
            barrier.wait()
            counts = [f.result() for f in futures]
        except threading.BrokenBarrierError:
            counts = []
    finally:
        torch.set_num_threads(main)
    if len(counts) != workers or any(c != 1 for c in counts) or torch.get_num_threads() != main:
        pool.shutdown()
        raise ConfigError(f"hypergrad.threads: this torch build cannot pin worker threads to one intra-op thread "
                          f"(workers report {counts}); use threads=1")  # fmt: skip
    return pool


def pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of `workers` pinned task threads (started once, reused)."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = _start_pool(workers)
        return _pools[workers]


def thread_safe_model(model: nn.Module) -> str | None:
    """Why tasks of `model` cannot run side by side (None: they can): a dropout layer draws from the
    one global generator in whatever order the threads reach it, and a BatchNorm layer that updates
    running statistics would update them from several tasks at once (the loop updates them in task
    order)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return f"dropout ({name}) draws its masks in thread order"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            return f"BatchNorm ({name}) updates running statistics"
    return None


def local_copy(model: nn.Module) -> nn.Module:
    """This thread's copy of `model`'s module tree, holding the very same parameter and buffer tensors
    (so gradients reach the caller's parameters), made once per thread and model."""
    copies = getattr(_local, "copies", None)
    if copies is None:
        copies = _local.copies = weakref.WeakKeyDictionary()
    tensors = [*model.parameters(), *model.buffers()]
    key = [id(t) for t in tensors]
    entry = copies.get(model)
    if entry is None or entry[0] != key:
        entry = (key, copy.deepcopy(model, memo={id(t): t for t in tensors}))
        copies[model] = entry
    return entry[1]


def map_in_threads(fn: Callable[[int], Any], count: int, workers: int) -> Iterator[Any]:
    """fn(0), ..., fn(count - 1) computed on `workers` pinned threads, yielded in order as they are
    ready (a caller that sums them holds few at once). Grad mode follows the caller's (it is a
    per-thread setting)."""
    grad_enabled = torch.is_grad_enabled()

    def run(i: int) -> Any:
        with torch.set_grad_enabled(grad_enabled):
            return fn(i)

    return pool(workers).map(run, range(count))


def resolve_threads(threads: int | str, model: nn.Module, tasks: int, device: torch.device) -> int:
    """How many task threads a meta-batch uses. "auto": the caller's intra-op thread count (one task
    per core) for a convolutional model on a CPU that `thread_safe_model` allows, with at least two
    tasks and workers that can be pinned (`pool`); 1 (the loop) otherwise. Measured on 2 cores
    (benchmarks/peers): Conv-4 tasks in threads took 0.65x to 0.96x the loop's time; the sinusoid
    MLP's 1.2x (its tiny ops wait on the GIL; it is batched instead, `batching_pays`). An explicit
    count > 1 that the model does not allow is an error."""
    if threads == "auto":
        convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        if device.type != "cpu" or tasks < 2 or not convolutional or thread_safe_model(model) is not None:
            return 1
        workers = max(1, min(torch.get_num_threads(), tasks))
        if workers > 1:
            try:
                pool(workers)
            except ConfigError:  # a torch build whose workers cannot be pinned: the loop
                return 1
        return workers
    if threads == 1:
        return 1
    reason = thread_safe_model(model)
    if reason is not None:
        raise ConfigError(f"hypergrad.threads={threads}: tasks cannot run side by side: {reason}; use threads=1")
    if device.type != "cpu":
        raise ConfigError(f"hypergrad.threads={threads} is for CPU tensors; on {device.type} use threads=1 "
                          f"(or batched=true)")  # fmt: skip
    return min(int(threads), tasks)


def check_threads(threads: int | str) -> int | str:
    """A valid `threads` setting: a positive count or "auto"."""
    if threads == "auto" or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        return threads
    raise ConfigError(f"threads must be a positive count or 'auto', got {threads!r}")


def first_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")

"""Exact tensor memory of a piece of work: the peak of the bytes PyTorch's CPU allocator holds.

The resident set (`VmHWM`) of a process moves by tens of MB between runs of the same meta-step
(glibc's heap, thread arenas), too much to rank implementations whose peaks differ by a parameter
copy. The profiler's allocation events (`profile_memory=True`) give every allocation and free of a
tensor, so the running sum of live bytes, and its peak, is the same in every run.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile, record_function


def tensor_peak_growth(before: Callable[[], None], measured: Callable[[], None]) -> int:
    """max over the events of `measured()` of (live tensor bytes - live bytes when it began), in
    bytes; >= 0. `before()` runs first under the profiler (one step of the same work) so that the
    blocks `measured()` frees were allocated under it: the profiler cannot size blocks allocated
    before it started, and their frees are left out. Only the calling thread's allocations are
    recorded (not those of worker threads). CPU tensors."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        before()
        with record_function("measured"):
            measured()
    events = list(prof.profiler.kineto_results.events())
    marker = next(e for e in events if e.name() == "measured")
    begin, end = marker.start_ns(), marker.start_ns() + marker.duration_ns()
    live = start = peak = 0
    for time_ns, size in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if time_ns > end:
            break
        live += size
        if time_ns < begin:
            start = live
        else:
            peak = max(peak, live - start)
    return peak

"""`torch.compile` of one task's MAML meta-gradient (issue 15's candidate): is it exact, and faster?

    python benchmarks/peers/compile_probe.py

Double backward does not go through a compiled autograd graph, so the meta-gradient is written as
one pure function with `torch.func` (`grad` of the query loss after `grad`-based inner steps, no
autograd at run time) and that function is compiled whole (Inductor, C++ on the CPU). One task of
the peers' Conv-4 case (32 filters, max-pool, transductive BatchNorm, 5-way 1-shot 15-query, inner
SGD lr 0.4), second order and first order (inner gradients detached), one intra-op thread.
Reported per mode: compile seconds (the first call), the largest difference of the compiled
meta-gradient from the eager one relative to the largest eager entry, and the median seconds per
call of eager `torch.func`, compiled, and the autograd task (`create_graph=True`) that metaloss's
task loop runs. Writes benchmarks/results/peers_compile_probe.json (`--dtype float64`:
peers_compile_probe_float64.json); the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from run import provenance, write_result  # benchmarks/peers/run.py, beside this script
from torch import Tensor
from torch.func import functional_call, grad

from metaloss.functional import apply_batchnorm_policy
from metaloss.models import Conv4

LR, WAYS, QUERIES = 0.4, 5, 15


def meta_gradient_fn(model: torch.nn.Module, second_order: bool) -> Callable[..., dict[str, Tensor]]:
    """(w0, support x, y, query x, y) -> d L_query(w0 - lr grad L_support(w0)) / d w0, by torch.func."""

    def query_loss(w0: dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        inner = grad(lambda w: F.cross_entropy(functional_call(model, w, (xs,)), ys))(w0)
        if not second_order:
            inner = {n: g.detach() for n, g in inner.items()}
        w1 = {n: w0[n] - LR * inner[n] for n in w0}
        return F.cross_entropy(functional_call(model, w1, (xq,)), yq)

    return grad(query_loss)


def autograd_task(model: torch.nn.Module, second_order: bool, params: dict[str, Tensor], *data: Tensor) -> list:
    xs, ys, xq, yq = data
    w0 = {n: p.detach().requires_grad_() for n, p in params.items()}
    inner = torch.autograd.grad(F.cross_entropy(functional_call(model, w0, (xs,)), ys), list(w0.values()),
                                create_graph=second_order)  # fmt: skip
    w1 = {n: w0[n] - LR * g for n, g in zip(w0, inner)}
    return list(torch.autograd.grad(F.cross_entropy(functional_call(model, w1, (xq,)), yq), list(w0.values())))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="float64: the compiled meta-gradient's exactness beyond float32 rounding")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/peers_compile_probe"
                                                               "[_float64].json")  # fmt: skip
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    out_file = args.out or Path("benchmarks/results/peers_compile_probe"
                                + ("_float64" if args.dtype == "float64" else "") + ".json")  # fmt: skip
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = apply_batchnorm_policy(Conv4(WAYS, 1, 32, 28, pool="max"), "transductive").to(dtype)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(WAYS, 1, 28, 28, generator=g, dtype=dtype), torch.arange(WAYS),
            torch.randn(WAYS * QUERIES, 1, 28, 28, generator=g, dtype=dtype),
            torch.arange(WAYS).repeat(QUERIES))  # fmt: skip
    rows = []
    for second_order in (True, False):
        eager = meta_gradient_fn(model, second_order)
        compiled = torch.compile(eager)
        reference = eager(params, *data)
        start = time.perf_counter()
        out = compiled(params, *data)
        compile_seconds = time.perf_counter() - start
        scale = max(r.abs().max().item() for r in reference.values())
        autograd = dict(zip(params, autograd_task(model, second_order, params, *data)))
        rows.append({
            "mode": "second order" if second_order else "first order",
            "compile_seconds": round(compile_seconds, 1),
            "compiled_max_relative_difference": max((out[n] - reference[n]).abs().max().item() for n in params) / scale,
            "eager_func_vs_autograd_max_relative_difference":
                max((autograd[n] - reference[n]).abs().max().item() for n in params) / scale,
            "eager_func_s": median_seconds(lambda e=eager: e(params, *data), args.repeats),
            "compiled_s": median_seconds(lambda c=compiled: c(params, *data), args.repeats),
            "autograd_s": median_seconds(lambda s=second_order: autograd_task(model, s, params, *data), args.repeats),
        })  # fmt: skip
    write_result({"benchmark": "peers_compile_probe", **provenance(), "torch": torch.__version__, "threads": 1,
                  "dtype": args.dtype, "rows": rows}, out_file)  # fmt: skip


if __name__ == "__main__":
    main()

"""Seconds per second-order MAML meta-step: metaloss (`Unrolled("full")` + outer Adam, i.e.
`metaloss.engine.meta_step`) against the textbook `higher` loop, in one process.

Setting (defaults): Conv-4 with 32 filters, 28x28x1 inputs, 5-way 1-shot, 15 queries per class,
meta-batch 32, one inner SGD step (lr 0.4), transductive BatchNorm, float32, CPU.

Both sides start from the same initialisation and see the same pre-sampled meta-batches (episode
sampling is outside the timed region). After `--warmup` untimed steps each, the `--repeats` timed
steps alternate between the two (the order flips every repeat), so slow drifts of the machine hit
both alike. The gradient difference is measured once, on one meta-batch, at one and the same phi,
in float32 and in float64.

The last stdout line is one JSON object with the results; the same JSON is written to `--out`.

    python benchmarks/maml_step_vs_higher.py            # defaults: --repeats 5 --meta-batch 32 ...
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import higher
import torch
from torch import nn

from metaloss.engine import meta_step
from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad.unrolled import Unrolled
from metaloss.losses import cross_entropy
from metaloss.meta.init import LearnedInit
from metaloss.meta.optimizer import HyperparameterOptimizer
from metaloss.models import Conv4
from metaloss.problem import BilevelProblem
from metaloss.types import Episode
from tasks.few_shot import FewShotSampler

N_WAY, K_SHOT, Q_QUERY, IMAGE_SIZE = 5, 1, 15, 28


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-steps per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-steps per implementation first")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--pool", choices=("max", "stride"), default="max")
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/maml_step_vs_higher.json"))
    parser.add_argument(
        "--profile", action="store_true", help="also profile one meta-step of each (torch.profiler tables to stderr)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.meta_batch < 1 or args.filters < 1 or args.threads < 1:
        parser.error("need --repeats >= 1, --warmup >= 0, and positive --meta-batch, --filters, --threads")
    return args


def make_sampler(seed: int) -> FewShotSampler:
    """Random 28x28x1 'images' of 20 classes, enough examples per class for 1 + 15 draws."""
    g = torch.Generator().manual_seed(seed)
    n_classes, per_class = 20, K_SHOT + Q_QUERY + 4
    images = torch.rand(n_classes * per_class, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return FewShotSampler(images, labels, range(n_classes), n_way=N_WAY, k_shot=K_SHOT, q_query=Q_QUERY, seed=seed)


def meta_batch(sampler: FewShotSampler, index: int, size: int, dtype: torch.dtype) -> list[Episode]:
    return [sampler.episode(index * size + i).to(dtype=dtype) for i in range(size)]


def make_model(args: argparse.Namespace, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(args.seed)
    model = Conv4(n_classes=N_WAY, in_channels=1, filters=args.filters, image_size=IMAGE_SIZE, pool=args.pool)
    return apply_batchnorm_policy(model.to(dtype), "transductive")


def make_problem(model: nn.Module, inner_lr: float) -> BilevelProblem:
    return BilevelProblem(
        model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=inner_lr), cross_entropy, cross_entropy, 1
    )


# ---------------------------------------------------------------------------------------------
# the two meta-steps


def ours_step(problem: BilevelProblem, outer_opt: torch.optim.Optimizer, episodes: Sequence[Episode]) -> float:
    """metaloss: hypergradient by `Unrolled("full")`, then the outer Adam step (engine.meta_step)."""
    return meta_step(problem, Unrolled("full"), outer_opt, episodes).outer_loss


def higher_grads(model: nn.Module, inner_lr: float, episodes: Sequence[Episode]) -> float:
    """The `higher` MAML loop: per task, one differentiable SGD step on the support set, the
    query loss / B backpropagated into model.parameters()'s .grad (accumulating)."""
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    total = 0.0
    for ep in episodes:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, track_higher_grads=True) as (
            fmodel,
            diffopt,
        ):
            diffopt.step(cross_entropy(fmodel(ep.support_x), ep.support_y))
            loss = cross_entropy(fmodel(ep.query_x), ep.query_y)
            (loss / len(episodes)).backward()
            total += loss.item()
    return total / len(episodes)


def higher_step(
    model: nn.Module, inner_lr: float, outer_opt: torch.optim.Optimizer, episodes: Sequence[Episode]
) -> float:
    outer_opt.zero_grad(set_to_none=True)
    loss = higher_grads(model, inner_lr, episodes)
    outer_opt.step()
    return loss


# ---------------------------------------------------------------------------------------------
# gradient parity


def gradient_difference(args: argparse.Namespace, sampler: FewShotSampler, dtype: torch.dtype) -> dict[str, float]:
    """Both meta-gradients on meta-batch 0 at the same phi, compared.

    rel_norm: ||g_ours - g_higher|| / ||g_higher|| over all parameters concatenated;
    max_abs_rel: max_i |g_ours_i - g_higher_i| / max_i |g_higher_i| (elementwise, scale-normalised);
    max_tensor_rel: max over parameter tensors of ||diff|| / ||g_higher||, over tensors whose
    gradient norm is at least 1e-6 of the total (conv biases before a BatchNorm have a true
    meta-gradient of exactly zero and would only compare round-off).
    """
    model = make_model(args, dtype)
    episodes = meta_batch(sampler, 0, args.meta_batch, dtype)
    problem = make_problem(model, args.inner_lr)
    ours = [g.detach() for g in Unrolled("full").estimate(problem, episodes).grads]
    model.zero_grad(set_to_none=True)
    higher_grads(model, args.inner_lr, episodes)
    ref = [p.grad.detach().clone() for p in model.parameters()]
    a = torch.cat([g.flatten() for g in ours]).double()
    b = torch.cat([g.flatten() for g in ref]).double()
    total = b.norm()
    tensor_rel = [
        ((g.double() - r.double()).norm() / r.double().norm()).item()
        for g, r in zip(ours, ref)
        if r.double().norm() >= 1e-6 * total
    ]
    return {
        "rel_norm": ((a - b).norm() / total).item(),
        "max_abs_rel": ((a - b).abs().max() / b.abs().max()).item(),
        "max_tensor_rel": max(tensor_rel),
        "grad_norm": total.item(),
    }


# ---------------------------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call; on a shared machine the CPU time
    is the less disturbed of the two, the wall time is the headline number."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(times: list[float], cpu_times: list[float]) -> dict[str, float | list[float]]:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "times_s": [round(t, 4) for t in times],
        "cpu_median_s": statistics.median(cpu_times),
        "cpu_min_s": min(cpu_times),
    }


def profile_step(name: str, fn: Callable[[], float]) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(f"\n=== profile: {name} (one meta-step, sorted by self CPU time) ===\n{table}", file=sys.stderr)


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    info = machine()
    sampler = make_sampler(args.seed)

    # parity first, on fresh models, so the timed runs below do not move phi before it is measured
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    grad_diff = {name: gradient_difference(args, sampler, dt) for name, dt in dtypes.items()}

    dtype = torch.float32
    ours_model = make_model(args, dtype)
    higher_model = copy.deepcopy(ours_model)
    problem = make_problem(ours_model, args.inner_lr)
    ours_opt = torch.optim.Adam(problem.meta_parameters(), lr=args.outer_lr)
    higher_opt = torch.optim.Adam(higher_model.parameters(), lr=args.outer_lr)

    steps = args.warmup + args.repeats
    batches = [meta_batch(sampler, i, args.meta_batch, dtype) for i in range(steps)]

    def run_ours(i: int) -> Callable[[], float]:
        return lambda: ours_step(problem, ours_opt, batches[i])

    def run_higher(i: int) -> Callable[[], float]:
        return lambda: higher_step(higher_model, args.inner_lr, higher_opt, batches[i])

    times: dict[str, list[float]] = {"ours": [], "higher": []}
    cpu_times: dict[str, list[float]] = {"ours": [], "higher": []}
    for i in range(steps):
        order = [("ours", run_ours(i)), ("higher", run_higher(i))]
        if i % 2:
            order.reverse()
        for name, fn in order:
            seconds, cpu_seconds = timed(fn)
            if i >= args.warmup:
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)
            warm = "(warm-up) " if i < args.warmup else ""
            print(f"step {i} {warm}{name}: {seconds:.3f} s wall, {cpu_seconds:.3f} s CPU", file=sys.stderr)

    if args.profile:
        profile_step("ours", run_ours(0))
        profile_step("higher", run_higher(0))

    ours, ref = summary(times["ours"], cpu_times["ours"]), summary(times["higher"], cpu_times["higher"])
    result: dict[str, object] = {
        "benchmark": "maml_step_vs_higher",
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "higher_version": importlib.metadata.version("higher"),
        "machine": {**info, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "setting": {
            "model": f"Conv4(filters={args.filters}, pool={args.pool}, 28x28x1, transductive BatchNorm)",
            "n_way": N_WAY,
            "k_shot": K_SHOT,
            "q_query": Q_QUERY,
            "meta_batch": args.meta_batch,
            "inner_steps": 1,
            "inner_opt": f"sgd(lr={args.inner_lr})",
            "outer_opt": f"adam(lr={args.outer_lr})",
            "second_order": True,
            "dtype": "float32",
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "ours": ours,
        "higher": ref,
        "ratio_ours_over_higher": {
            "median": ours["median_s"] / ref["median_s"],
            "min": ours["min_s"] / ref["min_s"],
            "cpu_median": ours["cpu_median_s"] / ref["cpu_median_s"],
            # ours_i / higher_i for the two back-to-back steps of repeat i: robust to slow drifts
            "paired_median": statistics.median(o / h for o, h in zip(times["ours"], times["higher"])),
        },
        "grad_diff": grad_diff,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

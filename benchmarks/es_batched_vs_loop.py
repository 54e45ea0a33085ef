"""ES particles one after another (autograd inner gradients) against one `torch.func.vmap` batch
(`batched=True`), side by side in one process: seconds per hypergradient estimate, and the largest
difference between the two estimates (they must agree to float tolerance).

    python benchmarks/es_batched_vs_loop.py

Cases: MAML's sinusoid MLP (1-40-40-1, 5 inner steps, 4 tasks of 10 points) with antithetic ES
(8 pairs) and ES-Single over truncations of one step (8 particles); a 5-way 1-shot Conv-4 of MAML's
Omniglot shape (64 filters, 28x28, transductive BatchNorm, 1 inner step, 4 tasks) with antithetic
ES (4 pairs). Inputs are random tensors of the real shapes: only time and agreement are measured.
Writes benchmarks/results/es_batched_vs_loop.json; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad import AntitheticES, EpisodicOnline
from metaloss.losses import accuracy, cross_entropy, mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit
from metaloss.models import MLP, Conv4
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


def sinusoid_case() -> tuple[BilevelProblem, list[Episode]]:
    model = MLP(1, [40, 40], 1)
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.01), mse, mse, 5)
    g = torch.Generator().manual_seed(0)
    episodes = []
    for _ in range(4):
        x, xq = torch.rand(10, 1, generator=g) * 10 - 5, torch.rand(10, 1, generator=g) * 10 - 5
        episodes.append(Episode(x, torch.sin(x), xq, torch.sin(xq)))
    return problem, episodes


def conv4_case() -> tuple[BilevelProblem, list[Episode]]:
    model = apply_batchnorm_policy(Conv4(n_classes=5, filters=64, image_size=28, global_pool=True), "transductive")
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.4), cross_entropy,
                             cross_entropy, 1, metric=accuracy)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    episodes = [
        Episode(torch.rand(5, 1, 28, 28, generator=g), torch.arange(5), torch.rand(25, 1, 28, 28, generator=g),
                torch.arange(5).repeat(5))
        for _ in range(4)
    ]  # fmt: skip
    return problem, episodes


CASES: dict[str, tuple[Callable, Callable[[bool], object]]] = {
    "sinusoid MLP, antithetic ES, 8 pairs": (sinusoid_case, lambda b: AntitheticES(8, 0.01, seed=0, batched=b)),
    "sinusoid MLP, ES-Single K=1, 8 particles": (
        sinusoid_case,
        lambda b: EpisodicOnline("es_single", truncation=1, particles=8, sigma=0.01, seed=0, batched=b),
    ),
    "Conv-4 64 filters 28x28, antithetic ES, 4 pairs": (conv4_case, lambda b: AntitheticES(4, 0.01, seed=0, batched=b)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/es_batched_vs_loop.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (make_case, make_estimator) in CASES.items():
        torch.manual_seed(0)
        problem, episodes = make_case()
        seconds: dict[bool, list[float]] = {False: [], True: []}
        grads: dict[bool, list[torch.Tensor]] = {}
        for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
            for batched in (False, True):  # alternate, so drifting machine load hits both alike
                estimator = make_estimator(batched)
                started = time.perf_counter()
                out = estimator.estimate(problem, episodes)
                if repeat:
                    seconds[batched].append(time.perf_counter() - started)
                grads[batched] = [g for g in out.grads if g is not None]
        difference = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True]))
        scale = max(a.abs().max().item() for a in grads[False])
        loop, batch = statistics.median(seconds[False]), statistics.median(seconds[True])
        rows.append({"case": name, "loop_seconds": round(loop, 4), "batched_seconds": round(batch, 4),
                     "batched_over_loop": round(batch / loop, 3), "max_abs_difference": difference,
                     "max_abs_gradient": scale})  # fmt: skip
        print(f"{name}: loop {loop:.3f} s, batched {batch:.3f} s, ratio {batch / loop:.2f}, "
              f"max |diff| {difference:.1e} (max |g| {scale:.1e})", file=sys.stderr)  # fmt: skip
    result = {
        "benchmark": "es_batched_vs_loop",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The unrolled hypergradient task by task (autograd) against the meta-batch as one `torch.func.vmap`
batch (`Unrolled(batched=True)`), side by side in one process, alternating: seconds per estimate
(median), the ratio, and the largest difference between the two estimates (float32).

    python benchmarks/unrolled_batched_vs_loop.py

Cases: the default sinusoid job's shapes (MLP 1-40-40-1, meta-batch 25 of 10 support and 10 query
points, one inner SGD step at lr 0.01; second and first order, and 5 inner steps), and MAML's
Omniglot 5-way 1-shot Conv-4 (64 filters, 28x28, transductive BatchNorm, one step at lr 0.4,
meta-batch 4, random inputs of the real shapes, `es_batched_vs_loop.conv4_case`), and an MLP of the
MNIST-1D tasks' shapes with 25 minibatched inner steps (meta-batch 8), a larger MLP than the
sinusoid's to test the `hypergrad.batched=auto` rule on. Writes
benchmarks/results/unrolled_batched_vs_loop.json; the last stdout line is the JSON.
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
from pathlib import Path

import torch
from es_batched_vs_loop import conv4_case

from metaloss.hypergrad import Unrolled
from metaloss.losses import cross_entropy, mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit
from metaloss.models import MLP
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


def sinusoid_job(steps: int = 1, tasks: int = 25) -> tuple[BilevelProblem, list[Episode]]:
    model = MLP(1, [40, 40], 1)
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.01), mse, mse, steps)
    g = torch.Generator().manual_seed(0)
    episodes = []
    for _ in range(tasks):
        amplitude, phase = 0.1 + 4.9 * torch.rand((), generator=g), torch.pi * torch.rand((), generator=g)
        x, xq = torch.rand(10, 1, generator=g) * 10 - 5, torch.rand(10, 1, generator=g) * 10 - 5
        episodes.append(Episode(x, amplitude * torch.sin(x - phase), xq, amplitude * torch.sin(xq - phase)))
    return problem, episodes


def mnist1d_shaped_job(tasks: int = 8) -> tuple[BilevelProblem, list[Episode]]:
    """The shapes of `task=mnist1d algorithm=ml3 problem.inner_steps=25 problem.inner_batch_size=50`
    with cross-entropy: MLP 40-100-100-10, 300 support and 300 query rows, 25 minibatched SGD steps."""
    model = MLP(40, [100, 100], 10)
    problem = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.1), cross_entropy,
                             cross_entropy, 25, inner_batch_size=50, shuffle_seed=0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    episodes = [Episode(torch.randn(300, 40, generator=g), torch.randint(10, (300,), generator=g),
                        torch.randn(300, 40, generator=g), torch.randint(10, (300,), generator=g))
                for _ in range(tasks)]  # fmt: skip
    return problem, episodes


CASES = {  # name: (problem and episodes, mode)
    "sinusoid MLP, meta-batch 25, 1 step, second order": (lambda: sinusoid_job(1), "full"),
    "sinusoid MLP, meta-batch 25, 1 step, first order": (lambda: sinusoid_job(1), "first_order"),
    "sinusoid MLP, meta-batch 25, 5 steps, second order": (lambda: sinusoid_job(5), "full"),
    "Conv-4 64 filters 28x28 5-way 1-shot, meta-batch 4, 1 step, second order": (conv4_case, "full"),
    "MNIST-1D-shaped MLP 40-100-100-10, meta-batch 8, 25 minibatched steps, second order": (mnist1d_shaped_job, "full"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/unrolled_batched_vs_loop.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (make_case, mode) in CASES.items():
        torch.manual_seed(0)
        problem, episodes = make_case()
        seconds: dict[bool, list[float]] = {False: [], True: []}
        grads: dict[bool, list[torch.Tensor]] = {}
        for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
            for batched in (False, True):  # alternate, so drifting machine load hits both alike
                started = time.perf_counter()
                out = Unrolled(mode, batched=batched).estimate(problem, episodes)
                if repeat:
                    seconds[batched].append(time.perf_counter() - started)
                grads[batched] = [g for g in out.grads if g is not None]
        difference = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True]))
        scale = max(a.abs().max().item() for a in grads[False])
        loop, batch = statistics.median(seconds[False]), statistics.median(seconds[True])
        rows.append({"case": name, "loop_seconds": round(loop, 4), "batched_seconds": round(batch, 4),
                     "batched_over_loop": round(batch / loop, 3), "max_abs_difference": difference,
                     "max_abs_gradient": scale})  # fmt: skip
        print(f"{name}: loop {loop:.4f} s, batched {batch:.4f} s, ratio {batch / loop:.2f}, "
              f"max |diff| {difference:.1e} (max |g| {scale:.1e})", file=sys.stderr)  # fmt: skip
    result = {
        "benchmark": "unrolled_batched_vs_loop",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""ANIL's inner loop with the body's features computed once per episode (`reuse_features=True`,
the default) against recomputing them at every inner step, side by side in one process: seconds
per second-order hypergradient and the largest difference between the two.

    python benchmarks/anil_feature_reuse.py

Setting: the Omniglot minimal 20-way experiment's shapes (Conv-4, 64 filters, strided, mean-pooled,
28x28, 20-way 1-shot 5-query, meta-batch 8) with ANIL's 5 inner steps at lr 0.1, float32, one
thread. Inputs are random tensors of those shapes: only time and agreement are measured.
Writes benchmarks/results/anil_feature_reuse.json; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad import Unrolled
from metaloss.losses import accuracy, cross_entropy
from metaloss.meta import HyperparameterOptimizer, LearnedInit
from metaloss.models import Conv4
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/anil_feature_reuse.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = apply_batchnorm_policy(Conv4(n_classes=20, filters=64, image_size=28, global_pool=True), "transductive")
    reuse = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.1), cross_entropy,
                           cross_entropy, args.inner_steps, adapt=["head"], metric=accuracy)  # fmt: skip
    recompute = copy.copy(reuse)
    recompute.reuse_features = False
    g = torch.Generator().manual_seed(0)
    episodes = [
        Episode(torch.rand(20, 1, 28, 28, generator=g), torch.arange(20), torch.rand(100, 1, 28, 28, generator=g),
                torch.arange(20).repeat(5))
        for _ in range(8)
    ]  # fmt: skip
    seconds: dict[str, list[float]] = {"reuse": [], "recompute": []}
    grads = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        for name, problem in (("recompute", recompute), ("reuse", reuse)):
            started = time.perf_counter()
            out = Unrolled("full").estimate(problem, episodes)
            if repeat:
                seconds[name].append(time.perf_counter() - started)
            grads[name] = out.grads
    difference = max((a - b).abs().max().item() for a, b in zip(grads["reuse"], grads["recompute"]))
    scale = max(a.abs().max().item() for a in grads["recompute"])
    timing = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "benchmark": "anil_feature_reuse",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": args.threads,
        "inner_steps": args.inner_steps,
        "seconds_per_meta_step": {k: round(v, 3) for k, v in timing.items()},
        "reuse_over_recompute": round(timing["reuse"] / timing["recompute"], 3),
        "max_abs_difference": difference,
        "max_abs_gradient": scale,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

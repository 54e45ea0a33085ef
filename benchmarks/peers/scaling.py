"""Scaling curves: seconds per meta-step and peak memory growth against the meta-batch size and the
number of inner steps, metaloss task by task, batched and in task threads against a peer, for the
sinusoid MLP and the Conv-4 of benchmarks/peers/run.py (same models, data, timing and memory method).

    python benchmarks/peers/scaling.py                       # both models, peer: TorchOpt
    python benchmarks/peers/scaling.py --models sinusoid --peer learn2learn --ours metaloss metaloss_batched

Sweeps: meta-batch 1, 2, 4, 8, 16, 32, 64 at one inner step; inner steps 1, 2, 5, 10, 20 at
meta-batch `--steps-meta-batch` (default 25 for the sinusoid, 4 for the Conv-4, whose 20-step
meta-batch of 32 would take minutes per point). Second order MAML throughout. Each point: one
warm-up and `--repeats` timed meta-steps per implementation, round-robin; memory in a fresh
process per implementation and point. Writes benchmarks/results/peers_scaling.{json,png}; the last
stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

import torch
from run import CLASSES, Case, build, memory, meta_batches, provenance, round_robin, write_result

META_BATCHES = (1, 2, 4, 8, 16, 32, 64)
INNER_STEPS = (1, 2, 5, 10, 20)
BASE = {"sinusoid": Case("sinusoid", meta_batch=25, inner_lr=0.01), "conv4": Case("conv4")}
STEPS_META_BATCH = {"sinusoid": 25, "conv4": 4}


def point(case: Case, names: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    impls = {n: build(case, n, args.seed) for n in names}
    seconds = round_robin(impls, meta_batches(case, 1 + args.repeats, args.seed + 1), warmup=1)
    out = {}
    for n in names:
        out[n] = {"median_s": round(statistics.median(seconds[n]), 5)}
        if not args.no_memory:
            out[n]["peak_growth_mb"] = round(memory(case, n, args)["peak_growth_mb"], 1)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["curves"])
    metrics = ["median_s"] + ([] if result["no_memory"] else ["peak_growth_mb"])
    fig, axes = plt.subplots(len(models) * len(metrics), 2, figsize=(10, 3.2 * len(models) * len(metrics)),
                             squeeze=False)  # fmt: skip
    for i, model in enumerate(models):
        for j, metric in enumerate(metrics):
            row = axes[i * len(metrics) + j]
            for ax, sweep, xlabel in ((row[0], "meta_batch", "meta-batch size (1 inner step)"),
                                      (row[1], "inner_steps", "inner steps")):  # fmt: skip
                points = result["curves"][model][sweep]
                xs = [p["x"] for p in points]
                for name in points[0]["implementations"]:
                    ax.plot(xs, [p["implementations"][name][metric] for p in points], marker="o", label=name)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("seconds per meta-step" if metric == "median_s" else "peak memory growth (MB)")
                title = model if sweep == "meta_batch" else f"{model}, meta-batch {points[0]['meta_batch']}"
                ax.set_title(title)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(BASE), default=list(BASE))
    parser.add_argument(
        "--peer", choices=sorted(n for n in CLASSES if not n.startswith("metaloss")), default="torchopt"
    )
    parser.add_argument("--ours", nargs="+", choices=sorted(n for n in CLASSES if n.startswith("metaloss")),
                        default=["metaloss", "metaloss_batched", "metaloss_threads"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-meta-batch", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--min-steps", type=int, default=1, help="leave out the inner-step points below this")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers_scaling.json"))
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("need --repeats >= 1 and --threads >= 1")
    args.warmup = 1  # for the memory children: warm-up + 1 meta-steps
    torch.set_num_threads(args.threads)
    names = [*args.ours, args.peer]
    load_at_start = os.getloadavg()
    curves: dict[str, dict[str, list]] = {}
    for model in args.models:
        curves[model] = {"meta_batch": [], "inner_steps": []}
        for size in (b for b in META_BATCHES if b <= args.max_meta_batch):
            case = dataclasses.replace(BASE[model], meta_batch=size, steps=1)
            curves[model]["meta_batch"].append({"x": size, "implementations": point(case, names, args)})
            print(f"{model} meta-batch {size}: {curves[model]['meta_batch'][-1]}", file=sys.stderr)
        for steps in (s for s in INNER_STEPS if args.min_steps <= s <= args.max_steps):
            case = dataclasses.replace(BASE[model], meta_batch=STEPS_META_BATCH[model], steps=steps)
            curves[model]["inner_steps"].append({"x": steps, "meta_batch": case.meta_batch,
                                                 "implementations": point(case, names, args)})  # fmt: skip
            print(f"{model} inner steps {steps}: {curves[model]['inner_steps'][-1]}", file=sys.stderr)
    result = {
        "benchmark": "peers_scaling",
        **provenance(),
        "torch": torch.__version__,
        "threads": args.threads, "repeats": args.repeats, "peer": args.peer, "ours": args.ours,
        "no_memory": args.no_memory,
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "curves": curves,
    }  # fmt: skip
    write_result(result, args.out)
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

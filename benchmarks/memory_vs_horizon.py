"""Peak memory and time of one hypergradient against the number of inner steps T.

Each (estimator, T) runs in a fresh subprocess; the peak is the growth of the resident set during
`estimate` (ru_maxrss after it minus the resident set just before it), so torch's own footprint
cancels. The children run with MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every large
buffer by mmap and returns it on free, so the resident set follows live memory (with glibc's
default, adaptive threshold, heap fragmentation alone grew a flat estimator's peak 1.3-2.8x from
T = 10 to 1,000, measured here). Setting: an MLP 64-256-256-1 (tanh) regressing a random linear target, batch 256,
inner SGD lr 0.01 with a learned L2 penalty and iMAML's proximal term (so every estimator has a
non-zero hypergradient), float32, one task. ES: 2 antithetic pairs over the whole run, one after
another or as one vmap batch; ES-Single: 4 particles (2 pairs) as one batch, truncations of 10.

    python benchmarks/memory_vs_horizon.py                  # T in 10 100 1000
    python benchmarks/memory_vs_horizon.py --horizons 10 100 --estimators unrolled implicit
    python benchmarks/memory_vs_horizon.py --replot         # redraw the PNG from the recorded JSON

Writes benchmarks/results/memory_vs_horizon.{json,png}; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ESTIMATORS = ("unrolled", "checkpointed", "implicit", "es", "es_batched", "es_single")


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(estimator_name: str, horizon: int) -> dict:
    import torch
    from torch import nn

    from metaloss.hypergrad import AntitheticES, CheckpointedUnrolled, EpisodicOnline, Implicit, Unrolled
    from metaloss.losses import mse
    from metaloss.meta import HyperparameterOptimizer, LearnedInit, Proximal
    from metaloss.problem import BilevelProblem
    from metaloss.types import Episode

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    problem = BilevelProblem(
        model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.01, learn=["lr"]), mse, mse, horizon,
        inner_regularizer=Proximal(1.0),
    )  # fmt: skip
    x, xq, w = torch.randn(256, 64), torch.randn(256, 64), torch.randn(64, 1)
    episodes = [Episode(x, x @ w, xq, xq @ w)]
    estimator = {
        "unrolled": lambda: Unrolled("full"),
        "checkpointed": lambda: CheckpointedUnrolled(),
        "implicit": lambda: Implicit("cg", iterations=20),
        "es": lambda: AntitheticES(particles=2, sigma=0.01),
        "es_batched": lambda: AntitheticES(particles=2, sigma=0.01, batched=True),
        "es_single": lambda: EpisodicOnline("es_single", truncation=10, particles=4, sigma=0.01, batched=True),
    }[estimator_name]()
    before = rss_kib()
    started = time.perf_counter()
    estimator.estimate(problem, episodes)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"estimator": estimator_name, "T": horizon, "peak_growth_mib": (peak - before) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--horizons", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_vs_horizon.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the recorded JSON")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    if args.replot:
        plot(json.loads(args.out.read_text())["rows"], args.out.with_suffix(".png"))
        return
    rows = []
    for name in args.estimators:
        for horizon in args.horizons:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, str(horizon)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            line = f"{name:>12} T={horizon:<5} +{row['peak_growth_mib']:8.1f} MiB {row['seconds']:7.2f} s"
            print(line, file=sys.stderr)
    ratios = {}
    for name in args.estimators:
        by_t = {r["T"]: r["peak_growth_mib"] for r in rows if r["estimator"] == name}
        lo, hi = min(by_t), max(by_t)
        ratios[name] = by_t[hi] / max(by_t[lo], 1e-9)
    result = {
        "benchmark": "memory_vs_horizon",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "rows": rows,
        "peak_ratio_longest_over_shortest_T": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(json.dumps(result))


def plot(rows: list[dict], path: Path) -> None:
    """Peak memory growth and time against T, log-log, one line per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, seconds) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(r["estimator"] for r in rows):
        mine = sorted((r for r in rows if r["estimator"] == name), key=lambda r: r["T"])
        horizons = [r["T"] for r in mine]
        memory.plot(horizons, [r["peak_growth_mib"] for r in mine], "o-", label=name)
        seconds.plot(horizons, [r["seconds"] for r in mine], "o-", label=name)
    for ax, label in ((memory, "peak memory growth (MiB)"), (seconds, "seconds per hypergradient")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner steps T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", lw=0.3)
    memory.legend(fontsize=8)
    memory.set_title("memory against T (MLP 64-256-256-1)")
    seconds.set_title("time against T")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

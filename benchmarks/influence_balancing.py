"""The influence-balancing task (Tallec & Ollivier 2017; PES, Vicol et al. 2021, fig. 4):
theta0 = 0.5, n = 23, ten entries +theta, truncations of K steps, SGD on theta after each.
Truncated backpropagation with short truncations moves theta the wrong way; PES and ES-Single,
unbiased, move it toward the optimum of the long-run loss (theta* = -1/6 at steady state).

    python benchmarks/influence_balancing.py

Writes benchmarks/results/influence_balancing.{json,png}; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from metaloss.hypergrad import OnlineES, TruncatedBackprop
from metaloss.online import online_meta_train
from tasks.synthetic import InfluenceBalancing

K = 10
METHODS = {
    "TBPTT K=1": lambda seed: TruncatedBackprop(1),
    "TBPTT K=10": lambda seed: TruncatedBackprop(K),
    "TBPTT K=100": lambda seed: TruncatedBackprop(100),
    "PES (4 particles)": lambda seed: OnlineES(4, 0.01, K, resample_every=1, seed=seed),
    "ES-Single (4 particles)": lambda seed: OnlineES(4, 0.01, K, resample_every=None, seed=seed),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/influence_balancing.json"))
    args = parser.parse_args()
    rows = []
    for name, make in METHODS.items():
        theta = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        started = time.perf_counter()
        history = online_meta_train(
            InfluenceBalancing(), make(args.seed), [theta], torch.optim.SGD([theta], lr=args.lr), args.outer_steps
        )
        trajectory = [0.5] + [h["phi/0"] for h in history]
        rows.append({"method": name, "final_theta": trajectory[-1], "theta": trajectory,
                     "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"{name:>24}: theta {trajectory[-1]:+.4f}", file=sys.stderr)
    result = {
        "benchmark": "influence_balancing",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "final_theta": {r["method"]: round(r["final_theta"], 4) for r in rows},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(r["theta"], label=r["method"])
    ax.axhline(-1 / 6, color="gray", ls=":", lw=0.8, label="steady-state optimum -1/6")
    ax.set_xlabel("truncation (outer step)")
    ax.set_ylabel("theta")
    ax.set_title("Influence balancing: truncated backprop vs PES vs ES-Single")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()

"""PES's toy 2D regression (Vicol et al. 2021, sec. 5.1, fig. 3): meta-learn a linear learning-rate
schedule theta = (log initial lr, log final lr) for T = 100 SGD steps on a 2D loss with ripples
(`tasks.synthetic.LearningRateSchedule2D`), theta_0 = (-4, -4), outer Adam (lr 0.01, betas
0.99/0.999) after every truncation of K = 10 steps. Truncated backpropagation against PES,
ES-Single and full-unroll ES (100 particles, sigma 0.3, the paper's settings), every method given
the same number of inner steps. The meta-objective reported is the mean loss over a whole fresh
inner problem of T steps, evaluated at the final theta, beside the best value on a 97x97 grid.

    python benchmarks/lr_schedule_2d.py

Writes benchmarks/results/lr_schedule_2d.{json,png}; the last stdout line is the JSON.
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

from metaloss.hypergrad import OnlineES, TruncatedBackprop
from metaloss.online import online_meta_train
from tasks.synthetic import LearningRateSchedule2D

T, K, PARTICLES, SIGMA = 100, 10, 100, 0.3
METHODS = {  # name -> (estimator maker, truncation length)
    "TBPTT K=10": (lambda seed: TruncatedBackprop(K), K),
    "PES K=10": (lambda seed: OnlineES(PARTICLES, SIGMA, K, resample_every=1, seed=seed), K),
    "ES-Single K=10": (lambda seed: OnlineES(PARTICLES, SIGMA, K, resample_every=None, seed=seed), K),
    "ES, full unroll": (lambda seed: OnlineES(PARTICLES, SIGMA, T, resample_every=None, seed=seed), T),
}


def meta_objective(system: LearningRateSchedule2D, theta: torch.Tensor) -> torch.Tensor:
    """Mean inner loss over one whole inner problem, for theta [P, 2] -> [P]."""
    with torch.no_grad():
        return system.unroll(system.init(len(theta)), [theta], system.horizon)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner-steps", type=int, default=50_000, help="inner-step budget of every method")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lr_schedule_2d.json"))
    args = parser.parse_args()
    system = LearningRateSchedule2D(T)
    grid = torch.linspace(-6, 6, 97, dtype=torch.float64)
    pairs = torch.cartesian_prod(grid, grid)  # [97 * 97, 2]: (initial, final)
    surface = meta_objective(system, pairs).view(len(grid), len(grid))  # [initial, final]
    best = int(surface.argmin())
    rows = []
    for name, (make, truncation) in METHODS.items():
        for seed in range(1 if name.startswith("TBPTT") else args.seeds):  # TBPTT is deterministic
            theta = torch.nn.Parameter(torch.tensor([-4.0, -4.0], dtype=torch.float64))
            outer = torch.optim.Adam([theta], lr=0.01, betas=(0.99, 0.999))
            estimator, path, curve = make(seed), [theta.tolist()], []
            started = time.perf_counter()
            outer_steps = args.inner_steps // truncation
            for _ in range(0, outer_steps, outer_steps // 50):
                online_meta_train(system, estimator, [theta], outer, outer_steps // 50)
                path.append(theta.tolist())
                curve.append(meta_objective(system, theta.detach().view(1, 2)).item())
            rows.append({"method": name, "seed": seed, "outer_steps": outer_steps, "theta": theta.tolist(),
                         "meta_objective": curve[-1], "curve": curve, "path": path,
                         "seconds": round(time.perf_counter() - started, 2)})  # fmt: skip
            print(f"{name:>16} seed {seed}: theta {rows[-1]['theta']} -> {curve[-1]:.3f}", file=sys.stderr)
    summary = {}
    for name in METHODS:
        values = [r["meta_objective"] for r in rows if r["method"] == name]
        seconds = [r["seconds"] for r in rows if r["method"] == name]
        summary[name] = {"mean": round(statistics.mean(values), 3),
                         "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
                         "seconds_per_run": round(statistics.mean(seconds), 2)}  # fmt: skip
    result = {
        "benchmark": "lr_schedule_2d",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "start": {
            "theta": [-4.0, -4.0],
            "meta_objective": meta_objective(system, torch.tensor([[-4.0, -4.0]], dtype=torch.float64)).item(),
        },  # fmt: skip
        "grid_best": {"theta": pairs[best].tolist(), "meta_objective": surface.min().item()},
        "final_meta_objective": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    image = left.contourf(grid, grid, surface.log().T, levels=40, cmap="viridis")  # x: initial, y: final
    fig.colorbar(image, ax=left, label="log meta-objective")
    colors = dict(zip(METHODS, ["tab:red", "tab:orange", "tab:cyan", "white"]))
    for r in rows:
        xs, ys = zip(*r["path"])
        left.plot(xs, ys, color=colors[r["method"]], lw=1.2, label=r["method"] if r["seed"] == 0 else None)
        right.plot([(i + 1) / len(r["curve"]) * args.inner_steps for i in range(len(r["curve"]))], r["curve"],
                   color="black" if colors[r["method"]] == "white" else colors[r["method"]],
                   label=r["method"] if r["seed"] == 0 else None)  # fmt: skip
    left.plot(*pairs[best].tolist(), "w*", ms=12)
    left.set_xlabel("log initial lr")
    left.set_ylabel("log final lr")
    left.set_title("meta-objective and theta trajectories")
    left.legend(fontsize=8, loc="lower left")
    right.axhline(surface.min().item(), color="gray", ls=":", label="grid optimum")
    right.set_yscale("log")
    right.set_xlabel("inner steps per particle (ES methods run 100 particles)")
    right.set_ylabel("meta-objective (mean loss over T = 100)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()

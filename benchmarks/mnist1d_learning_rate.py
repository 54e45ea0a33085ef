"""Meta-learning the SGD learning rate on MNIST-1D (Greydanus 2020, the paper's learning-rate
notebook): MLP 40-50-10 with tanh, 200 inner SGD steps on consecutive minibatches of 50 of the
training set from one fixed initialisation, meta-loss = the mean training loss along those 200
steps, outer gradient descent (lr 0.3) for 50 steps, from lr 1.5 and from lr 0.15, full unroll.
Published: the learning rate converges to about 0.62 from both. The same problem with other
estimators: truncated backpropagation (last K steps), antithetic ES over whole training runs, and
PES and ES-Single over truncations of 20 steps (phi updated once per training run, after all ten
truncations; the checkpointed estimator equals the full unroll, see its tests), and PES,
ES-Single and TBPTT in the online regime (`*_online`: phi updated after every truncation, ten
times per training run, with the outer lr divided by ten).

    python benchmarks/mnist1d_learning_rate.py                      # all estimators
    python benchmarks/mnist1d_learning_rate.py --estimators full --outer-steps 50

Writes benchmarks/results/mnist1d_learning_rate.{json,png}; the last stdout line is the JSON.
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

from metaloss.engine import meta_step
from metaloss.hypergrad import AntitheticES, EpisodicOnline, Unrolled
from metaloss.losses import accuracy, cross_entropy
from metaloss.meta import FixedInit, HyperparameterOptimizer
from metaloss.models import MLP
from metaloss.problem import BilevelProblem
from tasks.datasets.mnist1d import mnist1d_task

ESTIMATORS = {
    "full": lambda: Unrolled("full"),
    "truncated_20": lambda: Unrolled("truncated", truncation=20),
    "truncated_5": lambda: Unrolled("truncated", truncation=5),
    "es": lambda: AntitheticES(particles=4, sigma=0.05, seed=0),
    "pes_20": lambda: EpisodicOnline("pes", truncation=20, particles=4, sigma=0.05, seed=0),
    "es_single_20": lambda: EpisodicOnline("es_single", truncation=20, particles=4, sigma=0.05, seed=0),
    # the online regime: phi updated after every truncation (ten updates per training run), with the
    # outer lr divided by the ten truncations (--online-lr-scale) so a run moves lr as far as above
    "pes_20_online": lambda: EpisodicOnline("pes", truncation=20, particles=4, sigma=0.05, seed=0, update="truncation"),
    "es_single_20_online": lambda: EpisodicOnline(
        "es_single", truncation=20, particles=4, sigma=0.05, seed=0, update="truncation"
    ),
    "tbptt_20_online": lambda: EpisodicOnline("tbptt", truncation=20, update="truncation"),
}


def run(estimator_name: str, lr0: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    splits = mnist1d_task(steps=args.inner_steps, batch=args.batch, seed=args.seed, shuffle=False)
    model = MLP(40, [50], 10, activation="tanh")
    problem = BilevelProblem(
        model,
        FixedInit(model),
        HyperparameterOptimizer("sgd", lr=lr0, learn=["lr"]),
        cross_entropy,
        cross_entropy,
        args.inner_steps,
        metric=accuracy,
        inner_batch_size=args.batch,
        meta_objective="inner_mean",
    )
    (lr,) = problem.meta_parameters()
    online = estimator_name.endswith("_online")
    outer = torch.optim.SGD([lr], lr=args.outer_lr * (args.online_lr_scale if online else 1.0))
    estimator = ESTIMATORS[estimator_name]()
    trajectory, losses, test_losses = [lr.item()], [], []
    started = time.perf_counter()
    for step in range(args.outer_steps):
        out = meta_step(problem, estimator, outer, [splits.train.episode(step)])
        trajectory.append(lr.item())
        losses.append(out.outer_loss)
        test_losses.append(out.metrics.get("query_loss", float("nan")))
    return {
        "estimator": estimator_name,
        "lr0": lr0,
        "outer_updates_per_run": int(out.metrics.get("outer_updates", 1)),
        "final_lr": trajectory[-1],
        "lr_trajectory": trajectory,
        "mean_train_loss": losses,
        "test_loss": test_losses,
        "seconds": time.perf_counter() - started,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {name: f"C{i}" for i, name in enumerate(ESTIMATORS)}
    for r in rows:
        style = "-" if r["lr0"] > 1 else "--"
        ax.plot(r["lr_trajectory"], style, color=colors[r["estimator"]], label=f"{r['estimator']} from {r['lr0']}")
    ax.axhline(0.62, color="gray", lw=0.8, ls=":", label="published ~0.62")
    ax.set_xlabel("outer step")
    ax.set_ylabel("inner SGD learning rate")
    ax.set_title("MNIST-1D: meta-learned learning rate (200 inner steps)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS), default=list(ESTIMATORS))
    parser.add_argument("--lr0", type=float, nargs="+", default=[1.5, 0.15])
    parser.add_argument("--outer-steps", type=int, default=50)
    parser.add_argument("--outer-lr", type=float, default=0.3)
    parser.add_argument("--online-lr-scale", type=float, default=0.1, help="outer lr factor of the *_online runs")
    parser.add_argument("--inner-steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist1d_learning_rate.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.estimators:
        for lr0 in args.lr0:
            rows.append(run(name, lr0, args))
            row = rows[-1]
            print(f"{name:>13} from {lr0}: lr -> {row['final_lr']:.3f} ({row['seconds']:.0f} s)", file=sys.stderr)
    result = {
        "benchmark": "mnist1d_learning_rate",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": args.threads,
        "published_final_lr": 0.62,
        "final_lr": {f"{r['estimator']}@{r['lr0']}": round(r["final_lr"], 4) for r in rows},
        "seconds": {f"{r['estimator']}@{r['lr0']}": round(r["seconds"], 1) for r in rows},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()

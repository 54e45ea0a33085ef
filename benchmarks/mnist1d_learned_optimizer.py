"""A learned optimizer on MNIST-1D: the per-parameter MLP update rule (`metaloss.meta.MLPUpdateRule`,
learned_optimization's MLP optimizer style) meta-trained with ES-Single over truncations of 20 steps
on MNIST-1D training runs of 200 steps, against SGD and Adam at their best learning rates from a
small grid, at 200 and at 1,000 steps (five times the meta-training horizon), 5 seeds.

Inner problem (as in `mnist1d_learning_rate.py`): MLP 40-50-10 (tanh), minibatches of 50 of the
training set, here shuffled anew per run, from a fresh random initialisation per run
(`RandomInit`). Meta-objective: the mean minibatch training loss along the 200 steps
(`meta_objective="inner_mean"`; the task's query set is the test set, never used for training
or for any choice). Estimator: `EpisodicOnline("es_single", truncation=20, update="truncation")`,
phi updated after every truncation (ten outer Adam updates per training run, one run per
meta-step), particles run as one vmap batch; outer lr cosine-annealed to a tenth over the runs.

Baselines: `HyperparameterOptimizer("sgd" | "adam", lr)`, the engine's own inner optimizers. Each
learning rate of the grid is tuned on 5 meta-training runs (the meta-training shuffling stream and
initialisation seed): the best is the one with the lowest mean full-training-set loss after 200
steps. Evaluation: 5 fresh runs (another task seed, the `test` shuffling stream, another
initialisation seed), the same minibatch stream and initialisation for every method in a run;
full-training-set loss, test loss and test accuracy every 10 steps up to 1,000.

    python benchmarks/mnist1d_learned_optimizer.py
    python benchmarks/mnist1d_learned_optimizer.py --meta-runs 20 --eval-steps 300   # a quick look

Writes benchmarks/results/mnist1d_learned_optimizer.{json,png}; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from metaloss.engine import meta_step
from metaloss.hypergrad import EpisodicOnline
from metaloss.losses import accuracy, cross_entropy
from metaloss.meta import HyperparameterOptimizer, MLPUpdateRule, RandomInit
from metaloss.models import MLP
from metaloss.problem import BilevelProblem
from tasks.datasets.mnist1d import mnist1d_task


def make_problem(model: torch.nn.Module, inner_opt: torch.nn.Module, init_seed: int, steps: int,
                 args: argparse.Namespace) -> BilevelProblem:  # fmt: skip
    return BilevelProblem(
        model,
        RandomInit(model, seed=init_seed),
        inner_opt,
        cross_entropy,
        cross_entropy,
        steps,
        metric=accuracy,
        inner_batch_size=args.batch,
        meta_objective="inner_mean",
    )


def meta_train(model: torch.nn.Module, args: argparse.Namespace) -> tuple[MLPUpdateRule, MLPUpdateRule, dict]:
    """ES-Single meta-training of the rule on runs 0 .. meta_runs-1 of the meta-training stream.
    Returns (the rule before meta-training, the meta-trained rule, the record)."""
    torch.manual_seed(args.seed)  # phi's initialisation
    rule = MLPUpdateRule(hidden=args.hidden, step_mult=args.step_mult, exp_mult=args.exp_mult)
    untrained = copy.deepcopy(rule)
    splits = mnist1d_task(steps=args.inner_steps, batch=args.batch, seed=args.seed)
    problem = make_problem(model, rule, args.seed, args.inner_steps, args)
    outer = torch.optim.Adam(problem.meta_parameters(), lr=args.outer_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(outer, T_max=args.meta_runs, eta_min=args.outer_lr / 10)
    estimator = EpisodicOnline("es_single", truncation=args.truncation, particles=args.particles, sigma=args.sigma,
                               seed=args.seed, update="truncation", batched=True)  # fmt: skip
    losses, started = [], time.perf_counter()
    for run in range(args.meta_runs):
        out = meta_step(problem, estimator, outer, [splits.train.episode(run)])
        schedule.step()
        losses.append(float(out.outer_loss))
        if (run + 1) % max(args.meta_runs // 20, 1) == 0:
            recent = losses[-max(args.meta_runs // 20, 1) :]
            print(f"meta-run {run + 1}/{args.meta_runs}: mean train loss along the run {sum(recent) / len(recent):.4f}"
                  f" ({time.perf_counter() - started:.0f} s)", file=sys.stderr)  # fmt: skip
    record = {"meta_train_loss": losses, "seconds": time.perf_counter() - started}
    return untrained, rule, record


def training_run(model: torch.nn.Module, inner_opt: torch.nn.Module, episode, init_seed: int, steps: int,
                 data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict:  # fmt: skip
    """One training run of `steps` steps; the full-training-set loss and the test loss / accuracy
    every `record_every` steps (and at 0)."""
    x, y, x_test, y_test = data
    problem = make_problem(model, copy.deepcopy(inner_opt).requires_grad_(False), init_seed, steps, args)
    rec: dict[str, list[float]] = {"step": [], "train_loss": [], "test_loss": [], "test_accuracy": []}

    def on_step(t: int, params) -> None:
        if t % args.record_every and t != steps:
            return
        with torch.no_grad():
            rec["step"].append(t)
            rec["train_loss"].append(cross_entropy(problem.predict(params, x), y).item())
            logits = problem.predict(params, x_test)
            rec["test_loss"].append(cross_entropy(logits, y_test).item())
            rec["test_accuracy"].append(accuracy(logits, y_test).item())

    problem.adapt_to(episode, steps=steps, second_order=False, differentiable_steps=0, on_step=on_step)
    return rec


def at(rec: dict, key: str, step: int) -> float:
    return rec[key][rec["step"].index(step)]


def finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std(unbiased=True).item() if len(t) > 1 else float("nan"))


def clean(obj):
    """JSON without NaN / Infinity (strict parsers reject them): non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def plot(methods: dict, meta_losses: list[float], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, m) in enumerate(methods.items()):
        runs = m["runs"]
        steps = runs[0]["step"]
        curve = torch.tensor([r["train_loss"] for r in runs], dtype=torch.float64).mean(0)
        ax.plot(steps, curve.tolist(), color=f"C{i}", ls="--" if name == "learned (before meta-training)" else "-",
                label=m["label"])  # fmt: skip
    ax.axvline(args.inner_steps, color="gray", lw=0.8, ls=":", label=f"meta-training horizon ({args.inner_steps})")
    ax.set_ylim(0.8, 2.5)
    ax.set_xlabel("inner step")
    ax.set_ylabel("training loss (full training set), mean of 5 seeds")
    ax.set_title("MNIST-1D MLP 40-50-10: evaluation runs")
    ax.legend(fontsize=7)
    window = max(len(meta_losses) // 20, 1)
    smooth = [sum(meta_losses[max(0, i - window + 1) : i + 1]) / len(meta_losses[max(0, i - window + 1) : i + 1])
              for i in range(len(meta_losses))]  # fmt: skip
    bx.plot(meta_losses, color="C0", alpha=0.3, lw=0.8)
    bx.plot(smooth, color="C0", label=f"running mean of {window}")
    bx.set_ylim(top=min(max(meta_losses), 4.0))
    bx.set_xlabel("meta-training run (10 ES-Single updates each)")
    bx.set_ylabel(f"mean minibatch training loss along the {args.inner_steps} steps")
    bx.set_title("meta-training objective")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meta-runs", type=int, default=450, help="meta-training runs (one per meta-step)")
    parser.add_argument("--inner-steps", type=int, default=200, help="the meta-training horizon")
    parser.add_argument("--truncation", type=int, default=20)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--outer-lr", type=float, default=5e-3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--step-mult", type=float, default=1e-2)
    parser.add_argument("--exp-mult", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--eval-steps", type=int, default=1000)
    parser.add_argument("--eval-seeds", type=int, default=5)
    parser.add_argument("--record-every", type=int, default=10)
    parser.add_argument("--sgd-lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 0.1])
    parser.add_argument("--seed", type=int, default=0, help="meta-training (and baseline tuning) seed")
    parser.add_argument("--eval-seed", type=int, default=1, help="evaluation task and initialisation seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist1d_learned_optimizer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.inner_steps % args.record_every or args.eval_steps % args.record_every:
        parser.error("--inner-steps and --eval-steps must be multiples of --record-every")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = MLP(40, [50], 10, activation="tanh")

    untrained, rule, meta_record = meta_train(model, args)

    # baseline learning rates: tuned on the first 5 meta-training runs, 200 steps, full-training-set loss
    tune = mnist1d_task(steps=args.inner_steps, batch=args.batch, seed=args.seed)
    data = (tune.train.x, tune.train.y, tune.train.x_test, tune.train.y_test)
    tuning: dict[str, dict[str, float]] = {"sgd": {}, "adam": {}}
    for name, lrs in (("sgd", args.sgd_lrs), ("adam", args.adam_lrs)):
        for lr in lrs:
            finals = [at(training_run(model, HyperparameterOptimizer(name, lr=lr), tune.train.episode(i), args.seed,
                                      args.inner_steps, data, args), "train_loss", args.inner_steps)
                      for i in range(args.eval_seeds)]  # fmt: skip
            tuning[name][str(lr)] = sum(finals) / len(finals)
    best = {name: min(grid, key=lambda lr: finite_or_inf(grid[lr])) for name, grid in tuning.items()}
    print(f"tuning (mean train loss at {args.inner_steps} steps): {tuning}; best {best}", file=sys.stderr)

    # evaluation: fresh runs, every grid value (the selected one is marked)
    evaluation = mnist1d_task(steps=args.eval_steps, batch=args.batch, seed=args.eval_seed)
    episodes = [evaluation.test.episode(i) for i in range(args.eval_seeds)]
    candidates = {
        "learned": ("learned MLP rule (meta-trained)", rule),
        "learned (before meta-training)": ("MLP rule before meta-training", untrained),
    }
    for name, lrs in (("sgd", args.sgd_lrs), ("adam", args.adam_lrs)):
        for lr in lrs:
            candidates[f"{name} lr={lr}"] = (f"{name.upper()} lr {lr}", HyperparameterOptimizer(name, lr=lr))
    evaluated = {}
    for key, (label, opt) in candidates.items():
        runs = [training_run(model, opt, ep, args.eval_seed, args.eval_steps, data, args) for ep in episodes]
        evaluated[key] = {"label": label, "runs": runs}
    selected = {"learned": "learned", f"sgd (best lr {best['sgd']})": f"sgd lr={best['sgd']}",
                f"adam (best lr {best['adam']})": f"adam lr={best['adam']}",
                "learned (before meta-training)": "learned (before meta-training)"}  # fmt: skip

    table = {}
    for key, m in evaluated.items():
        row = {}
        for step in sorted({args.inner_steps, args.eval_steps}):
            for metric in ("train_loss", "test_loss", "test_accuracy"):
                mean, std = mean_std([at(r, metric, step) for r in m["runs"]])
                row[f"{metric}@{step}"] = [round(mean, 4), round(std, 4)]
        table[key] = row
    summary = {name: table[key] for name, key in selected.items()}
    for name, row in summary.items():
        print(f"{name:>32}: " + ", ".join(f"{k} {v[0]:.4f}±{v[1]:.4f}" for k, v in row.items()), file=sys.stderr)

    result = {
        "benchmark": "mnist1d_learned_optimizer",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": args.threads,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "best_lr": best,
        "summary (mean, std over seeds)": summary,
        "meta_train_seconds": round(meta_record["seconds"], 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    full = {**result, "tuning_train_loss": tuning, "table": table, "meta_train_loss": meta_record["meta_train_loss"],
            "evaluation": evaluated, "phi": {k: v.tolist() for k, v in rule.state_dict().items()}}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(clean(full)) + "\n")
    plot({name: evaluated[key] | {"label": name} for name, key in selected.items()}, meta_record["meta_train_loss"],
         args, args.out.with_suffix(".png"))  # fmt: skip
    print(json.dumps(clean(result)))


if __name__ == "__main__":
    main()

"""ML3's shaped-sine experiment (Bechtle et al. 2021, "Meta Learning via Learned Loss"; official code
facebookresearch/LearningToLearn, ml3/ml3_train.py: meta_train_shaped_sine) with this engine.

The model is y = sin(theta x) with one parameter, theta_0 = 0.1 for every task; a task is theta* ~ U[-5, 5]
with 64 inputs x ~ U[-5, 5]. The MSE landscape in theta is full of local minima, and gradient descent
from 0.1 rarely gets far. ML3 meta-learns a loss network on (x, prediction, target) greedily: after
every one of the 10 inner SGD steps (lr 1.0) the meta-objective (theta_{t+1} - theta*)^2 is
backpropagated through that one step and Adam (1e-3) updates the loss network; 4 tasks per outer
iteration, 1,000 iterations. Here that is `scripts/meta_train.py experiment=ml3_shaped_sine`
(TBPTT, truncation 1, an update after every truncation, meta_objective=target_params), run as a
subprocess per seed; the learned loss is then read back from the run directory (`load_loss`) and
evaluated on held-out test tasks (the task family's test stream): the final (theta_10 - theta*)^2
after 10 SGD steps at lr 1.0 with the learned loss, against 10 SGD steps on the MSE at each
learning rate in --mse-lrs, and no adaptation (theta stays 0.1).

    python benchmarks/ml3_shaped_sine.py                        # seed 0, 1,000 meta-steps, 600 test tasks
    python benchmarks/ml3_shaped_sine.py --seeds 0 1 2
    python benchmarks/ml3_shaped_sine.py --meta-steps 20 --test-tasks 50 --out /tmp/ss.json   # a quick look
    python benchmarks/ml3_shaped_sine.py --loss RUN_DIR/inner_loss.safetensors   # evaluate a saved loss only

Writes benchmarks/results/ml3_shaped_sine.{json,png} (runs under benchmarks/runs/, ignored by git); the
last stdout line is the JSON (without the per-step curves).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from metaloss.engine import evaluate, mean_ci95
from metaloss.io import load_loss
from metaloss.losses import mse
from metaloss.meta import FixedInit, HyperparameterOptimizer
from metaloss.models import ShapedSine
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, LossContext
from tasks.synthetic import shaped_sine_task

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTES_REFERENCE = {"learned": (1.05, 0.32), "mse_best": (7.98, 1.05), "no_adaptation": 8.06, "test_tasks": 200}
SOLVED = 0.1  # a task counts as solved when |theta_10 - theta*| < SOLVED


def meta_train(seed: int, args: argparse.Namespace) -> tuple[Path, dict, float]:
    """scripts/meta_train.py experiment=ml3_shaped_sine for one seed: (run directory, its metrics, seconds)."""
    run_dir = args.runs / f"seed{seed}"
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "meta_train.py"), "experiment=ml3_shaped_sine",
        f"seed={seed}", f"train.meta_steps={args.meta_steps}", f"test.num_tasks={args.test_tasks}",
        f"threads={args.threads}", "progress=false", "overwrite=true", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    print("$ " + " ".join(command[1:]), file=sys.stderr)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"meta_train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    return run_dir, metrics, time.perf_counter() - started


def training_curve(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The logged meta-training objective (mean (theta_{t+1} - theta*)^2 over a meta-step's 10
    truncations and 4 tasks) and the periodic meta-validation one (after 10 steps), from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    wanted = {"train": "meta_train/loss", "val": next((t for t in tags if t.startswith("meta_val/loss_step")), None)}
    return {k: [(s.step, s.value) for s in events.Scalars(t)] for k, t in wanted.items() if t in tags}


def shaped_sine_problem(inner_loss, lr: float, steps: int) -> BilevelProblem:
    model = ShapedSine(frequency_init=0.1)
    return BilevelProblem(model, FixedInit(model), HyperparameterOptimizer("sgd", lr=lr), inner_loss, mse, steps,
                          meta_objective="target_params")  # fmt: skip


def final_distances(problem: BilevelProblem, sampler, tasks: int, steps: int) -> torch.Tensor:
    """(theta_t - theta*)^2 for t = 0..steps on test tasks 0..tasks-1: [tasks, steps + 1]."""
    rows = []
    for i in range(tasks):
        episode, row = sampler.episode(i), []

        def on_step(t: int, params: dict, episode: Episode = episode, row: list = row) -> None:
            with torch.no_grad():
                row.append(problem.target_distance(params, episode).item())

        problem.adapt_to(episode, steps=steps, second_order=False, differentiable_steps=0, on_step=on_step)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def summary(distances: torch.Tensor) -> dict:
    final = distances[:, -1]
    mean, ci95 = mean_ci95(final.tolist())
    return {
        "final_mean": round(mean, 4),
        "final_ci95": round(ci95, 4),
        "final_median": round(final.median().item(), 4),
        "solved_fraction": round((final.sqrt() < SOLVED).double().mean().item(), 4),
        "mean_by_step": [round(v, 4) for v in distances.mean(0).tolist()],
    }


@torch.no_grad()
def landscapes(loss, sampler, tasks: int, points: int = 241) -> list[dict]:
    """For test tasks 0..tasks-1: the learned loss and the MSE on the support set as functions of theta."""
    out = []
    thetas = torch.linspace(-6, 6, points)
    for i in range(tasks):
        e = sampler.episode(i)
        learned, squared = [], []
        for theta in thetas:
            prediction = torch.sin(theta * e.support_x)
            context = LossContext(e.support_x, {}, None, e)
            learned.append(loss(prediction, e.support_y, context).item())
            squared.append(mse(prediction, e.support_y).item())
        out.append({"target": e.meta["frequency"], "theta": thetas.tolist(), "learned": learned, "mse": squared})
    return out


def plot(result: dict, curves: dict, scapes: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    ax = axes[0]
    for i, (seed, curve) in enumerate(curves.items()):
        if "train" in curve:
            steps, values = zip(*curve["train"])
            window = 10  # the logged values are single meta-steps of 4 tasks: smooth over 10 logs
            smooth = [sum(values[max(0, j - window + 1): j + 1]) / len(values[max(0, j - window + 1): j + 1])
                      for j in range(len(values))]  # fmt: skip
            ax.plot(steps, values, color=f"C{i}", alpha=0.25, lw=0.8)
            ax.plot(steps, smooth, color=f"C{i}", label=f"seed {seed}: meta-train (mean over the 10 steps)")
        if "val" in curve:
            steps, values = zip(*curve["val"])
            ax.plot(steps, values, "o--", color=f"C{i}", ms=4, label=f"seed {seed}: meta-val, after 10 steps")
    ax.set_xlabel("meta-step (10 Adam updates each)")
    ax.set_ylabel("(theta - theta*)^2")
    ax.set_title("learned loss: meta-training")
    ax.legend(fontsize=7)

    ax = axes[1]
    methods = result["methods"]
    for name, row in methods.items():
        style = "-" if name.startswith("learned") else (":" if name == "no_adaptation" else "--")
        ax.plot(row["mean_by_step"], style, label=f"{name}: {row['final_mean']:.2f} +- {row['final_ci95']:.2f}")
    ax.set_xlabel("inner SGD step")
    ax.set_ylabel(f"mean (theta_t - theta*)^2, {result['test_tasks']} test tasks")
    ax.set_title("adaptation from theta_0 = 0.1")
    ax.legend(fontsize=7)

    ax = axes[2]
    for i, scape in enumerate(scapes):
        learned, squared = torch.tensor(scape["learned"]), torch.tensor(scape["mse"])

        def unit(v: torch.Tensor) -> torch.Tensor:
            return (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)

        ax.plot(scape["theta"], unit(learned), color=f"C{i}", label=f"learned, theta* = {scape['target']:.2f}")
        ax.plot(scape["theta"], unit(squared), "--", color=f"C{i}", alpha=0.6, label="MSE")
        ax.axvline(scape["target"], color=f"C{i}", lw=0.6, ls=":")
    ax.axvline(0.1, color="k", lw=0.6, label="theta_0 = 0.1")
    ax.set_xlabel("theta")
    ax.set_ylabel("loss on the support set (min-max scaled)")
    ax.set_title(f"landscapes (learned loss of seed {result['landscape_seed']})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--meta-steps", type=int, default=1000)
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--inner-lr", type=float, default=1.0, help="the learned loss's inner SGD lr (as trained)")
    parser.add_argument("--mse-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--loss", type=Path, default=None, help="evaluate this saved loss instead of meta-training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "benchmarks" / "runs" / "ml3_shaped_sine")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "ml3_shaped_sine.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    trained: dict[str, dict] = {}
    if args.loss is not None:
        trained["loaded"] = {"loss_path": str(args.loss), "loss": load_loss(args.loss)}
    for seed in [] if args.loss is not None else args.seeds:
        run_dir, metrics, seconds = meta_train(seed, args)
        trained[str(seed)] = {
            "run_dir": str(run_dir),
            "loss": load_loss(run_dir / "inner_loss.safetensors"),
            "meta_train_seconds": round(seconds, 1),
            "outer_updates": metrics["outer_updates"],
            "skipped_updates": metrics["skipped_updates"],
            "script_test_final_mean": metrics.get("meta/loss_step10"),
            "script_test_final_ci95": metrics.get("meta/loss_step10_ci95"),
            "curve": training_curve(run_dir),
        }
        print(f"seed {seed}: meta-trained in {seconds:.0f} s, script's test {metrics.get('meta/loss_step10'):.3f}",
              file=sys.stderr)  # fmt: skip

    # the task family's test stream; its seed does not matter for held-out tasks, but the script's own
    # meta-test uses the stream of its run's seed, so the first seed's is used (a cross-check below)
    test = shaped_sine_task(seed=int(args.seeds[0]) if args.loss is None else 0).test
    methods: dict[str, dict] = {}
    for name, entry in trained.items():
        loss = entry["loss"]
        problem = shaped_sine_problem(loss, args.inner_lr, args.inner_steps)
        methods[f"learned_seed{name}" if name != "loaded" else "learned"] = summary(
            final_distances(problem, test, args.test_tasks, args.inner_steps)
        )
    for lr in args.mse_lrs:
        problem = shaped_sine_problem(mse, lr, args.inner_steps)
        methods[f"mse_lr{lr:g}"] = summary(final_distances(problem, test, args.test_tasks, args.inner_steps))
    methods["no_adaptation"] = summary(final_distances(shaped_sine_problem(mse, 0.01, 1), test, args.test_tasks, 0))
    mse_names = [f"mse_lr{lr:g}" for lr in args.mse_lrs]
    best_mse = min(mse_names, key=lambda n: methods[n]["final_mean"])
    learned_names = [n for n in methods if n.startswith("learned")]

    # cross-check: the engine's own evaluate() on the first learned loss gives the same numbers
    first = next(iter(trained.values()))
    check = evaluate(shaped_sine_problem(first["loss"], args.inner_lr, args.inner_steps), test, args.test_tasks,
                     [args.inner_steps])  # fmt: skip
    landscape_seed = next(iter(trained))
    scapes = landscapes(trained[landscape_seed]["loss"], test, 3)

    result = {
        "benchmark": "ml3_shaped_sine",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": args.threads,
        "meta_steps": None if args.loss is not None else args.meta_steps,
        "seeds": None if args.loss is not None else args.seeds,
        "test_tasks": args.test_tasks,
        "inner_steps": args.inner_steps,
        "metric": f"(theta_{args.inner_steps} - theta*)^2 on held-out test tasks, mean and 95% half-width",
        "solved": f"|theta_{args.inner_steps} - theta*| < {SOLVED}",
        "final": {n: [m["final_mean"], m["final_ci95"]] for n, m in methods.items()},
        "best_mse": best_mse,
        "learned_mean_over_seeds": round(sum(methods[n]["final_mean"] for n in learned_names) / len(learned_names), 4),
        "evaluate_crosscheck": round(check[f"loss_step{args.inner_steps}"], 4),
        "notes_reference": NOTES_REFERENCE,
        "runs": {k: {f: v for f, v in e.items() if f not in ("loss", "curve")} for k, e in trained.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "methods": methods,
        "curves": {k: e.get("curve", {}) for k, e in trained.items()},
        "landscape_seed": landscape_seed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, {k: e["curve"] for k, e in trained.items() if "curve" in e}, scapes, args.out.with_suffix(".png"))
    for name, m in methods.items():
        print(f"{name:>18}: {m['final_mean']:.3f} +- {m['final_ci95']:.3f} (median {m['final_median']:.3f}, "
              f"solved {m['solved_fraction']:.2f})", file=sys.stderr)  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k not in ("methods", "curves")}))


if __name__ == "__main__":
    main()

"""A learned loss (ML3) meta-trained on short MNIST-1D episodes, then plugged into ordinary training
that runs ten times longer, against cross-entropy and Poly-1.

(i) Meta-train ML3 (Bechtle et al. 2021) with `scripts/meta_train.py task=mnist1d algorithm=ml3`:
every episode trains a freshly initialised MLP 40-100-100-10 (ReLU) with the learned loss for T
inner steps of plain SGD on minibatches of a few hundred rows of the MNIST-1D *training* set, and
the loss is meta-learned by the full unrolled hypergradient of the query cross-entropy on held-out
training rows. The MNIST-1D test set never reaches meta-training (`mnist1d_episodes_task`).
(ii) Ordinary training with `scripts/train.py data=mnist1d` of the same MLP from a fresh seeded
initialisation, with the same plain SGD (same lr, momentum 0, same batch size) on the whole
training set, for 10 T steps, with loss=cross_entropy, loss=poly1 and loss=learned (the saved
file), seeds 0..4: test accuracy, mean and std over seeds. Because the learned loss's gradient
is several times cross-entropy's (`gradient_scale_vs_cross_entropy`), cross-entropy is also run
at larger learning rates (--ce-lrs), every one reported: a learned loss that only buys a larger
step would tie with one of them.
(iii) The same runs stopped at T, 2T, 5T, 10T and 30T steps (separate runs; with no schedule each
is a prefix of the longer one), to show a short-horizon effect if there is one: ML3, EvoMAL and
TaylorGLO meta-train short and test long.

    python benchmarks/mnist1d_learned_loss.py
    python benchmarks/mnist1d_learned_loss.py --reuse-meta    # keep a finished meta-training run

Writes benchmarks/results/mnist1d_learned_loss.{json,png} (and the learned loss as
mnist1d_learned_loss.safetensors); run directories under benchmarks/runs/ (git-ignored). The last
stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("cross_entropy", "poly1", "learned")


def call(script: str, overrides: list[str]) -> dict:
    """One script run in a subprocess with one thread; its metrics.json (the last stdout line)."""
    command = [sys.executable, str(ROOT / "scripts" / script), *overrides, "progress=false", "threads=1"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def meta_train(args: argparse.Namespace, run_dir: Path) -> dict:
    if args.reuse_meta and (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    overrides = [
        f"hydra.run.dir={run_dir}", "overwrite=true", "task=mnist1d", "algorithm=ml3", "hypergrad=unrolled",
        "inner_opt=sgd", f"inner_opt.lr={args.lr}", f"problem.inner_steps={args.inner_steps}",
        f"problem.inner_batch_size={args.batch}", f"task.k_train={args.k_train}", f"task.q_query={args.q_query}",
        f"model.hidden=[{','.join(map(str, args.hidden))}]", f"outer_opt.lr={args.outer_lr}",
        f"train.meta_steps={args.meta_steps}", f"train.meta_batch={args.meta_batch}", "train.validate_every=0",
        f"test.num_tasks={args.test_tasks}", f"test.steps=[0,{args.inner_steps},{10 * args.inner_steps}]",
        f"seed={args.meta_seed}", "logger=none",
    ]  # fmt: skip
    return call("meta_train.py", overrides)


def train(args: argparse.Namespace, loss: str, lr: float, seed: int, steps: int, run_dir: Path,
          loss_file: Path) -> dict:  # fmt: skip
    overrides = [
        f"hydra.run.dir={run_dir}", "overwrite=true", "checkpoint=false", "data=mnist1d", f"loss={loss}",
        f"seed={seed}", f"train.steps={steps}", f"train.lr={lr}", "train.momentum=0",
        f"train.batch_size={args.batch}", f"model.hidden=[{','.join(map(str, args.hidden))}]",
        f"train.log_every={max(1, steps // 10)}",
    ]  # fmt: skip
    if loss == "learned":
        overrides.append(f"loss.path={loss_file}")
    return call("train.py", overrides)


def gradient_scale(loss_file: Path, args: argparse.Namespace) -> dict:
    """How hard each loss pushes: the mean norm of its gradient in the logits per sample, on the
    logits of a fresh seeded model for the training rows and on those logits times 5 (a confident
    model), divided by cross-entropy's. A learned loss trained on short runs can buy speed by a
    larger step (the lr is fixed), which is one form the short-horizon bias takes."""
    from metaloss.io import load_loss
    from metaloss.losses import cross_entropy, poly1
    from metaloss.models import MLP
    from tasks.classification import mnist1d_data

    data = mnist1d_data()
    torch.manual_seed(0)
    with torch.no_grad():
        logits = MLP(40, args.hidden, 10)(data.x_train)
    learned = load_loss(str(loss_file))
    out = {}
    for scale in (1.0, 5.0):
        norms = {}
        for name, fn in (("cross_entropy", cross_entropy), ("poly1", poly1), ("learned", learned)):
            z = (logits * scale).clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(fn(z, data.y_train) * len(z), z)  # per-sample gradients
            norms[name] = grad.norm(dim=-1).mean().item()
        out[f"logits_x{scale:g}"] = {k: round(v / norms["cross_entropy"], 4) for k, v in norms.items()}
    return out


def plot(summary: dict, inner_steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for key, ax, title in (("test_accuracy", axes[0], "test accuracy (MNIST-1D test set)"),
                           ("train_accuracy", axes[1], "training accuracy")):  # fmt: skip
        for i, method in enumerate(summary):
            steps = sorted(int(s) for s in summary[method])
            mean = [summary[method][str(s)][key]["mean"] for s in steps]
            std = [summary[method][str(s)][key]["std"] for s in steps]
            style = {"ls": "--", "alpha": 0.7} if method not in LOSSES else {}
            ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, color=f"C{i}", label=method, **style)
        ax.axvline(inner_steps, color="gray", ls=":", lw=1, label=f"meta-training horizon T = {inner_steps}")
        ax.axvline(10 * inner_steps, color="gray", ls="--", lw=1, label="10 T")
        ax.set_xscale("log")
        ax.set_xlabel("SGD steps of ordinary training")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    fig.suptitle("MNIST-1D: ML3 loss meta-trained on T-step episodes, used for longer training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def stats(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "values": [round(v, 4) for v in values]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner-steps", type=int, default=25, help="T: inner SGD steps per meta-training episode")
    parser.add_argument("--batch", type=int, default=50, help="minibatch size, inner loop and ordinary training")
    parser.add_argument("--lr", type=float, default=0.3, help="plain SGD lr, inner loop and ordinary training")
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100])
    parser.add_argument("--k-train", type=int, default=300, help="training rows per episode")
    parser.add_argument("--q-query", type=int, default=300, help="held-out query rows per episode")
    parser.add_argument("--meta-steps", type=int, default=800)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--outer-lr", type=float, default=0.01)
    parser.add_argument("--meta-seed", type=int, default=0)
    parser.add_argument("--test-tasks", type=int, default=100, help="meta-test episodes (held-out training rows)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 5, 10, 30],
                        help="training lengths in units of T (10 is the headline)")  # fmt: skip
    parser.add_argument("--ce-lrs", type=float, nargs="*", default=[0.6, 1.0, 1.5],
                        help="extra cross-entropy runs at these learning rates (the learned loss's larger step)")
    parser.add_argument("--reuse-meta", action="store_true", help="keep a finished meta-training run")
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks/runs/mnist1d_learned_loss")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mnist1d_learned_loss.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    meta_dir = args.runs / "meta_train"
    meta = meta_train(args, meta_dir)
    loss_file = meta_dir / "inner_loss.safetensors"
    meta_seconds = time.perf_counter() - started
    print(f"meta-training: {meta['train_seconds']} s; meta-test accuracy after T steps "
          f"{meta[f'meta/accuracy_step{args.inner_steps}']:.3f}", file=sys.stderr)  # fmt: skip

    lengths = sorted({m * args.inner_steps for m in args.multiples})
    methods = {loss: (loss, args.lr) for loss in LOSSES}  # name -> (loss, lr)
    methods |= {f"cross_entropy_lr{lr:g}": ("cross_entropy", lr) for lr in args.ce_lrs if lr != args.lr}
    runs: dict[str, dict[str, list[dict]]] = {name: {str(s): [] for s in lengths} for name in methods}
    for name, (loss, lr) in methods.items():
        for steps in lengths:
            for seed in args.seeds:
                m = train(args, loss, lr, seed, steps, args.runs / f"{name}_{steps}_seed{seed}", loss_file)
                runs[name][str(steps)].append(m)
            accs = [m["test_accuracy"] for m in runs[name][str(steps)]]
            print(f"{name:>22} {steps:>5} steps: test accuracy {statistics.mean(accs):.3f}", file=sys.stderr)
    keys = ("test_accuracy", "train_accuracy", "test_cross_entropy")
    summary = {loss: {s: {k: stats([m[k] for m in ms]) for k in keys} | {"skipped_updates": sum(m["skipped_updates"]
               for m in ms)} for s, ms in by_len.items()} for loss, by_len in runs.items()}  # fmt: skip
    headline = str(10 * args.inner_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(loss_file, args.out.with_suffix(".safetensors"))
    result = {
        "benchmark": "mnist1d_learned_loss",
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "threads": 1,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "meta_train": {k: v for k, v in meta.items() if k.startswith("meta/") or k in ("meta_steps", "train_seconds",
                       "skipped_updates")},  # fmt: skip
        "gradient_scale_vs_cross_entropy": gradient_scale(loss_file, args),
        "headline_steps": int(headline),
        "headline_test_accuracy": {name: summary[name][headline]["test_accuracy"] for name in methods if
                                   headline in summary[name]},  # fmt: skip
        "summary": summary,
        "meta_seconds": round(meta_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, args.inner_steps, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("summary", "settings")}))


if __name__ == "__main__":
    main()

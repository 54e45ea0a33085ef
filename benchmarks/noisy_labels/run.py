"""Noisy-label benchmark: every method of the noisy-label tasks, on every noise setting, several seeds,
each run a `scripts/meta_train.py task=noisy_<dataset> algorithm=<method>` job (so what is measured is
what a user runs). Results: benchmarks/results/noisy_labels_<dataset>.{json,md,png} (test accuracy mean
and std over seeds per method and noise, time per epoch relative to cross-entropy, accuracy against the
symmetric noise rate) and noisy_labels_<dataset>_weights_<method>.png (the final weights of clean and
of noisy rows of one run, symmetric 60 %, seed 0).

    python benchmarks/noisy_labels/run.py --dataset fashion_mnist --jobs 2
    python benchmarks/noisy_labels/run.py --dataset mnist1d --seeds 0 1 2 --methods cross_entropy mwnet
    python benchmarks/noisy_labels/run.py --name label_correction --methods cross_entropy sce mlc mlc_k3 ...
    python benchmarks/noisy_labels/run.py --name semisup --noises semisup10 --methods clean_only mpl ...
    python benchmarks/noisy_labels/run.py --name averaging --noises sym0 sym60 --methods cross_entropy sce_avg ...

Finished runs (their metrics.json) are reused, so an interrupted benchmark resumes; run directories
are under benchmarks/runs/noisy_labels/ (not committed). Time per epoch is only comparable between
runs that shared the machine alike: --jobs 2 runs two at a time on this 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
NOISES = {"sym0": ("symmetric", 0.0), "sym20": ("symmetric", 0.2), "sym40": ("symmetric", 0.4),
          "sym60": ("symmetric", 0.6), "sym80": ("symmetric", 0.8), "pair40": ("pair", 0.4),
          "inst40": ("instance", 0.4), "semisup10": ("semisup", 10)}  # fmt: skip
METHODS = {
    "cross_entropy": ["algorithm=cross_entropy"],
    "clean_only": ["algorithm=clean_only"],
    "gce": ["algorithm=gce"],
    "sce": ["algorithm=sce"],
    "nce_rce": ["algorithm=nce_rce"],
    "poly1": ["algorithm=poly1"],
    "mwnet": ["algorithm=mwnet"],
    "mwnet_normalized": ["algorithm=mwnet", "inner_loss.normalize=true"],
    "l2rw": ["algorithm=l2rw"],
    "ml3_online": ["algorithm=ml3_online"],
    "storm": ["algorithm=storm"],
    "transition": ["algorithm=transition"],
    # the trained model as the moving average of the iterates (decay 0.999), the last iterate beside it
    "cross_entropy_avg": ["algorithm=cross_entropy", "task.average=0.999"],
    "sce_avg": ["algorithm=sce", "task.average=0.999"],
    "gce_avg": ["algorithm=gce", "task.average=0.999"],
    "transition_avg": ["algorithm=transition", "task.average=0.999"],
    "mwnet_avg": ["algorithm=mwnet", "task.average=0.999"],
    # label correction: at K = 1 the papers' identity-Hessian meta-gradient is the exact one (mlc, emlc);
    # at K = 3 the approximation and the exact K-step meta-gradient differ
    "mlc": ["algorithm=mlc"],
    "mlc_k3": ["algorithm=mlc", "hypergrad.truncation=3"],
    "mlc_k3_exact": ["algorithm=mlc", "hypergrad.truncation=3", "hypergrad.kind=tbptt"],
    "emlc": ["algorithm=emlc"],
    "emlc_k3": ["algorithm=emlc", "hypergrad.truncation=3"],
    "emlc_k3_exact": ["algorithm=emlc", "hypergrad.truncation=3", "hypergrad.kind=tbptt"],
    # semi-supervised (noise "semisup10": task=semisup_<dataset>, 10 labels per class)
    "pseudo_label": ["algorithm=pseudo_label"],
    "mpl": ["algorithm=mpl"],
    "mpl_exact": ["algorithm=mpl_exact"],
}
WEIGHTED = ("mwnet", "mwnet_normalized", "storm")


def run_dir(dataset: str, noise: str, method: str, seed: int) -> Path:
    return ROOT / "benchmarks" / "runs" / "noisy_labels" / dataset / f"{noise}_{method}_seed{seed}"


def run_one(dataset: str, noise: str, method: str, seed: int) -> dict:
    out = run_dir(dataset, noise, method, seed)
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    kind, rate = NOISES[noise]
    setting = ([f"task=semisup_{dataset}", f"task.labels_per_class={rate}"] if kind == "semisup" else
               [f"task=noisy_{dataset}", f"task.noise.type={kind}", f"task.noise.rate={rate}"])  # fmt: skip
    cmd = [sys.executable, "scripts/meta_train.py", *setting, *METHODS[method], f"seed={seed}", "threads=1",
           "progress=false", "logger=none", "overwrite=true", f"hydra.run.dir={out}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAILED {dataset} {noise} {method} {seed}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {"failed": done.stderr.strip().splitlines()[-1:]}
    accuracy = json.loads(done.stdout.strip().splitlines()[-1])["test_accuracy"]
    print(f"{dataset} {noise} {method} seed {seed}: {accuracy:.4f}", flush=True)
    return json.loads((out / "metrics.json").read_text())


def summarise(dataset: str, results: dict, methods: list[str], noises: list[str], seeds: list[int]) -> dict:
    table: dict = {}
    for method in methods:
        for noise in noises:
            runs = [results[(noise, method, s)] for s in seeds if "test_accuracy" in results[(noise, method, s)]]
            if not runs:
                continue
            acc = np.array([r["test_accuracy"] for r in runs]) * 100
            table.setdefault(method, {})[noise] = {
                "test_accuracy_mean": round(float(acc.mean()), 2), "test_accuracy_std": round(float(acc.std()), 2),
                "values": [round(float(a), 2) for a in acc], "seconds_per_epoch": float(np.mean(
                    [r["seconds_per_epoch"] for r in runs])),
                **({"weight_auc": round(float(np.mean([r["weight_auc"] for r in runs])), 3)} if "weight_auc" in runs[0]
                   else {}),
                **({"last_iterate_accuracy_mean": round(float(np.mean([r["last_iterate_test_accuracy"] for r in runs]))
                                                        * 100, 2)} if "last_iterate_test_accuracy" in runs[0] else {}),
            }  # fmt: skip
    reference = "cross_entropy" if "cross_entropy" in table else next(iter(table), None)  # semisup: the first
    base = np.mean([v["seconds_per_epoch"] for v in table.get(reference, {}).values()] or [np.nan])
    for rows in table.values():
        rows["time_vs_cross_entropy"] = round(float(np.mean([v["seconds_per_epoch"] for v in rows.values()]) / base), 2)
    return table


def markdown(table: dict, noises: list[str]) -> str:
    head = "| method | " + " | ".join(noises) + " | time / epoch vs CE |"
    lines = [head, "|" + "---|" * (len(noises) + 2)]
    best = {n: max((rows[n]["test_accuracy_mean"] for rows in table.values() if n in rows), default=None)
            for n in noises}  # fmt: skip
    for method, rows in table.items():
        cells = []
        for n in noises:
            if n not in rows:
                cells.append("")
                continue
            cell = f"{rows[n]['test_accuracy_mean']:.1f} ± {rows[n]['test_accuracy_std']:.1f}"
            cells.append(f"**{cell}**" if rows[n]["test_accuracy_mean"] == best[n] else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {rows['time_vs_cross_entropy']:.2f}x |")
    return "\n".join(lines)


def plot(table: dict, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sym = [n for n in NOISES if n.startswith("sym")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rows in table.items():
        xs = [NOISES[n][1] * 100 for n in sym if n in rows]
        ys = [rows[n]["test_accuracy_mean"] for n in sym if n in rows]
        es = [rows[n]["test_accuracy_std"] for n in sym if n in rows]
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method,
                        linestyle="--" if method in ("cross_entropy", "clean_only") else "-")  # fmt: skip
    ax.set_xlabel("symmetric noise rate (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"noisy {dataset}: test accuracy after training (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist1d", "digits"])
    parser.add_argument("--noises", nargs="+", default=[n for n in NOISES if n not in ("sym0", "semisup10")],
                        choices=list(NOISES))  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--name", default="", help="suffix of the results files (a table of its own)")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    keys = [(n, m, s) for s in args.seeds for n in args.noises for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        outs = list(pool.map(lambda k: run_one(args.dataset, *k), keys))
    results = dict(zip(keys, outs))
    table = summarise(args.dataset, results, args.methods, args.noises, args.seeds)
    out = ROOT / "benchmarks" / "results" / f"noisy_labels_{args.dataset}{'_' + args.name if args.name else ''}"
    command = "python benchmarks/noisy_labels/run.py " + " ".join(sys.argv[1:])
    record = {"benchmark": out.name, "command": command.strip(),
              "date": started.isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, "
                         f"torch {__import__('torch').__version__}, {args.jobs} runs at a time, one thread each",
              "seeds": args.seeds, "noises": {n: NOISES[n] for n in args.noises},
              "methods": {m: METHODS[m] for m in args.methods}, "table": table,
              "failed": [list(k) for k, v in results.items() if "failed" in v],
              "runs": {"/".join(map(str, k)): v for k, v in results.items()}}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    md = markdown(table, args.noises)
    out.with_suffix(".md").write_text(f"{command.strip()} ({record['date']}, {record['machine']}); test accuracy "
                                      f"in %, mean ± std over seeds {args.seeds}\n\n{md}\n")  # fmt: skip
    if any(n.startswith("sym") for n in args.noises):  # accuracy against the symmetric noise rate
        plot(table, out.with_suffix(".png"), args.dataset)
    for method in WEIGHTED:
        source = run_dir(args.dataset, "sym60", method, args.seeds[0]) / "weights.png"
        if method in args.methods and source.is_file() and not args.name:
            shutil.copy(source, out.parent / f"noisy_labels_{args.dataset}_weights_{method}.png")
    print(md)
    print(json.dumps({"benchmark": record["benchmark"], "runs": len(keys), "failed": len(record["failed"])}))


if __name__ == "__main__":
    main()

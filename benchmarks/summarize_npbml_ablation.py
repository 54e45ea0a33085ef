"""Collect the runs of benchmarks/npbml_ablation.sh with N meta-steps into
benchmarks/results/npbml_ablation_<N>.{json,md,png}:
test accuracy (mean and 95% CI half-width over the test episodes) of MAML and NPBML's components
after each evaluated number of inner steps, beside the paper's mini-ImageNet 5-way 5-shot figures.

    python benchmarks/summarize_npbml_ablation.py --meta-steps 400
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RUNS, RESULTS = ROOT / "runs", ROOT / "results"
# run name -> (row label, the paper's mini-ImageNet 5-way 5-shot accuracy in %, Raymond et al. 2024)
ROWS = {
    "maml": ("MAML", 65.38),
    "npbml_optimizer": ("+ optimizer (warp preconditioner)", 67.47),
    "npbml_loss": ("+ loss (task-adaptive, no FiLM)", 71.75),
    "npbml_nofilm": ("+ optimizer + loss", 72.79),
    "npbml": ("+ optimizer + loss + FiLM (NPBML)", 75.01),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meta-steps", type=int, default=400, help="the META_STEPS of the runs to collect")
    parser.add_argument("--parallel", type=int, default=2, help="the PARALLEL the runs had (recorded only)")
    args = parser.parse_args()
    budget = args.meta_steps
    rows = []
    for name, (label, published) in ROWS.items():
        metrics_file = RUNS / f"npbml_ablation_{budget}_{name}" / "metrics.json"
        if not metrics_file.is_file():
            print(f"missing: {metrics_file.parent.name}")
            continue
        m = json.loads(metrics_file.read_text())
        steps = sorted(int(k.split("step")[1]) for k in m if k.startswith("meta/accuracy_step") and "ci95" not in k)
        rows.append({
            "run": name, "label": label, "published_miniimagenet_5w5s": published,
            "meta_steps": m["meta_steps"], "skipped_updates": m["skipped_updates"],
            "train_minutes": round(m["train_seconds"] / 60, 1), "test_tasks": m["test_tasks"],
            "accuracy": {t: (m[f"meta/accuracy_step{t}"], m[f"meta/accuracy_step{t}_ci95"]) for t in steps},
        })  # fmt: skip
    if not rows:
        raise SystemExit(f"no finished runs under benchmarks/runs/npbml_ablation_{budget}_*")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    record = {
        "date": datetime.date.today().isoformat(), "machine": machine,
        "command": f"META_STEPS={budget} bash benchmarks/npbml_ablation.sh && "
                   f"python benchmarks/summarize_npbml_ablation.py --meta-steps {budget}",
        "setting": "experiment=omniglot_minimal_5way (Omniglot minimal sets, 5-way 1-shot, 1 inner step), "
                   f"{rows[0]['meta_steps']} meta-steps each, threads=1, {args.parallel} run(s) at a time",
        "runs": rows,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    stem = f"npbml_ablation_{budget}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")

    steps = sorted({t for r in rows for t in r["accuracy"]})
    lines = ["| components | meta-steps | train min | " + " | ".join(f"acc. after {t} steps" for t in steps)
             + " | paper, mini-ImageNet 5w5s |", "|" + "---|" * (4 + len(steps))]  # fmt: skip
    for r in rows:
        accs = [f"{100 * r['accuracy'][t][0]:.1f} ± {100 * r['accuracy'][t][1]:.1f}" for t in steps]
        lines.append(f"| {r['label']} | {r['meta_steps']} | {r['train_minutes']} | " + " | ".join(accs)
                     + f" | {r['published_miniimagenet_5w5s']:.2f} |")  # fmt: skip
    (RESULTS / f"{stem}.md").write_text(
        f"Recorded {record['date']} on {machine}; {record['setting']}; {rows[0]['test_tasks']} test episodes "
        "per run, mean ± 95% CI half-width, in %.\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    plot(rows, steps, RESULTS / f"{stem}.png")
    print(json.dumps({r["run"]: r["accuracy"][steps[1] if len(steps) > 1 else steps[0]][0] for r in rows}))


def plot(rows: list[dict], steps: list[int], path: Path) -> None:
    """Accuracy against the number of inner test steps, one line per component set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        means = [100 * r["accuracy"][t][0] for t in steps]
        errors = [100 * r["accuracy"][t][1] for t in steps]
        ax.errorbar(steps, means, yerr=errors, marker="o", capsize=3, label=r["label"])
    ax.axvline(1, color="grey", linestyle=":", label="meta-training horizon (1 step)")
    ax.set_xlabel("inner steps at test")
    ax.set_ylabel("test accuracy (%), 95% CI")
    ax.set_title(f"NPBML ablation, Omniglot minimal 5-way 1-shot ({rows[0]['meta_steps']} meta-steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Collect the Omniglot minimal-set runs of benchmarks/omniglot_minimal.sh into
benchmarks/results/omniglot_minimal.{json,md}, and keep the best 20-way checkpoint (phi and the
config only, no outer-optimizer state) under benchmarks/checkpoints/.

    python benchmarks/summarize_omniglot_minimal.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent
RUNS, RESULTS, CHECKPOINTS = ROOT / "runs", ROOT / "results", ROOT / "checkpoints"


def main() -> None:
    rows = []
    for metrics_file in sorted(RUNS.glob("omniglot_minimal_*/metrics.json")):
        m = json.loads(metrics_file.read_text())
        setting = metrics_file.parent.name.split("_")[2]  # 5way / 20way
        steps = sorted(int(k.split("step")[1]) for k in m if k.startswith("meta/accuracy_step") and "ci95" not in k)
        overrides = [o for o in yaml.safe_load((metrics_file.parent / ".hydra" / "overrides.yaml").read_text())
                     if not o.startswith("hydra.")]  # fmt: skip
        variant = [o for o in overrides if o.split("=")[0] not in ("experiment", "algorithm", "threads", "progress")]
        rows.append(
            {
                "setting": setting,
                "algorithm": m["algorithm"] + (f" ({', '.join(variant)})" if variant else ""),
                "run_dir": str(metrics_file.parent.relative_to(ROOT.parent)),
                "command": "python scripts/meta_train.py " + " ".join(overrides),
                "meta_steps": m["meta_steps"],
                "train_minutes": round(m["train_seconds"] / 60, 1),
                "sampling_share": round(m["sample_seconds"] / max(m["step_seconds"] + m["sample_seconds"], 1e-9), 4),
                "test_tasks": m["test_tasks"],
                "accuracy": {t: (m[f"meta/accuracy_step{t}"], m[f"meta/accuracy_step{t}_ci95"]) for t in steps},
            }
        )
    if not rows:
        raise SystemExit("no finished runs under benchmarks/runs/")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    record = {"date": datetime.date.today().isoformat(), "machine": machine, "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "omniglot_minimal.json").write_text(json.dumps(record, indent=2) + "\n")

    steps = sorted({t for r in rows for t in r["accuracy"]})
    head = "| setting | algorithm | meta-steps | train min | sampling share | " + " | ".join(
        f"acc. after {t} steps" for t in steps
    )
    lines = [head + " |", "|" + "---|" * (5 + len(steps))]
    for r in sorted(rows, key=lambda r: (r["setting"], r["algorithm"])):
        accs = [f"{100 * r['accuracy'][t][0]:.1f} ± {100 * r['accuracy'][t][1]:.1f}" for t in steps]
        lines.append(
            f"| {r['setting']} | {r['algorithm']} | {r['meta_steps']} | {r['train_minutes']} | "
            f"{100 * r['sampling_share']:.2f}% | " + " | ".join(accs) + " |"
        )
    (RESULTS / "omniglot_minimal.md").write_text(
        f"Recorded {record['date']} on {machine}; {rows[0]['test_tasks']} test episodes per run, "
        "mean ± 95% CI half-width, in %.\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    plot(rows, max(steps), RESULTS / "omniglot_minimal.png")

    twenty = [r for r in rows if r["setting"] == "20way"]
    if twenty:
        best = max(twenty, key=lambda r: max(a for a, _ in r["accuracy"].values()))
        state = torch.load(ROOT.parent / best["run_dir"] / "checkpoint.pt", map_location="cpu", weights_only=True)
        state.pop("outer_opt", None)
        CHECKPOINTS.mkdir(exist_ok=True)
        path = CHECKPOINTS / f"{Path(best['run_dir']).name}.pt"
        torch.save(state, path)
        print(f"kept {path} ({path.stat().st_size / 1e6:.2f} MB): {best['command']}")


def plot(rows: list[dict], step: int, path: Path) -> None:
    """Accuracy after `step` inner steps with its 95% interval, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (r["setting"], r["algorithm"]))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    labels = [f"{r['setting']} {r['algorithm']} ({r['meta_steps']} steps)" for r in rows]
    means = [100 * r["accuracy"][step][0] for r in rows]
    errors = [100 * r["accuracy"][step][1] for r in rows]
    colors = ["tab:blue" if r["setting"] == "5way" else "tab:orange" for r in rows]
    ax.barh(labels, means, xerr=errors, color=colors, capsize=3)
    for y, (m, e) in enumerate(zip(means, errors)):
        ax.text(m + e + 1, y, f"{m:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel(f"test accuracy after {step} inner steps (%), 95% CI")
    ax.set_title("Omniglot minimal sets, held-out alphabets (1-shot)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

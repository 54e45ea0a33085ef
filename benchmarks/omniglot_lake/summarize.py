"""Collect the runs of benchmarks/omniglot_lake/variants.sh into
benchmarks/results/omniglot_lake_variants.{json,md,png} (variants recorded there before whose run
directories are absent, e.g. made on another machine, are kept with their date): per variant, the within-alphabet 20-way
validation error on Balinese (after the training inner steps, every 250 meta-steps, from TensorBoard)
and the within-alphabet test error on Early_Aramaic after 1 and 10 inner steps (metrics.json). The
final runs on every alphabet (final.sh: final_all, and final_all_<suffix> made with NAME) are recorded
beside them and their checkpoints kept, stripped of the outer optimizer's state, in benchmarks/checkpoints/.

    python benchmarks/omniglot_lake/summarize.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS, RESULTS, CHECKPOINTS = ROOT / "runs" / "omniglot_lake", ROOT / "results", ROOT / "checkpoints"
FINAL, KEPT = "final_all", "omniglot_minimal_all_20way_maml_maxpool.pt"  # final.sh's run, its kept checkpoint
SHARED = {"experiment", "task.train_alphabets", "task.val_alphabets", "task.test_alphabets", "task.within_alphabet",
          "train.validate_every", "train.val_tasks", "test.num_tasks", "test.steps", "threads", "progress",
          "train.meta_steps"}  # fmt: skip


def validation_curve(run: Path) -> list[tuple[int, float]]:
    """(meta-step, validation accuracy) from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("meta_val/accuracy") and "ci95" not in t]
    return [(e.step, e.value) for e in events.Scalars(tags[0])] if tags else []


def main() -> None:
    rows = []
    for metrics_file in sorted(RUNS.glob("*/metrics.json")):
        run, m = metrics_file.parent, json.loads(metrics_file.read_text())
        if run.name.startswith(FINAL):
            continue
        overrides = run_overrides(run)
        curve = validation_curve(run)
        test = {t: (m[f"meta/accuracy_step{t}"], m[f"meta/accuracy_step{t}_ci95"]) for t in (1, 10)
                if f"meta/accuracy_step{t}" in m}  # fmt: skip
        rows.append({
            "variant": run.name,
            "changes": changes(overrides),
            "command": "python scripts/meta_train.py " + " ".join(overrides),
            "meta_steps": m["meta_steps"],
            "train_minutes": round(m["train_seconds"] / 60, 1),
            "validation_error_curve": [(s, round(100 * (1 - a), 2)) for s, a in curve],
            "final_validation_error": round(100 * (1 - curve[-1][1]), 2) if curve else None,
            "test_error": {t: (round(100 * (1 - a), 2), round(100 * c, 2)) for t, (a, c) in test.items()},
            "test_tasks": m["test_tasks"],
        })  # fmt: skip
    today = datetime.date.today().isoformat()
    previous_file = RESULTS / "omniglot_lake_variants.json"
    previous = json.loads(previous_file.read_text()) if previous_file.exists() else {}
    before = {r["variant"]: r for r in previous.get("runs", [])}
    for r in rows:  # a run summarised before with the same results keeps the date it was recorded
        old = json.loads(json.dumps(before.get(r["variant"], {})))  # (tuples compared as JSON lists)
        same = old and all(old.get(k) == json.loads(json.dumps(r[k])) for k in ("validation_error_curve", "test_error"))
        r["recorded"] = old.get("recorded", previous.get("date")) if same else today
    # variants summarised before whose run directories are gone (another machine) are kept as recorded
    present = {r["variant"] for r in rows}
    for r in previous.get("runs", []):
        if r["variant"] not in present:
            r.setdefault("recorded", previous.get("date"))
            rows.append(r)
    if not rows:
        raise SystemExit(f"no finished runs under {RUNS}")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, one thread per run"
    record = {"date": today, "machine": machine,
              "protocol": "20-way 1-shot MAML, train Greek, Japanese_(katakana), Korean, Latin, Sanskrit, Tagalog "
                          "(rotations as new classes); validation: 100 within-alphabet episodes of Balinese after the "
                          "training inner steps; test: within-alphabet episodes of Early_Aramaic",
              "runs": rows, "final": keep_final(FINAL) or previous.get("final"),
              "other_finals": {**previous.get("other_finals", {}), **other_finals()}}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "omniglot_lake_variants.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["| variant | changes | meta-steps | train min | val. error (Balinese) | test error, 1 step | "
             "test error, 10 steps |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["final_validation_error"] is None, r["final_validation_error"])):
        errors = {int(t): e for t, e in r["test_error"].items()}  # JSON turned the step keys into strings
        tests = [f"{errors[t][0]:.1f} ± {errors[t][1]:.1f}" if t in errors else "-" for t in (1, 10)]
        lines.append(f"| {r['variant']} | {' '.join(r['changes']) or '-'} | {r['meta_steps']} | {r['train_minutes']} | "
                     f"{r['final_validation_error']} | {tests[0]} | {tests[1]} |")  # fmt: skip
    (RESULTS / "omniglot_lake_variants.md").write_text(
        f"Recorded {record['date']} on {machine}. {record['protocol']}; error in %, test ± 95% CI half-width "
        f"over {rows[0]['test_tasks']} episodes.\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    plot(rows, RESULTS / "omniglot_lake_variants.png")


def run_overrides(run: Path) -> list[str]:
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return [o for o in overrides if not o.startswith("hydra.")]


def changes(overrides: list[str]) -> list[str]:
    """A variant's own overrides: those of variants.sh's shared settings dropped, unless the variant
    sets the key again (e.g. fewer training alphabets; the last value is the one Hydra applies)."""
    keys = [o.split("=")[0] for o in overrides]
    return [o for i, (o, k) in enumerate(zip(overrides, keys)) if k not in SHARED or (keys.count(k) > 1 and
                                                                                   k not in keys[i + 1:])]  # fmt: skip


def checkpoint_name(run_name: str) -> str:
    """final_all -> KEPT; final_all_<suffix> (final.sh with NAME and further overrides) -> KEPT with _<suffix>."""
    suffix = run_name[len(FINAL):]
    return KEPT if not suffix else KEPT.replace(".pt", f"{suffix}.pt")


def other_finals() -> dict[str, dict]:
    """final.sh's runs other than final_all (NAME=final_all_<suffix>), each kept as checkpoint_name."""
    found = {run.name: keep_final(run.name) for run in sorted(RUNS.glob(f"{FINAL}_*")) if run.is_dir()}
    return {name: record for name, record in found.items() if record is not None}


def keep_final(run_name: str) -> dict | None:
    """final.sh's run on every alphabet: its checkpoint (phi and config) kept under checkpoints/. A run
    stopped before its last meta-step (e.g. at the end of a session) is kept at its last checkpoint,
    recorded with the meta-steps it reached."""
    run = RUNS / run_name
    if not (run / "checkpoint.pt").exists():
        return None
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    finished = (run / "metrics.json").exists()
    progress = state["run"]
    m = json.loads((run / "metrics.json").read_text()) if finished else {
        "meta_steps": progress["step"], "train_seconds": progress["sample_seconds"] + progress["step_seconds"]}
    state.pop("outer_opt", None)
    CHECKPOINTS.mkdir(exist_ok=True)
    path = CHECKPOINTS / checkpoint_name(run_name)
    torch.save(state, path)
    print(f"kept {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return {"command": "python scripts/meta_train.py " + " ".join(run_overrides(run)), "meta_steps": m["meta_steps"],
            "train_minutes": round(m["train_seconds"] / 60, 1), "finished": finished,
            "checkpoint": f"benchmarks/checkpoints/{path.name}",
            "checkpoint_mb": round(path.stat().st_size / 1e6, 2)}  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    """One row per variant, sorted by its test error: the Early_Aramaic error after 10 steps with its
    95 % interval (left) and the final Balinese validation error (right), so that the two held-out
    alphabets can be read side by side (a legend of one line per variant did not fit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def after_10_steps(r: dict) -> tuple[float, float] | None:  # (error, CI); step keys are str in JSON
        return {str(t): e for t, e in r["test_error"].items()}.get("10")

    scored = sorted((r for r in rows if after_10_steps(r)), key=lambda r: -after_10_steps(r)[0])
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(10, 0.22 * len(scored) + 1.2))
    ys = range(len(scored))
    tests = [after_10_steps(r) for r in scored]
    left.errorbar([e for e, _ in tests], ys, xerr=[c for _, c in tests], fmt="o", ms=3, capsize=2)
    right.plot([r["final_validation_error"] for r in scored], ys, "s", ms=3, color="tab:red")
    left.set_yticks(list(ys), [r["variant"] for r in scored], fontsize=6)
    left.set_xlabel("Early_Aramaic error after 10 steps (%), ± 95 % CI")
    right.set_xlabel("Balinese validation error (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("Omniglot 20-way 1-shot within-alphabet episodes, variants of benchmarks/omniglot_lake", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Domain-generalisation benchmark: every method on every leave-one-domain-out split, several seeds, each
run a `scripts/meta_train.py task=<task> algorithm=<method> task.test_domain=<domain>` job (what a user
runs). Reported per held-out domain: the test accuracy selected by training-domain validation (mean and
standard error over seeds), their average over domains, the test-domain oracle's average apart, and the
wall time per run. Results: benchmarks/results/domain_shift_<task>[_cnn].{json,md}.

    python benchmarks/domain_shift/run.py --task rotated_fashion_mnist --jobs 2
    python benchmarks/domain_shift/run.py --task mnist1d_domains --methods erm mldg fish --seeds 0 1 2
    python benchmarks/domain_shift/run.py --task rotated_fashion_mnist --model cnn --methods erm mldg --seeds 0

Finished runs (their metrics.json) are reused; run directories are under benchmarks/runs/domain_shift/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = {"rotated_fashion_mnist": ["0", "15", "30", "45", "60", "75"], "rotated_digits": ["0", "15", "30", "45",
           "60", "75"], "mnist1d_domains": ["base", "scaled", "sheared", "shifted", "noisy"]}  # fmt: skip
STEPS = {"rotated_fashion_mnist": 2000, "rotated_digits": 600, "mnist1d_domains": 2000}  # the tasks' meta_steps
METHODS = {
    "erm": ["algorithm=erm"],
    "mldg": ["algorithm=mldg"],
    "mldg_first_order": ["algorithm=mldg", "hypergrad=first_order"],
    "maml_domains": ["algorithm=maml_domains"],
    "fish": ["algorithm=fish"],
    # the learned loss is scored by training a model with it for as many steps as ERM's (each validation
    # a full training run, so validated every 500 steps); cross_entropy_sgd: the same evaluation with the
    # loss left at its start, cross-entropy (outer lr 0, one meta-step), the baseline it must beat
    "learned_loss": ["algorithm=learned_loss_domains", "train.validate_every=500"],
    "cross_entropy_sgd": ["algorithm=learned_loss_domains", "outer_opt.lr=0", "train.meta_steps=1",
                          "train.validate_every=1", "task.eval_steps={steps}"],  # fmt: skip
}
MODELS = {"mlp": [], "cnn": ["model=cnn_28x28", "task.flatten=false"]}  # cnn: the image tasks only


def run_one(task: str, model: str, domain: str, method: str, seed: int, extra: list[str]) -> dict:
    name = task if model == "mlp" else f"{task}_{model}"
    out = ROOT / "benchmarks" / "runs" / "domain_shift" / name / f"{domain}_{method}_seed{seed}"
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    overrides = [o.format(steps=STEPS[task]) for o in METHODS[method]] + MODELS[model]
    cmd = [sys.executable, "scripts/meta_train.py", f"task={task}", *overrides, f"task.test_domain={domain}",
           f"seed={seed}", "threads=1", "progress=false", "logger=none", "overwrite=true", f"hydra.run.dir={out}",
           *extra]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAILED {task} {domain} {method} {seed}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {"failed": done.stderr.strip().splitlines()[-1:]}
    accuracy = json.loads(done.stdout.strip().splitlines()[-1])["test_accuracy"]
    print(f"{task} {domain} {method} seed {seed}: {accuracy:.4f}", flush=True)
    return json.loads((out / "metrics.json").read_text())


def table(results: dict, domains: list[str], methods: list[str], seeds: list[int]) -> tuple[dict, str]:
    rows, lines = {}, ["| method | " + " | ".join(domains) + " | average | oracle average | s / run |",
                       "|" + "---|" * (len(domains) + 4)]  # fmt: skip
    for method in methods:
        cells, means, oracles, seconds = [], [], [], []
        for domain in domains:
            runs = [results[(domain, method, s)] for s in seeds if "test_accuracy" in results[(domain, method, s)]]
            acc = np.array([r["test_accuracy"] for r in runs]) * 100
            if not len(acc):
                cells.append("")
                continue
            err = acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else float("nan")
            rows.setdefault(method, {})[domain] = {"mean": round(float(acc.mean()), 2), "stderr": round(float(err), 2),
                                                   "values": [round(float(a), 2) for a in acc]}  # fmt: skip
            cells.append(f"{acc.mean():.1f} ± {err:.1f}")
            means.append(acc.mean())
            oracles += [r["oracle_test_accuracy"] * 100 for r in runs]
            seconds += [r["total_seconds"] for r in runs]
        if means:
            rows[method]["average"] = round(float(np.mean(means)), 2)
            rows[method]["oracle_average"] = round(float(np.mean(oracles)), 2)
            rows[method]["seconds_per_run"] = round(float(np.mean(seconds)), 1)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {np.mean(means):.1f} | {np.mean(oracles):.1f} | "
                         f"{np.mean(seconds):.0f} |")  # fmt: skip
    return rows, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="rotated_fashion_mnist", choices=list(DOMAINS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--model", default="mlp", choices=list(MODELS), help="cnn: model=cnn_28x28 (image tasks)")
    parser.add_argument("--domains", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. train.meta_steps=1000")
    args = parser.parse_args()
    domains = args.domains or DOMAINS[args.task]
    started = datetime.datetime.now(datetime.timezone.utc)
    keys = [(d, m, s) for s in args.seeds for d in domains for m in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(keys, pool.map(lambda k: run_one(args.task, args.model, *k, args.extra), keys)))
    rows, md = table(results, domains, args.methods, args.seeds)
    command = "python benchmarks/domain_shift/run.py " + " ".join(sys.argv[1:])
    name = f"domain_shift_{args.task}" + ("" if args.model == "mlp" else f"_{args.model}")
    record = {"benchmark": name, "model": args.model, "command": command.strip(),
              "date": started.isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, torch "
                         f"{__import__('torch').__version__}, {args.jobs} runs at a time, one thread each",
              "seeds": args.seeds, "table": rows, "failed": [list(k) for k, v in results.items() if "failed" in v],
              "runs": {"/".join(map(str, k)): v for k, v in results.items()}}  # fmt: skip
    out = ROOT / "benchmarks" / "results" / name
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(f"{command.strip()} ({record['date']}, {record['machine']}); test accuracy in "
                                      f"% selected by training-domain validation, mean ± standard error over seeds "
                                      f"{args.seeds}\n\n{md}\n")  # fmt: skip
    print(md)
    print(json.dumps({"benchmark": record["benchmark"], "runs": len(keys), "failed": len(record["failed"])}))


if __name__ == "__main__":
    main()

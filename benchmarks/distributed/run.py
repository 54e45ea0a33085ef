"""Throughput of distributed meta-training on this machine: 2 ranks x 1 torch thread against 1 rank x 1
thread, through the real script (`torchrun --nproc_per_node=2 scripts/meta_train.py ...` against
`python scripts/meta_train.py ...`), the two interleaved and repeated, nothing else running. Reported
per case: seconds per meta-step (sampling included; median over repeats), tasks (episodic) or training
rows (the online regime's data-parallel MW-Net run: a meta-step is one look-ahead) per second, the
speed-up, and the largest difference between the meta-parameters the two end with (float32: the
order of the sums differs). Results: benchmarks/results/distributed_throughput.{json,md}.

    python benchmarks/distributed/run.py                 # both cases, 2 repeats
    python benchmarks/distributed/run.py --cases sinusoid_maml --repeats 3
    python benchmarks/distributed/run.py --cases noisy_fmnist_mwnet_b128 noisy_fmnist_mwnet_b1024 --out online
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["threads=1", "progress=false", "logger=none", "train.validate_every=0", "train.checkpoint_every=0",
          "baseline.enabled=false", "test.num_tasks=2", "test.steps=[1]", "overwrite=true"]  # fmt: skip
CASES = {  # episodic: MAML, one inner step, second order, meta-batch 32 (items: tasks)
    "omniglot_conv4_maml": ["experiment=omniglot_minimal_5way", "algorithm=maml", "train.meta_batch=32",
                            "train.meta_steps=12"],  # fmt: skip
    "sinusoid_maml": ["algorithm=maml", "train.meta_batch=32", "train.meta_steps=300"],
    # the online regime, data-parallel: MW-Net on noisy Fashion-MNIST (MLP 784-256-10), one-step look-aheads
    # through momentum SGD; a meta-step is one look-ahead + phi update + real step (items: training rows)
    "noisy_fmnist_mwnet_b128": ["task=noisy_fashion_mnist", "algorithm=mwnet", "task.data.train_limit=12800",
                                "task.epochs=1", "task.batch_size=128", "task.meta_batch_size=100"],  # fmt: skip
    "noisy_fmnist_mwnet_b1024": ["task=noisy_fashion_mnist", "algorithm=mwnet", "task.data.train_limit=51200",
                                 "task.epochs=1", "task.batch_size=1024", "task.meta_batch_size=800"],  # fmt: skip
}
ITEMS = {"omniglot_conv4_maml": 32, "sinusoid_maml": 32, "noisy_fmnist_mwnet_b128": 128,
         "noisy_fmnist_mwnet_b1024": 1024}  # tasks or training rows per meta-step


def run(case: str, ranks: int, out: Path) -> dict:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]  # fmt: skip
    cmd = [*launcher, "scripts/meta_train.py", *CASES[case], *COMMON, f"hydra.run.dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"error: {case} on {ranks} rank(s) failed: {done.stderr.strip().splitlines()[-1:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    if "step_seconds" in metrics:  # episodic
        seconds = (metrics["step_seconds"] + metrics["sample_seconds"]) / metrics["meta_steps"]
    else:  # online: the outer loop's time over the epochs, per look-ahead
        seconds = metrics["seconds_per_epoch"] * metrics["epochs"] / metrics["meta_steps"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)["meta"]
    return {"seconds_per_step": seconds, "phi": {f"{m}.{n}": t for m, ts in state.items() for n, t in ts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="", help="suffix of the result files (distributed_throughput_<out>)")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()[0]
    base = ROOT / "benchmarks" / "runs" / "distributed"
    rows, lines = {}, ["| case | 1 rank: s / meta-step | 2 ranks: s / meta-step | speed-up | "
                       "tasks or rows / s (1 -> 2) | max abs difference of phi |",
                       "|---|---|---|---|---|---|"]  # fmt: skip
    for case in args.cases:
        times: dict[int, list[float]] = {1: [], 2: []}
        phis = {}
        for repeat in range(args.repeats):  # interleaved: 1, 2, 1, 2, ...
            for ranks in (1, 2):
                out = base / f"{case}_{ranks}ranks_{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                result = run(case, ranks, out)
                times[ranks].append(result["seconds_per_step"])
                phis[ranks] = result["phi"]
                print(f"{case} {ranks} rank(s), repeat {repeat}: {result['seconds_per_step']:.4f} s / meta-step",
                      flush=True)  # fmt: skip
        one, two = statistics.median(times[1]), statistics.median(times[2])
        batch = ITEMS[case]
        difference = max(float((phis[1][k] - phis[2][k]).abs().max()) for k in phis[1])
        rows[case] = {"seconds_per_step_1_rank": round(one, 4), "seconds_per_step_2_ranks": round(two, 4),
                      "speedup": round(one / two, 2), "items_per_second_1_rank": round(batch / one, 1),
                      "items_per_second_2_ranks": round(batch / two, 1), "max_abs_phi_difference": difference,
                      "all_seconds": {str(k): [round(v, 4) for v in t] for k, t in times.items()}}  # fmt: skip
        lines.append(f"| {case} | {one:.4f} | {two:.4f} | {one / two:.2f}x | {batch / one:.1f} -> {batch / two:.1f} | "
                     f"{difference:.1e} |")  # fmt: skip
    command = "python benchmarks/distributed/run.py " + " ".join(sys.argv[1:])
    record = {"benchmark": "distributed_throughput", "command": command.strip(),
              "date": started.isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo, "
                         f"one torch thread per rank, load average {load:.2f} at the start",
              "cases": {k: CASES[k] for k in args.cases}, "repeats": args.repeats, "table": rows}  # fmt: skip
    out = ROOT / "benchmarks" / "results" / ("distributed_throughput" + (f"_{args.out}" if args.out else ""))
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    md = "\n".join(lines)
    out.with_suffix(".md").write_text(f"{record['command']} ({record['date']}, {record['machine']})\n\n{md}\n")
    print(md)
    print(json.dumps({"benchmark": record["benchmark"], **{k: v["speedup"] for k, v in rows.items()}}))


if __name__ == "__main__":
    main()

"""A graph budget choosing the chunk of batched tasks: peak memory growth of metaloss's batched
meta-step (`Unrolled(batched=True, graph_budget_mb=B)`) against B, on the Conv-4 MAML case of
benchmarks/peers/run.py (meta-batch 32, one second-order step), each budget in a fresh process
(`VmHWM`, as run.py measures), with glibc's mmap threshold fixed at 64 KiB (freed large blocks go
back to the system at once) and with its default. Memory only: nothing is timed.

    python benchmarks/peers/graph_budget.py          # writes benchmarks/results/peers_graph_budget.json

The last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from run import CASES, build, meta_batches, peak_growth, provenance, write_result

BUDGETS = (None, 1000.0, 500.0, 250.0, 100.0)  # MB; None: all 32 tasks at once


def child(case_name: str, budget: float | None, seed: int) -> dict[str, float]:
    """In this fresh process: the peak resident-set growth over a warm-up and one meta-step."""
    torch.set_num_threads(2)
    case = CASES[case_name]
    impl = build(case, "metaloss_batched", seed)
    impl.estimator.graph_budget_mb = budget
    batches = meta_batches(case, 2, seed + 1)
    chunk = impl.estimator.chunk_for(impl.problem, batches[0])  # measures the saved bytes of one task
    growth = peak_growth(lambda: [impl.step(batch) for batch in batches])
    saved = next(iter(impl.estimator.saved_bytes.values()), None)
    return {"chunk": chunk if chunk is not None else case.meta_batch,
            "peak_growth_mb": round(growth["peak_growth_mb"], 1),
            "saved_mb_per_task": None if saved is None else round(saved / 2**20, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="maml_1step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers_graph_budget.json"))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        budget = None if args.child[1] == "none" else float(args.child[1])
        print(json.dumps(child(args.child[0], budget, args.seed)))
        return
    rows = []
    for budget in BUDGETS:
        row: dict[str, object] = {"graph_budget_mb": budget}
        for allocator, env in (("mmap_threshold_64k", {"MALLOC_MMAP_THRESHOLD_": "65536"}), ("glibc_default", {})):
            command = [sys.executable, __file__, "--child", args.case, "none" if budget is None else str(budget),
                       "--seed", str(args.seed)]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **env})
            row[allocator] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(row, file=sys.stderr)
    result = {
        "benchmark": "peers_graph_budget",
        **provenance(),
        "torch": torch.__version__, "case": args.case, "setting": CASES[args.case].__dict__, "rows": rows,
    }  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()

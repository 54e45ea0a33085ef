"""The task loop's two ways of summing per-task meta-gradients, side by side in one process.

    python benchmarks/peers/grad_summing.py      # MAML, FOMAML, ANIL, Meta-SGD at one inner step

`Unrolled`'s task loop sums in the meta-parameters' .grad (`metaloss.hypergrad.base.summed_in_grad`:
each task's backward adds into them in place, one gradient buffer); the threads and other
estimators sum the gradients each task returns (`torch.autograd.grad`, a running sum beside each
task's fresh gradient). Per case of benchmarks/peers/run.py: both as metaloss's task loop
(`engine.meta_step`, Adam), `--rounds` meta-steps each after one untimed, round-robin with the order
reversed every round; the median seconds per meta-step, each one's tensor peak
(`metaloss.memory.tensor_peak_growth`, exact) and the largest difference of their meta-gradients
(the same sums in the same order: 0). Writes benchmarks/results/peers_grad_summing.json; the last
stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from run import CASES, build, meta_batches, provenance, round_robin, write_result

from metaloss.hypergrad import Unrolled
from metaloss.hypergrad.base import mean_over_tasks
from metaloss.memory import tensor_peak_growth
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut


class ReturnedSums(Unrolled):
    """The task loop summing the gradients its tasks return (what it did before `summed_in_grad`)."""

    def estimate(self, problem: BilevelProblem, episodes: Sequence[Episode]) -> HypergradOut:
        return mean_over_tasks(problem, episodes, self._task, self.threads, accumulates=False)


def run_case(case_name: str, rounds: int, seed: int) -> dict[str, object]:
    case = CASES[case_name]
    impls = {"summed_in_grad": build(case, "metaloss", seed), "returned_sums": build(case, "metaloss", seed)}
    impls["returned_sums"].estimator = ReturnedSums("first_order" if case.first_order else "full")
    probe = meta_batches(case, 1, seed)[0]
    gradients = {n: impl.gradient(probe) for n, impl in impls.items()}
    batches = meta_batches(case, rounds + 3, seed + 1)
    seconds = round_robin(impls, batches[: rounds + 1], warmup=1)
    peaks = {n: tensor_peak_growth(lambda i=impl: i.step(batches[-2]), lambda i=impl: i.step(batches[-1])) / 2**20
             for n, impl in impls.items()}  # fmt: skip
    rows = {n: {"median_s": round(statistics.median(seconds[n]), 4), "tensor_peak_mb": round(peaks[n], 3)}
            for n in impls}  # fmt: skip
    reference = gradients["returned_sums"]
    return {"case": case_name, "implementations": rows,
            "grad_max_rel_difference": (gradients["summed_in_grad"] - reference).abs().max().item()
            / reference.abs().max().item(),
            "time_ratio": round(rows["summed_in_grad"]["median_s"] / rows["returned_sums"]["median_s"], 3),
            "tensor_peak_saved_mb": round(peaks["returned_sums"] - peaks["summed_in_grad"], 3)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["maml_1step", "fomaml_1step", "anil_1step", "metasgd_1step"],
                        choices=sorted(c for c, case in CASES.items() if case.algorithm != "imaml"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers_grad_summing.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    rows = [run_case(name, args.rounds, args.seed) for name in args.cases]
    write_result({"benchmark": "peers_grad_summing", **provenance(argv), "threads": args.threads,
                  "rounds": args.rounds, "load_average_at_start": [round(x, 2) for x in load_at_start],
                  "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "cases": rows}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()

"""Compiled tasks under different Inductor options, side by side in one process.

    python benchmarks/peers/compile_layout.py        # MAML, FOMAML, ANIL, Meta-SGD at one inner step
    python benchmarks/peers/compile_layout.py --variants loop compiled_nchw compiled_nchw_cpp_wrapper \
        compiled_nchw_in_threads compiled_nchw_cpp_wrapper_in_threads \
        --out benchmarks/results/peers_compile_wrapper.json

On a CPU, Inductor turns a graph with convolutions channels-last (`layout_optimization`) and
launches its kernels from generated Python (`cpp_wrapper` off); metaloss's compiled tasks switch the
first off and the second on (`metaloss.hypergrad.compiled.CPU_INDUCTOR_OPTIONS`). Per case of
benchmarks/peers/run.py: the plain `functional_call` loop (a reference for the machine's speed) and
`Unrolled(compile=True)` compiled once per chosen option set, in the loop or in threads (each a
fresh problem, so each compiles its own graph), then `--rounds` meta-steps each, round-robin with
the order reversed every round; the median seconds per meta-step, the first call's seconds (which
compiles; Inductor's on-disk cache may shorten it), each meta-gradient's largest difference from the
plain loop's (relative to its largest entry) and each compiled variant's time over the first
compiled one's.
Writes benchmarks/results/peers_compile_layout.json; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from run import CASES, build, meta_batches, provenance, round_robin, write_result

from metaloss.hypergrad import compiled

CHANNELS_LAST = {"layout_optimization": True, "cpp_wrapper": False}  # Inductor's defaults
NCHW = {"layout_optimization": False, "cpp_wrapper": False}
NCHW_CPP_WRAPPER = {"layout_optimization": False, "cpp_wrapper": True}  # metaloss's
VARIANTS = {  # implementation of run.py and its Inductor options (None: not compiled)
    "loop": ("loop", None),
    "compiled_channels_last": ("metaloss_compiled", CHANNELS_LAST),
    "compiled_nchw": ("metaloss_compiled", NCHW),
    "compiled_nchw_cpp_wrapper": ("metaloss_compiled", NCHW_CPP_WRAPPER),
    "compiled_nchw_in_threads": ("metaloss_threads_compiled", NCHW),
    "compiled_nchw_cpp_wrapper_in_threads": ("metaloss_threads_compiled", NCHW_CPP_WRAPPER),
}


def run_case(case_name: str, rounds: int, seed: int, variants: list[str]) -> dict[str, object]:
    case = CASES[case_name]
    probe = meta_batches(case, 1, seed)[0]
    impls, first_call, difference = {}, {}, {}
    reference = None
    default = dict(compiled.CPU_INDUCTOR_OPTIONS)
    for name in variants:
        implementation, options = VARIANTS[name]
        impl = build(case, implementation, seed)
        if options is not None:  # read when the task compiles, on its first call
            compiled.CPU_INDUCTOR_OPTIONS = options
        started = time.perf_counter()
        gradient = impl.gradient(probe)
        first_call[name] = round(time.perf_counter() - started, 2)
        reference = gradient if reference is None else reference
        difference[name] = (gradient - reference).abs().max().item() / reference.abs().max().item()
        impls[name] = impl
    compiled.CPU_INDUCTOR_OPTIONS = default
    seconds = round_robin(impls, meta_batches(case, rounds, seed + 1), warmup=1)
    rows = {n: {"median_s": round(statistics.median(seconds[n]), 4), "first_call_s": first_call[n],
                "grad_max_rel_difference_from_loop": difference[n]} for n in impls}  # fmt: skip
    compiled_names = [n for n in variants if VARIANTS[n][1] is not None]
    ratios = {f"{n}_over_{compiled_names[0]}": round(rows[n]["median_s"] / rows[compiled_names[0]]["median_s"], 3)
              for n in compiled_names[1:]}  # fmt: skip
    return {"case": case_name, "implementations": rows, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES),
                        default=["maml_1step", "fomaml_1step", "anil_1step", "metasgd_1step"])  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["loop", "compiled_channels_last", "compiled_nchw"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=9, help="meta-steps per variant; the first is not counted")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers_compile_layout.json"))
    args = parser.parse_args()
    if args.rounds < 2 or args.threads < 1:
        parser.error("need --rounds >= 2 and --threads >= 1")
    if sum(VARIANTS[v][1] is not None for v in args.variants) < 2 or len(set(args.variants)) < len(args.variants):
        parser.error("--variants: name at least two compiled variants, each once")
    if args.variants[0] != "loop":
        parser.error("--variants: start with loop (the reference of the gradient differences)")
    if any(CASES[c].algorithm == "imaml" or CASES[c].model != "conv4" for c in args.cases):
        parser.error("the options concern the Conv-4 cases of the unrolled estimator")
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    rows = [run_case(c, args.rounds, args.seed, args.variants) for c in args.cases]
    result = {
        "benchmark": "peers_compile_layout", **provenance(), "torch": torch.__version__, "threads": args.threads,
        "variants": {v: dict(zip(("implementation", "inductor_options"), VARIANTS[v])) for v in args.variants},
        "rounds": args.rounds,
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "cases": rows,
    }  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()

"""The time periodic checkpointing adds to the default run (MAML on the sinusoid, `configs/meta_train.yaml`
as composed with no overrides: 3,000 meta-steps of 25 tasks, a checkpoint every 100 meta-steps),
side by side in one process: the same training with checkpoints (written atomically into a
temporary directory, fsync included, as `scripts/meta_train.py` writes them) and without, alternating,
plus the time of every checkpoint write itself.

    python benchmarks/checkpoint_overhead.py [--steps 3000] [--repeats 2]

Writes benchmarks/results/checkpoint_overhead.json; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from common import build, resolved  # noqa: E402

from metaloss.checkpoint import save_checkpoint  # noqa: E402
from metaloss.engine import MetaTrainer  # noqa: E402


def train(cfg, steps: int, every: int, folder: Path | None) -> tuple[float, list[float]]:
    """Seconds of `steps` meta-steps of a freshly built default run, and the seconds of each checkpoint write."""
    built = build(cfg)
    trainer = MetaTrainer(built.problem, built.estimator, built.outer_opt, built.splits.train,
                          meta_batch=cfg.train.meta_batch)  # fmt: skip
    config, writes = resolved(cfg), []

    def save(t: MetaTrainer) -> None:
        started = time.perf_counter()
        save_checkpoint(folder / "checkpoint.pt", {**t.state_dict(), "config": config})
        writes.append(time.perf_counter() - started)

    started = time.perf_counter()
    trainer.train(steps, progress=False, checkpoint=save if folder else None, checkpoint_every=every)
    return time.perf_counter() - started, writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="meta-steps (default: the config's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/checkpoint_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("meta_train", overrides=["logger=none"])
    steps, every = args.steps or cfg.train.meta_steps, cfg.train.checkpoint_every
    seconds: dict[str, list[float]] = {"with_checkpoints": [], "without": []}
    writes: list[float] = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            t, w = train(cfg, steps, every, Path(folder))
        seconds["with_checkpoints"].append(t)
        writes += w
        seconds["without"].append(train(cfg, steps, every, None)[0])
    with_ckpt, without = statistics.median(seconds["with_checkpoints"]), statistics.median(seconds["without"])
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "meta_steps": steps,
        "checkpoint_every": every,
        "checkpoints_per_run": len(writes) // args.repeats,
        "seconds_with_checkpoints": seconds["with_checkpoints"],
        "seconds_without": seconds["without"],
        "ratio_median": with_ckpt / without,
        "seconds_per_checkpoint_write_median": statistics.median(writes),
        "write_share_of_run": sum(writes) / args.repeats / without,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

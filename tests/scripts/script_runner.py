"""Running the entry points as a user does: one subprocess per run, several at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "meta_train.py"
META_TEST = REPO_ROOT / "scripts" / "meta_test.py"
TRAIN = REPO_ROOT / "scripts" / "train.py"
MINI_FILES = ("mini-imagenet-cache-train.pkl", "mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-test.pkl")
TINY = [
    "progress=false",
    "threads=1",
    "train.meta_steps=3",
    "train.meta_batch=2",
    "train.validate_every=2",
    "train.val_tasks=2",
    "baseline.steps=2",
    "baseline.tasks_per_step=2",
    "test.num_tasks=5",
]
TIMING_KEYS = {"train_seconds", "total_seconds", "sample_seconds", "step_seconds"}


@dataclass
class Run:
    dir: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def metrics_file(self) -> Path:
        return self.dir / "metrics.json"

    def metrics(self) -> dict:
        return json.loads(self.metrics_file.read_text())

    def last_stdout_json(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def launcher(ranks: int = 1) -> list[str]:
    """The command that starts a script: python, or torchrun with `ranks` processes on this machine."""
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


def run_script(run_dir: Path, overrides: list[str], script: Path = SCRIPT, ranks: int = 1) -> Run:
    proc = subprocess.run(
        [*launcher(ranks), str(script), f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return Run(run_dir, proc.returncode, proc.stdout, proc.stderr)


def run_all(base: Path, plans: dict[str, list[str]], script: Path = SCRIPT) -> dict[str, Run]:
    """Run every plan (name -> overrides) in its own run directory base/name/run, concurrently."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {
            name: pool.submit(run_script, base / name / "run", overrides, script) for name, overrides in plans.items()
        }
        return {name: future.result() for name, future in futures.items()}

"""Runs that survive: a meta_train.py run killed with SIGKILL midway and started again in its
directory resumes from its last checkpoint and ends bitwise where the uninterrupted run ends
(metrics and meta-parameters), for MAML on the sinusoid, an online-regime ES-Single run with
per-truncation updates, and an Omniglot few-shot run (official zip format, fixture)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from script_runner import REPO_ROOT, SCRIPT, TIMING_KEYS, Run, run_script

COMMON = ["progress=false", "threads=1", "train.validate_every=0", "test.num_tasks=5", "train.checkpoint_every=5"]
SCENARIOS = {
    "maml_sinusoid": ["train.meta_steps=400", "train.meta_batch=10", "train.log_every=5", "baseline.steps=2"],
    "online_es_single": ["hypergrad=es_single", "hypergrad.update=truncation", "problem.inner_steps=4",
                         "train.meta_steps=150", "train.meta_batch=4", "logger=none"],  # fmt: skip
    "omniglot": ["task=omniglot", "task.n_way=3", "task.q_query=2", "model.filters=8", "train.meta_steps=120",
                 "train.meta_batch=2", "logger=none", "baseline.enabled=false"],  # fmt: skip
}


def killed_after_first_checkpoint(run_dir: Path, overrides: list[str], script: Path = SCRIPT) -> int:
    """Start a run, SIGKILL it as soon as its first checkpoint exists; returns its exit status."""
    proc = subprocess.Popen(
        [sys.executable, str(script), f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not (run_dir / "checkpoint.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=60)


def whole_and_resumed(tmp_path: Path, overrides: list[str]) -> tuple[Run, Run]:
    """The run of `overrides` uninterrupted, and the same run killed after its first checkpoint and
    resumed (side by side); asserts that both finished and that the kill was a SIGKILL."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        whole = pool.submit(run_script, tmp_path / "whole", overrides)
        status = pool.submit(killed_after_first_checkpoint, tmp_path / "killed", overrides).result()
    resumed, whole_run = run_script(tmp_path / "killed", overrides), whole.result()
    assert whole_run.returncode == 0, whole_run.explain()
    assert status == -signal.SIGKILL and resumed.returncode == 0, resumed.explain()
    return whole_run, resumed


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_omniglot) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("resume")
    omniglot = make_omniglot(base / "omniglot-data")
    plans = {name: COMMON + overrides for name, overrides in SCENARIOS.items()}
    plans["omniglot"] += [f"task.root={omniglot}", f"task.cache_dir={base / 'cache'}"]
    out: dict[str, dict] = {name: {} for name in plans}
    with ThreadPoolExecutor(max_workers=2) as pool:
        whole = {name: pool.submit(run_script, base / name / "whole", plan) for name, plan in plans.items()}
        killed = {name: pool.submit(killed_after_first_checkpoint, base / name / "killed", plan)
                  for name, plan in plans.items()}  # fmt: skip
        for name in plans:
            out[name]["whole"], out[name]["kill_status"] = whole[name].result(), killed[name].result()
        resumed = {name: pool.submit(run_script, base / name / "killed", plans[name]) for name in plans}
        for name in plans:
            out[name]["resumed"] = resumed[name].result()
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_killed_run_resumes_to_the_uninterrupted_result_bitwise(runs, name):
    whole, resumed = runs[name]["whole"], runs[name]["resumed"]
    assert whole.returncode == 0, whole.explain()
    assert runs[name]["kill_status"] == -signal.SIGKILL  # it was killed, not finished
    assert resumed.returncode == 0, resumed.explain()
    assert "resuming at meta-step" in resumed.stderr
    a, b = whole.metrics(), resumed.metrics()
    assert a["resumed_from_step"] is None and 0 < b["resumed_from_step"] < a["meta_steps"]
    skip = TIMING_KEYS | {"resumed_from_step"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    ca = torch.load(whole.dir / "checkpoint.pt", weights_only=True)
    cb = torch.load(resumed.dir / "checkpoint.pt", weights_only=True)
    assert ca["meta"].keys() == cb["meta"].keys()
    for module in ca["meta"]:
        assert all(torch.equal(ca["meta"][module][k], cb["meta"][module][k]) for k in ca["meta"][module])
    assert ca["run"]["step"] == cb["run"]["step"] == a["meta_steps"]
    assert ca["estimator"] == cb["estimator"]
    assert not list(resumed.dir.glob(".*.tmp"))


def test_resumed_tensorboard_logs_each_step_once(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    resumed: Run = runs["maml_sinusoid"]["resumed"]
    acc = EventAccumulator(str(resumed.dir / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("meta_train/loss")]
    assert steps == list(range(0, 400, 5)) + [399]  # log_every=5: no step twice, none missing

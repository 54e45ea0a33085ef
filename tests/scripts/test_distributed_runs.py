"""Distributed meta-training as a user launches it: `torchrun --nproc_per_node=2 scripts/meta_train.py`
on this CPU (gloo). A meta-batch split over 2 ranks gives the single-process update (unrolled with
each rank's tasks as one vmap batch and task by task, first order, implicit, ES-Single; antithetic
ES with its pairs split instead): after three plain-SGD outer steps in float64 the meta-parameters
equal those of one process to float tolerance, and the gathered meta-test equals the single-process
one; a run killed on 2 ranks resumes on 1 to the uninterrupted 1-rank result; a rank that dies ends
the job with an error instead of a hang; only rank 0 writes. The noisy-label training runs (the
online regime) are data-parallel: 2 ranks give the 1-rank run, and a run killed on 2 ranks resumes
on 1."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from script_runner import REPO_ROOT, SCRIPT, launcher, run_script

SMALL = ["train.meta_steps=3", "train.meta_batch=3", "test.num_tasks=3", "dtype=float64", "outer_opt=sgd",
         "progress=false", "threads=1", "logger=none", "baseline.enabled=false", "train.validate_every=2",
         "train.val_tasks=3"]  # fmt: skip
ESTIMATORS = {
    "unrolled": ["algorithm=maml", "hypergrad.batched=true"],  # each rank's tasks as one vmap batch
    "unrolled_task_loop": ["algorithm=maml", "hypergrad.batched=false"],
    "first_order": ["algorithm=fomaml"],
    # a proximal term strong enough for CG to converge: unconverged CG on an indefinite Hessian (the default
    # strength on the sinusoid leaves a relative residual of 0.2) amplifies rounding, e.g. of the task order
    "implicit": ["algorithm=imaml", "problem.inner_regularizer.strength=10", "hypergrad.iterations=60"],
    "es_single": ["hypergrad=es_single", "hypergrad.particles=4"],
    "es_particles": ["hypergrad=es", "hypergrad.particles=5", "distributed.split=particles"],  # pairs over ranks
}


def meta_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return {f"{m}.{n}": t for m, tensors in state["meta"].items() for n, t in tensors.items()}


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict[str, torch.Tensor]:
    """phi before any outer step (a run of 0 meta-steps writes the initial state; the same model and
    seed for every estimator)."""
    plan = [o for o in SMALL if not o.startswith("train.meta_steps")] + ["train.meta_steps=0"]
    run = run_script(tmp_path_factory.mktemp("init") / "run", plan)
    assert run.returncode == 0, run.explain()
    return meta_state(run.dir)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_a_meta_batch_split_over_two_ranks_gives_the_single_process_update(tmp_path, name, start):
    plan = SMALL + ESTIMATORS[name]
    one, two = run_script(tmp_path / "one", plan), run_script(tmp_path / "two", plan, ranks=2)
    assert one.returncode == 0, one.explain()
    assert two.returncode == 0, two.explain()
    a, b = meta_state(one.dir), meta_state(two.dir)
    assert a.keys() == b.keys() and a
    for key in a:
        assert not torch.equal(a[key], start[key])  # phi moved
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-11)
    ma, mb = one.metrics(), two.metrics()
    assert (ma["ranks"], mb["ranks"]) == (1, 2) and mb == two.last_stdout_json()
    for key in (k for k in ma if k.startswith("meta/")):  # the meta-test split over the ranks and gathered
        assert mb[key] == pytest.approx(ma[key], rel=1e-9, abs=1e-12), key


def test_only_rank_zero_writes(tmp_path):
    run = run_script(tmp_path / "run", SMALL + ["logger=tensorboard"], ranks=2)
    assert run.returncode == 0, run.explain()
    assert run.stdout.strip().splitlines()[-1].startswith("{")
    assert sum(line.startswith('{"task"') for line in run.stdout.splitlines()) == 1  # one final JSON line
    assert len(list((run.dir / "tensorboard").glob("events.*"))) == 1  # one logger
    assert sorted(p.name for p in run.dir.iterdir()) == [".hydra", "checkpoint.pt", "meta_train.log", "metrics.json",
                                                         "tensorboard"]  # Hydra's log, as in one process


def test_ranks_with_their_own_default_directory_names_leave_one_run_directory(tmp_path):
    # the default hydra.run.dir holds a per-process id: every rank but 0 removes the one Hydra made for it
    run = run_script(tmp_path / "runs" / "run_${run_id:}", SMALL, ranks=2)
    assert run.returncode == 0, run.stderr[-3000:]
    made = list((tmp_path / "runs").iterdir())
    assert len(made) == 1 and (made[0] / "metrics.json").is_file()


def killed_after_first_checkpoint(run_dir: Path, plan: list[str], ranks: int) -> int:
    """Start a run on `ranks` processes, SIGKILL all of them as soon as its first checkpoint exists."""
    proc = subprocess.Popen([*launcher(ranks), str(SCRIPT), f"hydra.run.dir={run_dir}", *plan], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not (run_dir / "checkpoint.pt").exists():
        time.sleep(0.01)
    for pid in [*descendants(proc.pid), proc.pid]:  # the whole job at once, as a crashed node
        os.kill(pid, signal.SIGKILL)
    return proc.wait(timeout=60)


def killed_on_two_resumed_on_one(tmp_path, plan: list[str]):
    """`plan` run whole on one rank, and killed on two after its first checkpoint then resumed on one."""
    whole = run_script(tmp_path / "whole", plan)
    status = killed_after_first_checkpoint(tmp_path / "killed", plan, ranks=2)
    assert whole.returncode == 0, whole.explain()
    assert status == -signal.SIGKILL
    resumed = run_script(tmp_path / "killed", plan)  # one rank now
    assert resumed.returncode == 0, resumed.explain()
    return whole, resumed


def test_a_run_killed_on_two_ranks_resumes_on_one(tmp_path):
    plan = ["train.meta_steps=600", "train.meta_batch=4", "train.checkpoint_every=5", "dtype=float64",
            "progress=false", "threads=1", "logger=none", "baseline.enabled=false", "test.num_tasks=4",
            "train.validate_every=0"]  # fmt: skip
    whole, resumed = killed_on_two_resumed_on_one(tmp_path, plan)
    assert 0 < resumed.metrics()["resumed_from_step"] < 600
    a, b = meta_state(whole.dir), meta_state(resumed.dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12)


def test_a_rank_that_dies_ends_the_job_with_an_error(tmp_path):
    plan = ["train.meta_steps=100000", "train.meta_batch=4", "train.checkpoint_every=5", "progress=false",
            "threads=1", "logger=none", "baseline.enabled=false", "distributed.timeout_s=30"]  # fmt: skip
    proc = subprocess.Popen([*launcher(2), str(SCRIPT), f"hydra.run.dir={tmp_path / 'run'}", *plan], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
        assert time.monotonic() - started < 60  # the survivor does not hang
    finally:
        if proc.poll() is None:
            for pid in [*descendants(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "rank" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]


def descendants(root: int) -> dict[int, list[bytes]]:
    """The processes below `root` (torchrun's workers run in sessions of their own), with their
    environments."""
    parents, environs = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                environs[int(entry.name)] = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the name
    below = {}
    for pid in parents:
        up = pid
        while up in parents and up != root:
            up = parents[up]
        if up == root and pid != root:
            below[pid] = environs[pid]
    return below


def rank_pid(root: int, rank: int) -> int:
    """The worker of torchrun `root` whose environment says RANK=`rank`."""
    for pid, environ in descendants(root).items():
        if f"RANK={rank}".encode() in environ and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ):
            return pid
    raise AssertionError(f"no worker of rank {rank} under {root}")


def test_tasks_not_yet_distributed_are_refused_in_one_line(tmp_path):
    run = run_script(tmp_path / "run", ["task=rotated_digits", "train.meta_steps=2", "progress=false", "threads=1",
                                        "logger=none"], ranks=2)  # fmt: skip
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("the domain tasks run in one process for now" in e for e in errors)
    assert run.stderr.count("Traceback") == 1 and "ChildFailedError" in run.stderr  # torchrun's own summary only


ONLINE = ["task=noisy_digits", "task.epochs=1", "dtype=float64", "progress=false", "threads=1", "logger=none",
          "task.batch_size=33", "task.meta_batch_size=25"]  # fmt: skip  (odd batches: shares of 16/17 and 12/13 rows)


def tensors(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint entry, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


@pytest.mark.parametrize("algorithm", ["mwnet", "ml3_online", "emlc"])
def test_a_noisy_label_training_run_on_two_ranks_equals_one_process(tmp_path, algorithm):
    """The online regime data-parallel: every minibatch and meta batch split over the ranks, the inner
    gradient summed over them inside the 2-step look-ahead (momentum SGD): the weighting net (the
    learned loss, EMLC's teacher with its own clean-batch losses) and the trained model end as in one
    process, and so does the test accuracy."""
    plan = ONLINE + [f"algorithm={algorithm}", "hypergrad.truncation=2", "hypergrad.kind=tbptt"]
    one, two = run_script(tmp_path / "one", plan), run_script(tmp_path / "two", plan, ranks=2)
    assert one.returncode == 0, one.explain()
    assert two.returncode == 0, two.explain()
    a, b = torch.load(one.dir / "checkpoint.pt", weights_only=True), torch.load(two.dir / "checkpoint.pt",
                                                                               weights_only=True)  # fmt: skip
    ta, tb = tensors({"meta": a["meta"], "estimator": a["estimator"]}), tensors({"meta": b["meta"],
                                                                                 "estimator": b["estimator"]})
    assert ta.keys() == tb.keys() and any("particles" in k for k in ta) and any(k.startswith("/meta/inner_loss")
                                                                                for k in ta)  # fmt: skip
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-9, atol=1e-11)
    ma, mb = one.metrics(), two.metrics()
    assert (ma["ranks"], mb["ranks"]) == (1, 2) and mb == two.last_stdout_json()
    assert mb["test_accuracy"] == pytest.approx(ma["test_accuracy"], abs=1e-9)
    assert ma["outer_updates"] == mb["outer_updates"] > 0


def test_a_noisy_label_run_killed_on_two_ranks_resumes_on_one(tmp_path):
    plan = [o for o in ONLINE if not o.startswith("task.epochs")] + ["task.epochs=8", "algorithm=mwnet",
                                                                     "train.checkpoint_every=4"]  # fmt: skip
    whole, resumed = killed_on_two_resumed_on_one(tmp_path, plan)
    assert 0 < resumed.metrics()["resumed_from_step"] < whole.metrics()["meta_steps"]
    a = tensors(torch.load(whole.dir / "checkpoint.pt", weights_only=True)["estimator"])
    b = tensors(torch.load(resumed.dir / "checkpoint.pt", weights_only=True)["estimator"])
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-11)
    assert resumed.metrics()["test_accuracy"] == pytest.approx(whole.metrics()["test_accuracy"], abs=1e-9)


def test_noisy_label_methods_that_need_the_whole_batch_are_refused_in_one_line(tmp_path):
    run = run_script(tmp_path / "run", ONLINE + ["algorithm=l2rw"], ranks=2)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("L2RW's per-position weights and the self-taught rescaler run in one process" in e
                          for e in errors)  # fmt: skip

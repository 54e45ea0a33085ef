"""Bad input, as a user gives it: each row of the README's bad-input table is one case here. Every
case ends with one line on stderr starting with "error:", a non-zero exit code (2: bad input,
3: the run diverged, 4: the run directory cannot be written), no traceback, and nothing that
was already written lost."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from script_runner import META_TEST, MINI_FILES, REPO_ROOT, SCRIPT, TINY, Run, run_script

LEAN = TINY + ["logger=none", "baseline.enabled=false"]


@dataclass
class Case:
    overrides: list[str]
    code: int
    message: str
    script: Path = SCRIPT
    run_dir: str = "run"  # relative to the case's folder, or "{finished}" / "{unfinished}"
    extra: dict = field(default_factory=dict)


CASES: dict[str, Case] = {
    # configuration values
    "negative_inner_lr": Case(["inner_opt.lr=-1"], 2, "inner learning rate must be >= 0, got -1"),
    "zero_inner_steps": Case(["problem.inner_steps=0"], 2, "problem.inner_steps must be >= 1"),
    "unknown_task": Case(["task=nope"], 2, "unknown task 'nope'; available: "),
    "unknown_algorithm": Case(["algorithm=nope"], 2,
                              "unknown algorithm 'nope'; available: anil, clean_only, cross_entropy"),  # fmt: skip
    "negative_outer_lr": Case(["outer_opt.lr=-1"], 2, "outer_opt: Invalid learning rate: -1"),
    "baseline_enabled_word": Case(["baseline.enabled=sometimes"], 2, "baseline.enabled must be true, false or auto"),
    "batched_word": Case(["hypergrad.batched=sometimes"], 2, "batched must be true, false or 'auto', got 'sometimes'"),
    "batch_tasks_zero": Case(["test.batch_tasks=0"], 2, "test.batch_tasks must be an int >= 1 or auto, got 0"),
    "test_threads_zero": Case(["test.threads=0"], 2, "test.threads must be an int >= 1 or auto, got 0"),
    "hypergrad_threads_word": Case(["hypergrad.threads=two"], 2,
                                   "threads must be a positive count or 'auto', got 'two'"),  # fmt: skip
    "meta_steps_not_an_int": Case(["train.meta_steps=abc"], 2, "train.meta_steps: Value 'abc' of type 'str' could not"),
    "seed_not_an_int": Case(["seed=abc"], 2, "seed: Value 'abc' of type 'str' could not be converted to Integer"),
    "unknown_key": Case(["foo=1"], 2, "Could not override 'foo'. To append to your config use +foo=1"),
    "inner_lr_not_a_number": Case(["inner_opt.lr=abc"], 2, "inner_opt.lr must be a number, got 'abc'"),
    "hidden_not_a_list": Case(["model.hidden=abc"], 2, "model.hidden must be a list, got 'abc'"),
    "particles_not_an_int": Case(["hypergrad=es", "hypergrad.particles=2.5"], 2, "hypergrad.particles must be an int"),
    "float16": Case(["dtype=float16"], 2, "dtype must be one of ['float32', 'float64'], got 'float16'"),
    "zero_threads": Case(["threads=0"], 2, "threads must be >= 1 or null, got 0"),
    "cuda_without_gpu": Case(["device=cuda"], 2, "device=cuda but this machine has no CUDA GPU"),
    "no_validation_tasks": Case(["train.val_tasks=0"], 2, "train.val_tasks must be >= 1 when validating"),
    "empty_test_steps": Case(["test.steps=[]"], 2, "test.steps must be a non-empty list of ints >= 0"),
    "one_way_task": Case(["task=omniglot", "task.n_way=1"], 2, "task.n_way must be >= 2, got 1"),
    "no_query_examples": Case(["task=omniglot", "task.q_query=0"], 2, "task.q_query must be >= 1, got 0"),
    "validating_without_a_validation_split": Case(["task=omniglot", "task.root={omniglot}", "task.cache_dir={cache}",
                                                   "task.val_alphabets=[]", "task.n_way=2", "task.q_query=1"], 2,
                                                  "task 'omniglot' has no validation split: set "
                                                  "train.validate_every=0"),  # fmt: skip
    # noisy-label tasks
    "unknown_noise_type": Case(["task=noisy_digits", "task.noise.type=gaussian"], 2, "unknown noise type 'gaussian'"),
    "noise_rate_one": Case(["task=noisy_digits", "task.noise.rate=1.0"], 2, "noise rate must be in [0, 1), got 1.0"),
    "meta_set_larger_than_a_class": Case(["task=noisy_digits", "task.meta_per_class=500"], 2,
                                         "meta_per_class=500 takes all of class 0"),  # fmt: skip
    "pair_map_missing_class": Case(["task=noisy_digits", "task.noise.type=pair", "task.noise.pair_map={{0:12}}"], 2,
                                   "pair_map names classes [12], but the data has classes 0..9"),  # fmt: skip
    "noisy_data_root_without_files": Case(["task=noisy_fashion_mnist", "task.data.root=/nonexistent"], 2,
                                          "set task.data.root="),  # fmt: skip
    "es_on_a_noisy_task": Case(["task=noisy_digits", "hypergrad=pes"], 2,
                               "a noisy-label task runs in the online regime with truncated backpropagation"),
    "mpl_without_unlabelled_data": Case(["task=noisy_digits", "algorithm=mpl"], 2,
                                        "pseudo-labelling (mpl, pseudo_label) is for tasks with unlabelled data"),
    "labels_read_on_a_semisup_task": Case(["task=semisup_digits", "algorithm=cross_entropy"], 2,
                                          "this task's training rows are unlabelled (semi-supervised)"),
    "mlc_without_a_clean_meta_set": Case(["task=noisy_digits", "algorithm=mlc", "task.meta_per_class=0"], 2,
                                         "need a clean meta set: task.meta_per_class >= 1"),  # fmt: skip
    "averaging_decay_of_one": Case(["task=noisy_digits", "task.average=1.0"], 2,
                                   "task.average (the decay of the iterates' moving average) must be in [0, 1), "
                                   "got 1.0"),
    "transition_rate_past_chance": Case(["task=noisy_digits", "algorithm=transition", "inner_loss.init_rate=0.95"], 2,
                                        "init_rate 0.95 >= 1 - 1/C = 0.900"),
    "mpl_with_a_k_step_lookahead": Case(["task=semisup_digits", "hypergrad.truncation=2"], 2,
                                        "MPL's teacher feedback is for one-step look-aheads: truncation must be 1"),
    "unknown_test_domain": Case(["task=rotated_digits", "task.test_domain=90"], 2,
                                "unknown test domain '90' of rotated_digits; its domains are 0, 15, 30, 45, 60, 75"),
    "domain_without_class_folders": Case(["task=folder_domains", "task.data.root={no_classes}"], 2,
                                         "has no class folders: expected"),  # fmt: skip
    "domain_with_no_samples": Case(["task=folder_domains", "task.data.root={no_images}"], 2,
                                   "domain 'sketch' in"),  # fmt: skip
    "tent_without_normalisation_layers": Case(["task=rotated_digits", "task.adaptation.episodes=1",
                                               "task.adaptation.test_time_parameters=norm"], 2,
                                              "the model (MLP) has no normalisation layers"),  # fmt: skip
    # combinations that cannot learn
    "implicit_on_plain_maml": Case(["hypergrad=implicit_cg"], 2, "Implicit gives no meta-parameter a gradient"),
    "truncation_cuts_the_init": Case(["hypergrad=truncated", "problem.inner_steps=3"], 2,
                                     "Unrolled gives no meta-parameter a gradient"),  # fmt: skip
    "nothing_meta_learned": Case(["init=fixed"], 2, "nothing is meta-learned: with init=fixed"),
    "classification_loss_on_regression": Case(["inner_loss=poly1"], 2,
                                              "a classification loss needs class-index targets"),  # fmt: skip
    # data
    "miniimagenet_missing": Case(["task=miniimagenet", "task.root={empty}"], 2, "mini-imagenet-cache-train.pkl"),
    # run directories and checkpoints
    "finished_run_dir": Case([], 2, "holds a finished run (metrics.json)", run_dir="{finished}"),
    "unfinished_run_of_another_config": Case(["seed=1"], 2, "holds an unfinished run of another config: seed (0 -> 1)",
                                             run_dir="{unfinished}"),  # fmt: skip
    "resume_missing_checkpoint": Case(["resume=/nonexistent/checkpoint.pt"], 2, "checkpoint not found"),
    "resume_other_config": Case(["resume={finished}/checkpoint.pt", "problem.inner_steps=2"], 2,
                                "of another config: problem.inner_steps (1 -> 2)"),  # fmt: skip
    "resume_pickle_payload": Case(["resume={evil}"], 2, "refused to unpickle"),
    "diverging_run": Case(["inner_opt.lr=1e6", "problem.inner_steps=5", "train.meta_steps=30", "train.max_bad_steps=4"],
                          3, "4 consecutive meta-updates had a non-finite outer loss"),  # fmt: skip
    "file_too_large": Case([], 4, "checkpoint.pt: File too large", extra={"fsize": 20_000}),
    "sweep_with_one_bad_job": Case(["inner_opt.lr=0.01,-1"], 2, "1 job(s) of the sweep failed",
                                   extra={"multirun": True}),  # fmt: skip
    # meta_test.py
    "meta_test_missing_checkpoint": Case(["checkpoint=/nonexistent.pt"], 2, "checkpoint not found", script=META_TEST),
    "meta_test_pickle_payload": Case(["checkpoint={evil}"], 2, "refused to unpickle", script=META_TEST),
    "meta_test_other_task": Case(["checkpoint={finished}/checkpoint.pt", "task=omniglot", "task.root={omniglot}",
                                  "task.n_way=3", "task.q_query=1", "task.cache_dir={cache}"], 2,
                                 "the checkpoint's model (mlp) cannot take this task's inputs of shape [1, 28, 28]",
                                 script=META_TEST),  # fmt: skip
    "meta_test_zero_threads": Case(["checkpoint={finished}/checkpoint.pt", "threads=0"], 2,
                                   "threads must be >= 1 or null, got 0", script=META_TEST),  # fmt: skip
}


def evil_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint-looking file whose pickle would create `marker` if it were ever unpickled."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"meta": {"init": {}}, "config": {}, "payload": Payload()}, path)


def run_case(base: Path, name: str, case: Case, paths: dict[str, str]) -> Run:
    folder = base / name
    folder.mkdir()
    run_dir = Path(case.run_dir.format(**paths)) if "{" in case.run_dir else folder / case.run_dir
    overrides = [o.format(**paths) for o in case.overrides]
    if case.script == SCRIPT:
        overrides = LEAN + overrides
    else:
        overrides = ["progress=false", "threads=1", "test.num_tasks=2"] + overrides
    flags = ["-m", f"hydra.sweep.dir={folder / 'sweep'}"] if case.extra.get("multirun") else []
    limit = case.extra.get("fsize")

    def limits() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, str(case.script), *flags, f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=limits,
    )
    return Run(run_dir, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_omniglot, make_folder_domains) -> dict:
    """A finished run, an unfinished one (its checkpoint alone), a poisoned checkpoint, an Omniglot
    fixture and an empty data folder; then every case, two at a time."""
    base = tmp_path_factory.mktemp("bad_inputs")
    finished = run_script(base / "finished", LEAN)
    assert finished.returncode == 0, finished.explain()
    unfinished = base / "unfinished"
    unfinished.mkdir()
    shutil.copy(finished.dir / "checkpoint.pt", unfinished / "checkpoint.pt")
    (base / "empty").mkdir()
    evil_checkpoint(base / "evil.pt", base / "payload-ran")
    make_folder_domains(base / "no_classes", {"photo": {"dog": 1}})
    (base / "no_classes" / "sketch").mkdir()  # a domain folder with no class folders
    make_folder_domains(base / "no_images", {"photo": {"dog": 1}, "sketch": {"dog": 0}})
    paths = {"finished": str(base / "finished"), "unfinished": str(unfinished), "evil": str(base / "evil.pt"),
             "empty": str(base / "empty"), "omniglot": str(make_omniglot(base / "omniglot")),
             "cache": str(base / "cache"), "no_classes": str(base / "no_classes"),
             "no_images": str(base / "no_images")}  # fmt: skip
    before = {name: (finished.dir / name).read_bytes() for name in ("metrics.json", "checkpoint.pt")}
    (base / "cases").mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_case, base / "cases", name, case, paths) for name, case in CASES.items()}
        runs = {name: future.result() for name, future in futures.items()}
    return {"runs": runs, "base": base, "finished": finished, "before": before, "unfinished": unfinished}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_its_exit_code(world, name):
    run, case = world["runs"][name], CASES[name]
    assert run.returncode == case.code, run.explain()
    assert "Traceback" not in run.stderr, run.explain()
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and case.message in last, run.explain()
    if not case.extra.get("multirun"):
        assert len(errors) == 1, run.explain()
        assert not (run.dir / "metrics.json").exists() or run.dir == world["finished"].dir
    assert not run.dir.exists() or not list(run.dir.glob(".*.tmp"))


def test_nothing_already_written_is_lost_or_changed(world):
    finished = world["finished"].dir
    for name, content in world["before"].items():
        assert (finished / name).read_bytes() == content  # refused reruns and meta_test left them alone
    assert (world["unfinished"] / "checkpoint.pt").read_bytes() == world["before"]["checkpoint.pt"]
    assert not (world["base"] / "payload-ran").exists()  # no pickle payload ever ran


def test_a_diverging_run_keeps_a_finite_checkpoint(world):
    run = world["runs"]["diverging_run"]
    state = torch.load(run.dir / "checkpoint.pt", weights_only=True)
    assert state["run"]["skipped_updates"] >= 4 and state["run"]["bad_streak"] == 4
    assert all(torch.isfinite(t).all() for t in state["meta"]["init"].values())


def test_a_sweep_runs_its_good_jobs_past_a_bad_one(world):
    sweep = world["base"] / "cases" / "sweep_with_one_bad_job" / "sweep"
    run = world["runs"]["sweep_with_one_bad_job"]
    assert (sweep / "0" / "metrics.json").is_file(), run.explain()
    assert not (sweep / "1" / "metrics.json").exists()
    assert "inner learning rate must be >= 0, got -1" in run.stderr


def test_missing_miniimagenet_names_files_directory_and_key(world):
    run = world["runs"]["miniimagenet_missing"]
    line = run.stderr.strip().splitlines()[-1]
    assert all(name in line for name in MINI_FILES) and str(Path(world["base"] / "empty").resolve()) in line
    assert "task.root" in line


def test_a_read_only_run_directory_is_one_line(tmp_path):
    """A run directory on a read-only file system (a tmpfs mounted read-only; skipped where this
    process may not mount)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        run = run_script(mount / "run", LEAN)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert run.returncode == 4, run.explain()
    assert run.stderr.strip() == f"error: cannot write to the run directory {mount / 'run'}: Read-only file system"


def test_a_disk_that_fills_up_midway_keeps_the_last_checkpoint(tmp_path):
    """The file system fills up mid-run (a 4 MB tmpfs, filled by another file once the first checkpoint
    exists): the run stops at its next checkpoint with one line and exit 4, no temporary file is left,
    and the checkpoint written before stays loadable. Skipped where this process may not mount."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), f"hydra.run.dir={mount / 'run'}", *LEAN, "train.meta_steps=3000",
             "train.meta_batch=10", "train.checkpoint_every=20", "train.validate_every=0"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        while proc.poll() is None and not (mount / "run" / "checkpoint.pt").exists():
            time.sleep(0.01)
        with open(mount / "filler", "wb") as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 4, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot write to the run directory: {mount / 'run' / 'checkpoint.pt'}: No space")
        assert last.endswith("the last checkpoint written is kept")
        assert torch.load(mount / "run" / "checkpoint.pt", weights_only=True)["run"]["step"] >= 20
        assert not list((mount / "run").glob(".*.tmp"))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", str(mount)], check=True)


def test_meta_test_in_a_training_run_directory_writes_its_own_file(world):
    finished = world["finished"].dir
    overrides = ["progress=false", "threads=1", "test.num_tasks=2", f"checkpoint={finished / 'checkpoint.pt'}"]
    run = run_script(finished, overrides, script=META_TEST)
    assert run.returncode == 0, run.explain()
    assert (finished / "meta_test.json").is_file() and run.last_stdout_json()["test_tasks"] == 2
    assert (finished / "metrics.json").read_bytes() == world["before"]["metrics.json"]

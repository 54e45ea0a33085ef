"""scripts/meta_train.py end to end, as a user runs it: a subprocess per run, tiny settings.

Python start-up (torch, Hydra, TensorBoard) dominates each run, so the runs of a fixture are
launched together, as many at a time as there are CPU cores, each with one torch thread.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from script_runner import TIMING_KEYS, TINY, Run, run_all

ALGORITHMS = {
    "maml": ["algorithm=maml"],
    "fomaml": ["algorithm=fomaml"],
    "anil": ["algorithm=anil"],
    "metasgd": ["algorithm=metasgd"],
    # K = 1 of T = 2: the gradient reaches the learned inner lr, not the initialisation
    "truncated": ["hypergrad=truncated", "problem.inner_steps=2", "inner_opt.learn=[lr]"],
    "imaml": ["algorithm=imaml", "problem.inner_steps=3"],
    "es_single_online": ["hypergrad=es_single", "hypergrad.update=truncation", "problem.inner_steps=2"],
    "ml3_regression": ["inner_loss=ml3_regression", "init=fixed", "inner_loss.hidden=[8]"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_miniimagenet) -> dict[str, Run]:
    """Successful runs: every algorithm, a repeat of the first (determinism), and mini-ImageNet."""
    base = tmp_path_factory.mktemp("meta_train")
    mini = base / "mini-data"
    make_miniimagenet(mini, n_classes=6, per_class=3)
    # the variants skip what the default run already covers: TensorBoard and the pretrained baseline
    lean = ["logger=none", "baseline.enabled=false"]
    plans = {name: TINY + overrides + (lean if name != "maml" else []) for name, overrides in ALGORITHMS.items()}
    plans["maml_again"] = plans["maml"]
    for name, batched in (("maml_float64", 1), ("maml_float64_batched", 3)):  # tasks as vmap batches
        plans[name] = TINY + ["algorithm=maml", "dtype=float64", f"hypergrad.batched={batched > 1}",
                              f"test.batch_tasks={batched}"] + lean  # fmt: skip
    plans["maml_float64_compiled"] = TINY + ["algorithm=maml", "dtype=float64", "hypergrad.batched=false",
                                             "hypergrad.compile=true", "hypergrad.compile_backend=aot_eager"] + lean
    # Proto-MAML's head and Kao et al.'s zeroed head on the mini-ImageNet fixture (classification)
    for name, init in (("miniimagenet_proto_head", ["init=proto_head"]), ("miniimagenet_zeroed_head",
                                                                          ["init.zeroed=[head]"])):  # fmt: skip
        plans[name] = TINY + [f"task.root={mini}", "task=miniimagenet", "task.q_query=1", "model.filters=4",
                              "train.meta_steps=2", "test.num_tasks=2", "test.steps=[0,1]"] + init + lean  # fmt: skip
    plans["miniimagenet"] = TINY + [
        "task=miniimagenet",
        f"task.root={mini}",
        "task.q_query=1",
        "model.filters=4",
        "train.meta_steps=2",
        "test.num_tasks=2",
        "test.steps=[0,1]",
    ]
    return run_all(base, plans)


def test_default_run_writes_metrics_events_and_checkpoint(runs):
    run = runs["maml"]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert run.last_stdout_json() == metrics  # the last stdout line is metrics.json
    assert metrics["task"] == "sinusoid" and metrics["algorithm"] == "maml" and metrics["hypergrad"] == "unrolled"
    assert metrics["meta_steps"] == 3 and metrics["test_tasks"] == 5
    for prefix in ("meta", "pretrained"):
        for t in (0, 1, 10):
            mean, ci = metrics[f"{prefix}/loss_step{t}"], metrics[f"{prefix}/loss_step{t}_ci95"]
            assert math.isfinite(mean) and mean > 0
            assert math.isfinite(ci) and ci > 0
    assert metrics["total_seconds"] >= metrics["train_seconds"] >= 0

    events = sorted((run.dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    checkpoint = torch.load(run.dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["run"]["step"] == 3 and checkpoint["version"] == 2
    assert "init" in checkpoint["meta"] and "outer_opt" in checkpoint
    assert checkpoint["config"]["train"]["meta_steps"] == 3


def test_tensorboard_events_hold_training_validation_and_test_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["maml"]
    assert run.returncode == 0, run.explain()
    acc = EventAccumulator(str(run.dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"meta_train/loss", "meta_val/loss_step1", "meta_test/loss_step10", "pretrained_test/loss_step0"} <= tags
    assert [e.step for e in acc.Scalars("meta_train/loss")] == [0, 2]  # log_every=20: first and last step
    assert [e.step for e in acc.Scalars("meta_val/loss_step1")] == [1]  # validate_every=2 of 3 steps
    logged = acc.Scalars("meta_test/loss_step10")[-1].value
    assert logged == pytest.approx(run.metrics()["meta/loss_step10"], rel=1e-5)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_each_algorithm_runs(runs, name):
    run = runs[name]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert run.last_stdout_json() == metrics
    expected = {
        "maml": ("maml", "unrolled"),
        "fomaml": ("fomaml", "first_order"),
        "anil": ("anil", "unrolled"),
        "metasgd": ("metasgd", "unrolled"),
        "truncated": ("maml", "truncated"),
        "imaml": ("imaml", "implicit_cg"),
        "es_single_online": ("maml", "es_single"),
        "ml3_regression": ("maml", "unrolled"),
    }[name]
    assert (metrics["algorithm"], metrics["hypergrad"]) == expected
    # per-truncation updates: K = 1 of T = 2 steps gives two outer updates per meta-step
    assert metrics["outer_updates"] == metrics["meta_steps"] * (2 if name == "es_single_online" else 1)
    assert all(math.isfinite(metrics[f"meta/loss_step{t}"]) for t in (0, 1, 10))
    assert (run.dir / "checkpoint.pt").is_file()
    assert any(key.startswith("pretrained/") for key in metrics) == (name == "maml")  # baseline.enabled=false
    checkpoint = torch.load(run.dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ("inner_opt" in checkpoint["meta"]) == (name in ("metasgd", "truncated"))  # learned inner rates are phi
    assert ("inner_loss" in checkpoint["meta"]) == (name == "ml3_regression")  # a learned loss is phi


def test_same_seed_gives_identical_metrics(runs):
    a, b = runs["maml"], runs["maml_again"]
    assert a.returncode == b.returncode == 0, a.explain() + b.explain()
    ma, mb = ({k: v for k, v in run.metrics().items() if k not in TIMING_KEYS} for run in (a, b))
    assert ma == mb
    ca = torch.load(a.dir / "checkpoint.pt", map_location="cpu", weights_only=True)["meta"]["init"]
    cb = torch.load(b.dir / "checkpoint.pt", map_location="cpu", weights_only=True)["meta"]["init"]
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


@pytest.mark.parametrize("other", ["maml_float64_batched", "maml_float64_compiled"])
def test_tasks_batched_in_one_vmap_or_compiled_train_and_test_the_same(runs, other):
    a, b = runs["maml_float64"], runs[other]
    assert a.returncode == b.returncode == 0, a.explain() + b.explain()
    ca = torch.load(a.dir / "checkpoint.pt", map_location="cpu", weights_only=True)["meta"]["init"]
    cb = torch.load(b.dir / "checkpoint.pt", map_location="cpu", weights_only=True)["meta"]["init"]
    assert ca.keys() == cb.keys()
    for k in ca:
        torch.testing.assert_close(cb[k], ca[k], rtol=1e-9, atol=1e-11)
    ma, mb = a.metrics(), b.metrics()
    tested = [k for k in ma if k.startswith("meta/loss_step")]
    assert tested and all(mb[k] == pytest.approx(ma[k], rel=1e-9) for k in tested)


def test_algorithms_differ(runs):
    """The variants are really different runs: ANIL and Meta-SGD end with other meta-test losses than MAML."""
    losses = {name: runs[name].metrics()["meta/loss_step1"] for name in ("maml", "anil", "metasgd")}
    assert len(set(losses.values())) == 3


def test_miniimagenet_fixture_runs_end_to_end(runs):
    run = runs["miniimagenet"]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert run.last_stdout_json() == metrics
    assert metrics["task"] == "miniimagenet" and metrics["meta_steps"] == 2 and metrics["test_tasks"] == 2
    assert not any(key.startswith("pretrained/") for key in metrics)  # baseline.enabled=auto: regression only
    for prefix in ("meta",):
        for t in (0, 1):
            assert math.isfinite(metrics[f"{prefix}/loss_step{t}"])
            # 2 tasks x 5 queries: accuracy is a multiple of 1/10 in [0, 1]
            accuracy = metrics[f"{prefix}/accuracy_step{t}"]
            assert 0.0 <= accuracy <= 1.0 and round(accuracy * 10, 6) == round(accuracy * 10)
        assert f"{prefix}/loss_step10" not in metrics
    assert (run.dir / "checkpoint.pt").is_file()


def test_a_sweep_over_a_config_group_runs_every_job(tmp_path):
    """`-m algorithm=maml,fomaml`: the group-choice check takes each option; each job has its directory."""
    import subprocess
    import sys

    from script_runner import REPO_ROOT, SCRIPT

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "-m", f"hydra.sweep.dir={tmp_path}", "algorithm=maml,fomaml", *TINY,
         "logger=none", "baseline.enabled=false", "train.validate_every=0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [json.loads((tmp_path / str(i) / "metrics.json").read_text())["algorithm"] for i in (0, 1)] == [
        "maml",
        "fomaml",
    ]


def test_a_learned_loss_run_is_meta_tested_from_its_checkpoint(runs, tmp_path):
    """inner_loss=ml3_regression init=fixed: phi is the loss alone; meta_test.py rebuilds the loss
    from the checkpoint and reproduces the run's own meta-test numbers."""
    from script_runner import META_TEST, run_script

    run = runs["ml3_regression"]
    assert run.returncode == 0, run.explain()
    assert (run.metrics()["init"], run.metrics()["inner_loss"]) == ("fixed", "ml3_regression")
    tested = run_script(tmp_path / "test", ["progress=false", "threads=1", "test.num_tasks=5",
                                            f"checkpoint={run.dir / 'checkpoint.pt'}"], script=META_TEST)  # fmt: skip
    assert tested.returncode == 0, tested.explain()
    for t in (0, 1, 10):
        assert tested.metrics()[f"loss_step{t}"] == run.metrics()[f"meta/loss_step{t}"]
    # the learned loss is also saved as a file of its own, bit-exact with the checkpoint's phi
    from metaloss.io import load_loss

    assert run.metrics()["saved_meta_objects"] == ["inner_loss.safetensors", "inner_loss.png"]
    assert (run.dir / "inner_loss.png").read_bytes()[:4] == b"\x89PNG"
    loaded = load_loss(run.dir / "inner_loss.safetensors").state_dict()
    saved = torch.load(run.dir / "checkpoint.pt", weights_only=True)["meta"]["inner_loss"]
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_prototype_head_classifies_by_prototype_before_any_step_and_meta_tests_the_same(runs, tmp_path):
    """init=proto_head: every fixture image of a class has the same pixels (tests/conftest.py), so the
    prototypical head is right on every query at step 0, where a zeroed head is at chance (all logits
    equal); meta_test.py rebuilds the per-episode initialisation from the checkpoint."""
    from script_runner import META_TEST, run_script

    proto, zeroed = runs["miniimagenet_proto_head"], runs["miniimagenet_zeroed_head"]
    assert proto.returncode == 0, proto.explain()
    assert zeroed.returncode == 0, zeroed.explain()
    assert proto.metrics()["init"] == "proto_head" and proto.metrics()["meta/accuracy_step0"] == 1.0
    assert zeroed.metrics()["meta/loss_step0"] == pytest.approx(math.log(5), rel=1e-6)  # uniform over 5 ways
    checkpoint = torch.load(proto.dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert not checkpoint["meta"]["init"]["model.head.weight"].any()  # held at zero, not phi
    tested = run_script(tmp_path / "test", ["progress=false", "threads=1", "test.num_tasks=2", "test.steps=[0,1]",
                                            f"checkpoint={proto.dir / 'checkpoint.pt'}"], script=META_TEST)  # fmt: skip
    assert tested.returncode == 0, tested.explain()
    for t in (0, 1):
        assert tested.metrics()[f"loss_step{t}"] == proto.metrics()[f"meta/loss_step{t}"]

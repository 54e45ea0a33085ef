"""scripts/train.py, ordinary training with a chosen or a learned loss, end to end in subprocesses:
it learns MNIST-1D, reads Fashion-MNIST's idx files, flattens CIFAR-10's images, takes a learned loss
file, resumes a killed run bitwise, and refuses a loss it cannot use in one line."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from script_runner import TRAIN, run_script
from test_resume import killed_after_first_checkpoint

from metaloss.io import save_meta_object
from metaloss.meta import ML3Loss, ML3RegressionLoss

BASE = ["progress=false", "threads=1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_fashion_mnist_split) -> dict:
    base = tmp_path_factory.mktemp("train")
    fashion = base / "fashion"
    fashion.mkdir()
    make_fashion_mnist_split(fashion, "train", 300, gz=True, seed=1)
    make_fashion_mnist_split(fashion, "t10k", 50, gz=True, seed=2)
    torch.manual_seed(0)
    return {
        "base": base,
        "fashion": fashion,
        "ml3": save_meta_object(ML3Loss(hidden=(8,)), base / "ml3.safetensors"),
        "ml3_regression": save_meta_object(ML3RegressionLoss(hidden=(4,)), base / "ml3r.safetensors"),
    }


def test_cross_entropy_learns_mnist1d_and_poly1_runs(tmp_path):
    for loss in ("cross_entropy", "poly1"):
        run = run_script(tmp_path / loss, [*BASE, f"loss={loss}", "train.steps=300"], script=TRAIN)
        assert run.returncode == 0, run.explain()
        metrics = run.metrics()
        assert run.last_stdout_json() == metrics and metrics["loss"] == loss
        assert metrics["test_accuracy"] > 0.3  # chance is 0.1; 300 steps of SGD reach about 0.55
        assert (run.dir / "checkpoint.pt").is_file() and (run.dir / "tensorboard").is_dir()


def test_scikit_learn_digits_learn_with_a_learned_loss_file(files, tmp_path):
    pytest.importorskip("sklearn")
    for name, loss in (("ce", ["loss=cross_entropy"]), ("ml3", ["loss=learned", f"loss.path={files['ml3']}"])):
        run = run_script(tmp_path / name, [*BASE, "data=digits", "train.steps=150", *loss], script=TRAIN)
        assert run.returncode == 0, run.explain()
        metrics = run.metrics()
        assert metrics["data"] == "digits" and round(metrics["test_accuracy"] * 450, 6).is_integer()  # 450 test rows
        if loss == ["loss=cross_entropy"]:
            assert metrics["test_accuracy"] > 0.8  # chance is 0.1; 150 SGD steps reach about 0.93


def test_fashion_mnist_idx_files_and_a_learned_loss_file(files, tmp_path):
    overrides = [*BASE, "data=fashion_mnist", f"data.root={files['fashion']}", "train.steps=20", "train.batch_size=50",
                 "loss=learned", f"loss.path={files['ml3']}"]  # fmt: skip
    run = run_script(tmp_path / "run", overrides, script=TRAIN)
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert (metrics["data"], metrics["loss"], metrics["steps"]) == ("fashion_mnist", "learned", 20)
    assert 0 <= metrics["test_accuracy"] <= 1 and round(metrics["test_accuracy"] * 50, 6).is_integer()


def test_cifar10_images_are_flattened_for_the_mlp(tmp_path, make_cifar10):
    make_cifar10(tmp_path / "cifar")  # official python layout, 20 test images of shape [3, 32, 32]
    overrides = [*BASE, "data=cifar10", f"data.root={tmp_path / 'cifar'}", "train.steps=5", "train.batch_size=10"]
    run = run_script(tmp_path / "run", overrides, script=TRAIN)
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert (metrics["data"], metrics["steps"]) == ("cifar10", 5)
    assert 0 <= metrics["test_accuracy"] <= 1 and round(metrics["test_accuracy"] * 20, 6).is_integer()
    model = torch.load(run.dir / "checkpoint.pt", weights_only=True)["meta"]["model"]
    assert model["body.0.weight"].shape[1] == 3 * 32 * 32


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss=learned", "loss.path={ml3_regression}"], "ML3RegressionLoss needs a meta-learning context"),
    (["loss=learned", "loss.path=/nonexistent.safetensors"], "meta-object file not found"),
    (["loss=learned"], "Missing mandatory value: loss.path"),
    (["loss=nope"], "unknown loss 'nope'; available: cross_entropy, focal, gce, label_smoothing, learned, poly1"),
    (["data=fashion_mnist", "data.root={base}"], "Fashion-MNIST not found in"),
    (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
], ids=["regression_loss", "missing_file", "no_path", "unknown_loss", "no_fashion_mnist", "batch_size"])  # fmt: skip
def test_bad_input_is_one_line(files, tmp_path, overrides, message):
    run = run_script(tmp_path / "run", [*BASE, *(o.format(**files) for o in overrides)], script=TRAIN)
    assert run.returncode == 2, run.explain()
    assert run.stderr.strip().splitlines()[-1].startswith("error:") and message in run.stderr, run.explain()
    assert "Traceback" not in run.stderr and not run.metrics_file.exists()


def test_a_killed_run_resumes_bitwise(tmp_path):
    plan = [*BASE, "train.steps=600", "train.checkpoint_every=10"]
    whole = run_script(tmp_path / "whole", plan, script=TRAIN)
    assert killed_after_first_checkpoint(tmp_path / "killed", plan, script=TRAIN) == -signal.SIGKILL
    resumed = run_script(tmp_path / "killed", plan, script=TRAIN)
    assert whole.returncode == resumed.returncode == 0, whole.explain() + resumed.explain()
    a, b = whole.metrics(), resumed.metrics()
    assert b["resumed_from_step"] > 0
    skip = {"total_seconds", "resumed_from_step"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    ma = torch.load(whole.dir / "checkpoint.pt", weights_only=True)["meta"]["model"]
    mb = torch.load(resumed.dir / "checkpoint.pt", weights_only=True)["meta"]["model"]
    assert all(np.array_equal(ma[k].numpy(), mb[k].numpy()) for k in ma)

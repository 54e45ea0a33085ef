"""scripts/meta_train.py on the noisy-label tasks, as a user runs it (scikit-learn's digits, a few
epochs): every method runs end to end and writes metrics.json (final test accuracy), TensorBoard
events (per-epoch test accuracy, the weights' separation of clean and noisy rows) and a checkpoint;
runs are deterministic; a killed run resumes to the uninterrupted result bitwise."""

from __future__ import annotations

import pytest
import torch
from script_runner import TIMING_KEYS, run_all, run_script
from test_resume import whole_and_resumed

BASE = ["task=noisy_digits", "task.epochs=2", "progress=false", "threads=1"]
METHODS = {
    "cross_entropy": ["algorithm=cross_entropy"],
    "clean_only": ["algorithm=clean_only"],
    "gce": ["algorithm=gce", "logger=none"],
    "sce": ["algorithm=sce", "logger=none"],
    "nce_rce": ["algorithm=nce_rce", "logger=none"],
    "poly1": ["algorithm=poly1", "logger=none"],
    "mwnet": ["algorithm=mwnet", "task.noise.rate=0.6"],
    "l2rw": ["algorithm=l2rw", "task.noise.rate=0.6", "logger=none"],
    "ml3_online": ["algorithm=ml3_online", "logger=none"],
    "storm": ["algorithm=storm", "task.noise.rate=0.6", "logger=none"],
    "transition": ["algorithm=transition", "task.noise.type=pair", "logger=none"],
    "sce_averaged": ["algorithm=sce", "task.average=0.99"],
    "mwnet_pair_k2": ["algorithm=mwnet", "task.noise.type=pair", "hypergrad.truncation=2", "logger=none"],
    "mwnet_instance_adam": ["algorithm=mwnet", "task.noise.type=instance", "inner_opt=adam", "inner_opt.lr=0.01",
                            "logger=none"],  # fmt: skip
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("noisy")
    plans = {name: BASE + overrides for name, overrides in METHODS.items()}
    plans["mwnet_again"] = plans["mwnet"]
    return run_all(base, plans)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_a_model_and_reports_its_test_accuracy(runs, name):
    run = runs[name]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert run.last_stdout_json() == metrics
    assert metrics["task"] == "noisy_digits" and metrics["algorithm"] == METHODS[name][0].split("=")[1]
    assert metrics["training_steps"] == 2 * (metrics["train_rows"] // 64) and metrics["epochs"] == 2
    assert metrics["meta_steps"] == -(-metrics["training_steps"] // (2 if name == "mwnet_pair_k2" else 1))
    if name != "ml3_online":  # a learned loss from its random start need not train in two epochs
        assert 0.1 < metrics["test_accuracy"] <= 1.0  # above chance after two epochs
    assert (run.dir / "checkpoint.pt").is_file()
    weighted = name.startswith(("mwnet", "storm"))
    assert ("weight_auc" in metrics) == weighted and ((run.dir / "weights.png").is_file()) == weighted
    if name == "ml3_online":
        assert "inner_loss.safetensors" in metrics["saved"]
    averaged = name == "sce_averaged"  # the model is the iterates' moving average, the last iterate beside it
    assert ("last_iterate_test_accuracy" in metrics) == averaged and ("last_iterate_test_loss" in metrics) == averaged
    assert ("transition_error" in metrics) == (name == "transition")  # the learned T against the realised one
    if name == "transition":
        assert 0 <= metrics["transition_error"] < 1 and "transition.png" in metrics["saved"]
        assert (run.dir / "transition.png").is_file()


def test_methods_differ_and_runs_repeat(runs):
    acc = {name: runs[name].metrics()["test_accuracy"] for name in METHODS}
    assert len(set(acc.values())) >= 6
    a, b = runs["mwnet"].metrics(), runs["mwnet_again"].metrics()
    skip = TIMING_KEYS | {"seconds_per_epoch"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_tensorboard_has_the_epoch_metrics_and_the_weight_histograms(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["mwnet"].dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    for tag in ("epoch/test_accuracy", "epoch/train_loss_noisy_labels", "epoch/weight_clean", "epoch/weight_noisy",
                "epoch/weight_auc", "final/test_accuracy"):  # fmt: skip
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("epoch/test_accuracy")] == [1, 2]
    assert acc.Scalars("final/test_accuracy")[0].value == pytest.approx(runs["mwnet"].metrics()["test_accuracy"])
    assert {"weights/clean", "weights/noisy"} <= set(tags["histograms"])
    assert "meta_train/loss" in tags["scalars"]
    averaged = EventAccumulator(str(runs["sce_averaged"].dir / "tensorboard"))
    averaged.Reload()
    assert {"epoch/test_accuracy", "epoch/last_iterate_test_accuracy"} <= set(averaged.Tags()["scalars"])


def test_the_clean_only_baseline_trains_on_the_meta_set(runs):
    clean, noisy = runs["clean_only"].metrics(), runs["cross_entropy"].metrics()
    assert clean["training_steps"] == noisy["training_steps"] and clean["test_accuracy"] != noisy["test_accuracy"]


def test_a_killed_noisy_label_run_resumes_bitwise(tmp_path):
    plan = ["task=noisy_digits", "algorithm=mwnet", "task.epochs=4", "train.checkpoint_every=7", "logger=none",
            "progress=false", "threads=1", "task.average=0.9"]  # fmt: skip
    whole, resumed = whole_and_resumed(tmp_path, plan)
    assert "resuming at look-ahead" in resumed.stderr
    a, b = whole.metrics(), resumed.metrics()
    assert a["resumed_from_step"] is None and 0 < b["resumed_from_step"] < a["meta_steps"]
    skip = TIMING_KEYS | {"resumed_from_step", "seconds_per_epoch"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    ca = torch.load(whole.dir / "checkpoint.pt", weights_only=True)
    cb = torch.load(resumed.dir / "checkpoint.pt", weights_only=True)
    for module in ca["meta"]:
        assert all(torch.equal(ca["meta"][module][k], cb["meta"][module][k]) for k in ca["meta"][module])
    model_a = ca["estimator"]["estimator"]["state"]["particles"][0][0]
    model_b = cb["estimator"]["estimator"]["state"]["particles"][0][0]
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    average_a = ca["estimator"]["estimator"]["state"]["particles"][0][1]["average"]
    average_b = cb["estimator"]["estimator"]["state"]["particles"][0][1]["average"]
    assert all(torch.equal(average_a[k], average_b[k]) for k in average_a)  # the moving average resumes too
    assert a["test_accuracy"] != a["last_iterate_test_accuracy"] or a["test_loss"] != a["last_iterate_test_loss"]


def test_mwnets_cifar10_protocol_composes_and_runs_two_steps_on_a_fixture(tmp_path, make_cifar10):
    make_cifar10(tmp_path / "cifar")
    run = run_script(tmp_path / "run", ["experiment=mwnet_cifar10", f"task.data.root={tmp_path / 'cifar'}",
                                        "task.meta_per_class=2", "task.batch_size=40", "task.epochs=1",
                                        "task.meta_batch_size=10", "logger=none", "progress=false", "threads=1"])
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert metrics["algorithm"] == "mwnet" and metrics["noise"]["type"] == "uniform" and metrics["noise"]["rate"] == 0.4
    assert metrics["train_rows"] == 80 and metrics["meta_rows"] == 20 and metrics["training_steps"] == 2
    assert metrics["outer_updates"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    config = (run.dir / ".hydra" / "config.yaml").read_text()
    assert "metaloss.models.CifarResNet" in config and "weight_decay: 0.0005" in config

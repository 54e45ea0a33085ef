"""scripts/meta_train.py with label correction (MLC, EMLC; noisy digits) and Meta Pseudo Labels (semi-
supervised digits), as a user runs them, a few epochs: every variant (the papers' approximate meta-
gradients and the exact ones) trains a model and writes metrics.json with the corrected-label (or
pseudo-label) accuracy from the hidden truth, TensorBoard events and a checkpoint; approximate and
exact runs differ; a killed MPL run resumes to the uninterrupted result bitwise; the CIFAR-10
protocols compose and run two steps on a fixture."""

from __future__ import annotations

import pytest
from script_runner import TIMING_KEYS, run_all, run_script
from test_resume import whole_and_resumed

NOISY = ["task=noisy_digits", "task.epochs=2", "task.noise.rate=0.6", "progress=false", "threads=1"]
SEMISUP = ["task=semisup_digits", "task.epochs=2", "progress=false", "threads=1"]
PLANS = {
    "mlc": NOISY + ["algorithm=mlc", "hypergrad.truncation=2"],
    "mlc_exact": NOISY + ["algorithm=mlc", "hypergrad.truncation=2", "hypergrad.kind=tbptt", "logger=none"],
    "mlc_k2_adam": NOISY
    + [
        "algorithm=mlc",
        "hypergrad.truncation=2",
        "inner_opt=adam",
        "inner_opt.lr=0.01",
        "hypergrad.eta=0.01",
        "logger=none",
    ],  # fmt: skip
    "emlc": NOISY + ["algorithm=emlc", "logger=none"],
    "emlc_exact": NOISY + ["algorithm=emlc", "hypergrad.kind=tbptt", "logger=none"],
    "mpl": SEMISUP + ["algorithm=mpl"],
    "mpl_exact": SEMISUP + ["algorithm=mpl_exact", "logger=none"],
    "pseudo_label": SEMISUP + ["algorithm=pseudo_label", "logger=none"],
    "clean_only": SEMISUP + ["algorithm=clean_only", "logger=none"],
}
CORRECTING = ("mlc", "mlc_exact", "mlc_k2_adam", "emlc", "emlc_exact")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("correction"), PLANS)


@pytest.mark.parametrize("name", list(PLANS))
def test_every_variant_trains_a_model_and_reports_what_its_labels_got_right(runs, name):
    run = runs[name]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert run.last_stdout_json() == metrics and (run.dir / "checkpoint.pt").is_file()
    assert metrics["training_steps"] == 2 * (metrics["train_rows"] // 64)
    assert metrics["meta_steps"] == -(-metrics["training_steps"] // (2 if name.startswith("mlc") else 1))
    assert 0.1 < metrics["test_accuracy"] <= 1.0  # above chance after two epochs
    if name in CORRECTING:
        assert metrics["task"] == "noisy_digits" and 0.55 < metrics["noise_rate_realised"] < 0.65
        assert (
            0 <= metrics["corrected_label_accuracy_noisy"] <= 1 and 0 <= metrics["corrected_label_accuracy_clean"] <= 1
        )
    else:
        assert metrics["task"] == "semisup_digits" and metrics["labels_per_class"] == 10
        assert metrics["meta_rows"] == 100 and "noise_rate_realised" not in metrics
        assert ("pseudo_label_accuracy" in metrics) == (name != "clean_only")


def test_approximate_and_exact_meta_gradients_train_different_models(runs):
    # (EMLC at K = 1: its forward-mode one-step term is exact; the runs differ by rounding alone at most)
    for approximate, exact in (("mlc", "mlc_exact"), ("mpl", "mpl_exact")):
        a, b = runs[approximate].metrics(), runs[exact].metrics()
        assert a["test_accuracy"] != b["test_accuracy"] or a["train_accuracy_true_labels"] != b[
            "train_accuracy_true_labels"]  # fmt: skip


def test_tensorboard_has_the_corrected_and_pseudo_label_accuracy(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, tags in (("mlc", ("epoch/corrected_label_accuracy_noisy", "epoch/corrected_label_accuracy_clean")),
                       ("mpl", ("epoch/pseudo_label_accuracy", "epoch/test_accuracy"))):  # fmt: skip
        acc = EventAccumulator(str(runs[name].dir / "tensorboard"))
        acc.Reload()
        for tag in tags:
            assert [e.step for e in acc.Scalars(tag)] == [1, 2], (name, tag)


def test_a_killed_mpl_run_resumes_bitwise(tmp_path):
    plan = SEMISUP[:1] + ["algorithm=mpl", "task.epochs=4", "train.checkpoint_every=7", "logger=none",
                          "progress=false", "threads=1"]  # fmt: skip
    whole, resumed = whole_and_resumed(tmp_path, plan)
    a, b = whole.metrics(), resumed.metrics()
    assert 0 < b["resumed_from_step"] < a["meta_steps"]
    skip = TIMING_KEYS | {"resumed_from_step", "seconds_per_epoch"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


@pytest.mark.parametrize("plan", [["experiment=mlc_cifar10"], ["experiment=mlc_cifar10", "algorithm=emlc"],
                                  ["experiment=mpl_cifar10_4k", "task.labels_per_class=2"]])  # fmt: skip
def test_the_cifar10_protocols_compose_and_run_two_steps_on_a_fixture(tmp_path, make_cifar10, plan):
    make_cifar10(tmp_path / "cifar")
    extra = [] if "experiment=mpl_cifar10_4k" in plan else ["task.meta_per_class=2"]
    run = run_script(tmp_path / "run", plan + extra + [f"task.data.root={tmp_path / 'cifar'}", "task.batch_size=40",
                                                       "task.epochs=1", "task.meta_batch_size=10", "logger=none",
                                                       "progress=false", "threads=1"])  # fmt: skip
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert metrics["train_rows"] == 80 and metrics["meta_rows"] == 20 and metrics["training_steps"] == 2
    assert metrics["outer_updates"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    config = (run.dir / ".hydra" / "config.yaml").read_text()
    assert "metaloss.models.CifarResNet" in config and "weight_decay: 0.0005" in config
    if "experiment=mlc_cifar10" in plan:  # symmetric noise, 50 % by default
        assert metrics["noise"] == {"type": "symmetric", "rate": 0.5, "pair_map": "cifar10"}
        assert ("GatedCorrector" in config) == ("algorithm=emlc" in plan)
    else:
        assert metrics["algorithm"] == "mpl" and metrics["labels_per_class"] == 2

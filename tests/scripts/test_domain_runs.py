"""scripts/meta_train.py on the domain-generalisation tasks, as a user runs them (rotated digits, a few
hundred steps): ERM, MLDG (second and first order), MAML over domains and Fish train the model on the
source domains and report, in metrics.json, the held-out domain's accuracy selected by training-domain
validation, each source domain's validation accuracy and the test-domain oracle apart; a killed run
resumes to the uninterrupted result; rotated Fashion-MNIST (official idx fixture; MLP and CNN) and the
MNIST-1D domains compose and run."""

from __future__ import annotations

import json

import pytest
import torch
from script_runner import TIMING_KEYS, run_all, run_script
from test_resume import whole_and_resumed

BASE = ["task=rotated_digits", "train.meta_steps=120", "train.validate_every=40", "progress=false", "threads=1",
        "logger=none"]  # fmt: skip
PLANS = {
    "erm": BASE + ["algorithm=erm"],
    "mldg": BASE + ["algorithm=mldg", "logger=tensorboard"],
    "mldg_first_order": BASE + ["algorithm=mldg", "hypergrad=first_order"],
    "maml_domains": BASE + ["algorithm=maml_domains", "task.adaptation.episodes=3"],
    "fish": BASE + ["algorithm=fish", "task.test_domain=0"],
    "learned_loss": BASE + ["algorithm=learned_loss_domains", "task.eval_steps=50"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("domains"), PLANS)


@pytest.mark.parametrize("name", list(PLANS))
def test_every_method_reports_the_held_out_domain_selected_by_training_domain_validation(runs, name):
    run = runs[name]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert run.last_stdout_json() == metrics and (run.dir / "checkpoint.pt").is_file()
    held = "0" if name == "fish" else "75"
    assert metrics["test_domain"] == held and held not in metrics["source_domains"]
    assert len(metrics["source_domains"]) == 5 and metrics["validations"] == 3
    assert all(0 <= metrics[f"val_accuracy/{d}"] <= 1 for d in metrics["source_domains"])
    history = json.loads((run.dir / "domain_validation.json").read_text())
    chosen = max(history, key=lambda h: h["val_accuracy"])
    assert history[-1]["step"] == 120 and metrics["final_test_accuracy"] == history[-1]["test_accuracy"]
    assert metrics["selected_step"] == chosen["step"] and metrics["test_accuracy"] == chosen["test_accuracy"]
    assert metrics["oracle_test_accuracy"] == max(history, key=lambda h: h["oracle_select_accuracy"])[
        "oracle_eval_accuracy"]  # fmt: skip
    # above chance (0.1) after 120 steps; the learned loss (residual ML3) trains a model for 50 steps
    assert metrics["val_accuracy"] > 0.3 and metrics["test_accuracy"] > 0.2
    assert metrics["saved_meta_objects"] == (["inner_loss.safetensors"] if name == "learned_loss" else [])
    assert metrics["episodes"] == {"erm": "erm", "fish": "fish"}.get(name, "mldg")


def test_the_final_model_is_scored_before_and_after_adapting_to_the_test_domain(runs):
    metrics = runs["maml_domains"].metrics()
    for kind in ("few_shot", "test_time"):
        before, after = metrics[f"{kind}_accuracy_before"], metrics[f"{kind}_accuracy"]
        assert 0 <= before <= 1 and 0 <= after <= 1 and before != after  # 10 SGD steps changed the model
    assert "few_shot_accuracy" not in runs["erm"].metrics()  # task.adaptation.episodes=0: none


def test_fine_tuning_is_plain_sgd_on_the_named_parameters():
    from domain_task import fine_tune, norm_parameter_names

    from metaloss.models import Conv4

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    w, b = params["weight"].clone(), params["bias"].clone()
    for _ in range(3):  # by hand: only the weight moves
        w = w.requires_grad_()
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x @ w.T + b, y), [w])
        w = (w - 0.5 * g).detach()
    tuned = fine_tune(model, params, ["weight"], x, y, torch.nn.functional.cross_entropy, 3, 0.5)
    torch.testing.assert_close(tuned["weight"], w)
    assert torch.equal(tuned["bias"], params["bias"]) and not torch.equal(params["weight"], w)  # input untouched
    names = norm_parameter_names(Conv4(3, filters=8, image_size=16, norm="group"))
    assert names == [f"features.{i}.{k}" for i in (1, 4, 7, 10) for k in ("weight", "bias")]


def test_a_folder_per_domain_image_set_runs(tmp_path, make_folder_domains):
    layout = {domain: {"dog": 12, "horse": 12} for domain in ("art_painting", "cartoon", "photo", "sketch")}
    root = make_folder_domains(tmp_path / "pacs", layout)
    run = run_script(tmp_path / "run", ["task=folder_domains", f"task.data.root={root}", "task.data.image_size=16",
                                        "task.n_way=2", "task.batch_size=4", "model.filters=8", "algorithm=mldg",
                                        "train.meta_steps=4", "train.validate_every=2", "task.adaptation.episodes=1",
                                        "task.adaptation.k_shot=1", "task.adaptation.q_query=1", "logger=none",
                                        "progress=false", "threads=1"])  # fmt: skip
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert metrics["test_domain"] == "sketch" and metrics["source_domains"] == ["art_painting", "cartoon", "photo"]
    assert 0 <= metrics["test_time_accuracy"] <= 1  # Tent: the GroupNorm layers adapted


def test_the_methods_train_different_models(runs):
    assert len({runs[name].metrics()["final_test_accuracy"] for name in PLANS}) >= 4


def test_tensorboard_has_the_per_domain_validation(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["mldg"].dir / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("meta_val/val_accuracy", "meta_val/test_accuracy", "meta_val/val_accuracy/0", "final/test_accuracy"):
        assert tag in scalars, tag


def test_a_killed_domain_run_resumes_to_the_same_result(tmp_path):
    plan = ["task=rotated_digits", "algorithm=mldg", "train.meta_steps=200", "train.validate_every=20",
            "train.checkpoint_every=30", "logger=none", "progress=false", "threads=1"]  # fmt: skip
    whole, resumed = whole_and_resumed(tmp_path, plan)
    a, b = whole.metrics(), resumed.metrics()
    assert 0 < b["resumed_from_step"] < 200
    skip = TIMING_KEYS | {"resumed_from_step", "step_seconds"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_rotated_fashion_mnist_and_mnist1d_domains_run(tmp_path, make_fashion_mnist_split):
    make_fashion_mnist_split(tmp_path, "train", 240, gz=True, seed=1)
    make_fashion_mnist_split(tmp_path, "t10k", 60, gz=True, seed=2)
    fashion = ["task=rotated_fashion_mnist", f"task.data.root={tmp_path}", "task.batch_size=8"]
    for plan in (fashion, fashion + ["model=cnn_28x28", "task.flatten=false"],
                 ["task=mnist1d_domains", "task.data.samples=60", "task.batch_size=8"]):  # fmt: skip
        short = ["algorithm=mldg", "train.meta_steps=4", "train.validate_every=2", "logger=none", "progress=false",
                 "threads=1"]  # fmt: skip
        run = run_script(tmp_path / "_".join(o.split("=")[-1] for o in plan[::3]), plan + short)
        assert run.returncode == 0, run.explain()
        metrics = run.metrics()
        assert metrics["validations"] == 2 and metrics["test_domain"] in ("75", "noisy")
        assert len(metrics["source_domains"]) == (5 if "rotated" in plan[0] else 4)

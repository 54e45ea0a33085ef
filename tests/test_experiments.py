"""Experiment overlays (configs/experiment/): each composes to its published or documented setting,
and runs two meta-steps end to end on a tiny fixture in the dataset's official format (sizes cut
down: meta-batch, queries and filters; the settings under test are asserted before the cut)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from metaloss.engine import meta_train

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# name -> (task, n_way, k_shot, inner lr, inner steps, meta-batch, meta-steps)
PUBLISHED = {
    "maml_miniimagenet_5way1shot": ("miniimagenet", 5, 1, 0.01, 5, 4, 60000),
    "maml_miniimagenet_5way5shot": ("miniimagenet", 5, 5, 0.01, 5, 4, 60000),
    "maml_omniglot_5way1shot": ("omniglot", 5, 1, 0.4, 1, 32, 60000),
    "maml_omniglot_20way1shot": ("omniglot", 20, 1, 0.1, 5, 16, 60000),
    "omniglot_minimal_5way": ("omniglot", 5, 1, 0.4, 1, 8, 2000),
    "omniglot_minimal_20way": ("omniglot", 20, 1, 0.1, 1, 8, 1800),
}
# not few-shot classification: tested on their own below, and in tests/scripts/test_noisy_label_runs.py
# (mwnet_cifar10) and tests/scripts/test_label_correction_runs.py (mlc_cifar10, mpl_cifar10_4k)
OTHER = ("ml3_shaped_sine", "mwnet_cifar10", "mlc_cifar10", "mpl_cifar10_4k")


@functools.cache
def load_common():
    spec = importlib.util.spec_from_file_location("metaloss_scripts_common_exp", REPO_ROOT / "scripts" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("meta_train", overrides=list(overrides))


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory, make_miniimagenet) -> dict[str, Path]:
    from conftest import write_omniglot_set  # the official-layout writer

    base = tmp_path_factory.mktemp("experiments")
    make_miniimagenet(base / "mini", n_classes=6, per_class=7)
    full = base / "omniglot_full"  # 20-way needs 20 characters in val (3 alphabets) and test
    write_omniglot_set(full, "images_background", {"Balinese": 7, "Early_Aramaic": 7, "Tagalog": 7, "Greek": 5}, 2)
    write_omniglot_set(full, "images_evaluation", {"Angelic": 10, "Atemayar_Qelisayer": 10}, 2)
    minimal = base / "omniglot_minimal"
    minimal_alphabets = {"Balinese": 20, "Early_Aramaic": 10, "Tagalog": 10, "Greek": 5}
    write_omniglot_set(minimal, "images_background_small1", minimal_alphabets, 2)
    write_omniglot_set(minimal, "images_background_small2", {"Greek": 5, "Korean": 3}, 2)
    return {"mini": base / "mini", "omniglot_full": full, "omniglot_minimal": minimal, "cache": base / "cache"}


def test_every_experiment_is_covered() -> None:
    assert EXPERIMENTS == sorted([*PUBLISHED, *OTHER])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_experiment_composes_to_its_setting_and_runs_two_meta_steps(name: str, data_roots) -> None:
    task, n_way, k_shot, inner_lr, inner_steps, meta_batch, meta_steps = PUBLISHED[name]
    cfg = compose_with(f"experiment={name}")
    assert cfg.task._target_.endswith(f"{task}_task")
    assert (cfg.task.n_way, cfg.task.k_shot) == (n_way, k_shot)
    assert cfg.inner_opt.lr == inner_lr and cfg.problem.inner_steps == inner_steps
    assert (cfg.train.meta_batch, cfg.train.meta_steps) == (meta_batch, meta_steps)
    assert cfg.model.n_classes == n_way  # the head follows the task

    if task == "miniimagenet":
        root = data_roots["mini"]
        assert cfg.model.filters == 32 and cfg.model.pool == "max"
    else:
        full = "background" in cfg.task.sets
        root = data_roots["omniglot_full" if full else "omniglot_minimal"]
        assert cfg.model.filters == 64 and cfg.model.pool == "stride" and cfg.task.rotations
    small = ["task.q_query=1", "model.filters=4", "train.meta_batch=2", f"task.root={root}"]
    if task == "omniglot":
        small.append(f"task.cache_dir={data_roots['cache']}")
    cfg = compose_with(f"experiment={name}", *small)
    built = load_common().build(cfg)
    before = [p.detach().clone() for p in built.problem.meta_parameters()]
    history = meta_train(
        built.problem, built.estimator, built.outer_opt, built.splits.train,
        meta_steps=2, meta_batch=cfg.train.meta_batch, progress=False,
    )  # fmt: skip
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert any(not torch.equal(p, b) for p, b in zip(built.problem.meta_parameters(), before))
    episode = built.splits.test.episode(0)
    assert int(episode.support_y.max()) + 1 == n_way


def test_ml3_shaped_sine_is_the_papers_greedy_setting_and_learns_only_the_loss() -> None:
    """ML3's shaped sine (Bechtle et al. 2021): sin(theta x) from theta_0 = 0.1, 64 points, 10 SGD
    steps at lr 1.0, the loss network updated by Adam 1e-3 after every single step (truncation 1)
    from (theta_{t+1} - theta*)^2, 4 tasks per iteration, 1,000 iterations."""
    from metaloss.hypergrad import EpisodicOnline
    from metaloss.models import ShapedSine

    cfg = compose_with("experiment=ml3_shaped_sine")
    assert cfg.task._target_.endswith("shaped_sine_task") and cfg.task.k_support == 64
    assert cfg.model.frequency_init == 0.1 and cfg.inner_opt.lr == 1.0 and cfg.problem.inner_steps == 10
    assert (cfg.hypergrad.kind, cfg.hypergrad.truncation, cfg.hypergrad["update"]) == ("tbptt", 1, "truncation")
    assert cfg.problem.meta_objective == "target_params"
    assert (cfg.outer_opt.lr, cfg.train.meta_batch, cfg.train.meta_steps) == (0.001, 4, 1000)
    built = load_common().build(compose_with("experiment=ml3_shaped_sine", "task.k_support=8", "task.k_query=8"))
    assert isinstance(built.problem.model, ShapedSine) and isinstance(built.estimator, EpisodicOnline)
    loss_params = list(built.problem.inner_loss.parameters())
    assert [id(p) for p in built.problem.meta_parameters()] == [id(p) for p in loss_params]  # only the loss
    before = [p.detach().clone() for p in loss_params]
    history = meta_train(built.problem, built.estimator, built.outer_opt, built.splits.train,
                         meta_steps=2, meta_batch=2, progress=False)  # fmt: skip
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all(not torch.equal(p, b) for p, b in zip(loss_params, before))


def test_mwnet_cifar10_is_mwnets_protocol() -> None:
    """Shu et al. 2019's CIFAR-10 setting (it runs two steps on a fixture in tests/scripts/test_noisy_label_runs.py)."""
    cfg = compose_with("experiment=mwnet_cifar10")
    assert cfg.task._target_ == "tasks.noisy_label.noisy_label_task"
    assert cfg.task.data._target_ == "tasks.datasets.cifar.cifar10_data"
    assert cfg.task.noise.type == "uniform" and cfg.task.noise.rate == 0.4
    assert cfg.task.meta_per_class * cfg.task.n_way == 1000 and cfg.task.batch_size == 100
    assert cfg.model._target_ == "metaloss.models.CifarResNet" and cfg.model.blocks_per_stage == 5
    assert (cfg.inner_opt.name, cfg.inner_opt.lr, cfg.inner_opt.momentum, cfg.inner_opt.weight_decay) == (
        "sgd", 0.1, 0.9, 0.0005)
    assert cfg.inner_loss.weighter._target_ == "metaloss.meta.weighting.LossToWeight"
    assert list(cfg.inner_loss.weighter.hidden) == [100]
    assert cfg.outer_opt.lr == 0.001 and cfg.outer_opt.weight_decay == 0.0001
    assert cfg.hypergrad.kind == "tbptt" and cfg.hypergrad.truncation == 1

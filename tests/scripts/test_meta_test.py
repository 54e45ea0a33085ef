"""scripts/meta_test.py end to end: evaluates meta_train.py checkpoints on fixed episodes."""

from __future__ import annotations

import pytest
from script_runner import META_TEST, REPO_ROOT, TIMING_KEYS, TINY, Run, run_all, run_script

MT = ["progress=false", "threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_miniimagenet, make_omniglot, make_lake_runs) -> dict:
    """A sinusoid, a 5-way mini-ImageNet and a 3-way Omniglot checkpoint, trained for a few steps;
    one-shot runs of 3 classes in the layout of the official all_runs.zip."""
    base = tmp_path_factory.mktemp("meta_test_ckpt")
    mini = base / "mini-data"
    make_miniimagenet(mini, n_classes=6, per_class=3)
    omniglot, lake = make_omniglot(base / "omniglot"), base / "lake"
    make_lake_runs(lake, n_runs=2, n_classes=3)
    plans = {
        "sinusoid": TINY + ["logger=none", "baseline.enabled=false"],
        "mini": TINY
        + ["logger=none", "baseline.enabled=false", "task=miniimagenet", f"task.root={mini}", "task.q_query=1"]
        + ["model.filters=4", "train.meta_steps=2", "test.num_tasks=2", "test.steps=[0,1]"],
        "omniglot": TINY
        + ["logger=none", "baseline.enabled=false", "task=omniglot", f"task.root={omniglot}", "task.n_way=3"]
        + [f"task.cache_dir={base / 'cache'}", "task.q_query=1", "model.filters=4", "test.num_tasks=2"],
        # a final run on every alphabet (no test split), validated on half of every alphabet's characters
        "omniglot_every_alphabet": TINY
        + ["logger=none", "baseline.enabled=false", "task=omniglot", f"task.root={omniglot}", "task.n_way=3"]
        + [f"task.cache_dir={base / 'cache'}", "task.q_query=1", "model.filters=4", "task.test_alphabets=[]"]
        + ["task.val_alphabets=[]", "task.val_characters=0.5"],
        # MAML++'s per-step BatchNorm pairs and learned per-layer per-step rates on the max-pool Conv-4
        "omniglot_per_step": TINY
        + ["logger=none", "baseline.enabled=false", "task=omniglot", f"task.root={omniglot}", "task.n_way=3"]
        + [f"task.cache_dir={base / 'cache'}", "task.q_query=1", "model.filters=4", "test.num_tasks=2"]
        + ["model.pool=max", "model.global_pool=false", "model.norm=batch_per_step", "inner_opt=lslr"],
    }
    runs = run_all(base, plans)
    for run in runs.values():
        assert run.returncode == 0, run.explain()
    return {"runs": runs, "mini": mini, "lake": lake, "base": base}


@pytest.fixture(scope="module")
def evaluations(trained) -> dict[str, Run]:
    sin = trained["runs"]["sinusoid"].dir / "checkpoint.pt"
    mini = trained["runs"]["mini"].dir / "checkpoint.pt"
    omniglot = trained["runs"]["omniglot"].dir / "checkpoint.pt"
    plans = {
        "sinusoid": MT + [f"checkpoint={sin}", "test.num_tasks=7", "test.steps=[0,2]"],
        "sinusoid_again": MT + [f"checkpoint={sin}", "test.num_tasks=7", "test.steps=[0,2]"],
        "mini": MT + [f"checkpoint={mini}", "test.num_tasks=3"],
        "lake": MT
        + [f"checkpoint={omniglot}", "task=omniglot_lake", f"task.root={trained['lake']}", "task.n_way=3"]
        + ["test.steps=[0,10]"],
        "lake_every_alphabet": MT
        + [f"checkpoint={trained['runs']['omniglot_every_alphabet'].dir / 'checkpoint.pt'}", "task=omniglot_lake"]
        + [f"task.root={trained['lake']}", "task.n_way=3", "test.steps=[0,10]"],
        "lake_per_step": MT
        + [f"checkpoint={trained['runs']['omniglot_per_step'].dir / 'checkpoint.pt'}", "task=omniglot_lake"]
        + [f"task.root={trained['lake']}", "task.n_way=3", "test.steps=[0,1,10]"],
        # the max-pool Conv-4 without global pooling has a head for 28 x 28 inputs only
        "lake_other_image_size": MT
        + [f"checkpoint={trained['runs']['omniglot_per_step'].dir / 'checkpoint.pt'}", "task=omniglot_lake"]
        + [f"task.root={trained['lake']}", "task.n_way=3", "task.image_size=42"],
        "missing": MT + [f"checkpoint={trained['base']}/nope.pt"],
        "not_a_checkpoint": MT + [f"checkpoint={trained['mini']}/mini-imagenet-cache-test.pkl"],
        "wrong_way": MT
        + [f"checkpoint={mini}", "task=miniimagenet", f"task.root={trained['mini']}", "task.n_way=3", "task.q_query=1"],
    }
    return run_all(trained["base"] / "evaluations", plans, script=META_TEST)


def test_a_run_on_every_alphabet_has_no_meta_test_and_is_tested_on_the_lake_runs(trained, evaluations) -> None:
    metrics = trained["runs"]["omniglot_every_alphabet"].metrics()
    assert metrics["test_tasks"] == 0 and not any(k.startswith("meta/") for k in metrics)
    lake = evaluations["lake_every_alphabet"]
    assert lake.returncode == 0, lake.explain()
    assert 0 <= lake.metrics()["error_percent_step10"] <= 100


def test_a_per_step_batchnorm_checkpoint_keeps_its_pairs_and_adapts_past_them(trained, evaluations) -> None:
    import torch

    checkpoint = torch.load(trained["runs"]["omniglot_per_step"].dir / "checkpoint.pt", weights_only=False)
    init = checkpoint["meta"]["init"]
    assert init["model.features.1.weight"].shape == (2, 4)  # norm_steps pairs of the 4 filters
    run = evaluations["lake_per_step"]
    assert run.returncode == 0, run.explain()
    assert {"error_percent_step0", "error_percent_step1", "error_percent_step10"} <= set(run.metrics())


def test_reports_each_step_with_a_confidence_interval(evaluations) -> None:
    run = evaluations["sinusoid"]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert run.last_stdout_json() == metrics
    assert metrics["task"] == "sinusoid" and metrics["test_tasks"] == 7
    assert {"loss_step0", "loss_step0_ci95", "loss_step2", "loss_step2_ci95"} <= set(metrics)


def test_two_evaluations_see_the_same_tasks(evaluations) -> None:
    a, b = evaluations["sinusoid"].metrics(), evaluations["sinusoid_again"].metrics()
    assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {k: v for k, v in b.items() if k not in TIMING_KEYS}


def test_classification_reports_accuracy_and_error_percent(evaluations) -> None:
    run = evaluations["mini"]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    for t in (0, 1):  # the checkpoint's own test.steps
        assert 0.0 <= metrics[f"accuracy_step{t}"] <= 1.0
        assert metrics[f"error_percent_step{t}"] == pytest.approx(100 * (1 - metrics[f"accuracy_step{t}"]))


def test_lake_one_shot_runs_report_the_error_rate_over_all_runs(evaluations) -> None:
    run = evaluations["lake"]
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert metrics["task"] == "omniglot_lake" and metrics["test_tasks"] == 2  # capped at the number of runs
    for t in (0, 10):
        assert metrics[f"error_percent_step{t}"] == pytest.approx(100 * (1 - metrics[f"accuracy_step{t}"]))
        # 2 runs of 3 queries: accuracy is a multiple of 1/6
        assert round(metrics[f"accuracy_step{t}"] * 6, 6).is_integer()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("missing", "checkpoint not found"),
        ("not_a_checkpoint", "is not a readable checkpoint"),
        ("wrong_way", "has 5 outputs but the task is 3-way"),
        ("lake_other_image_size", "trained on task.image_size=28: set task.image_size=28"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(evaluations, name: str, fragment: str) -> None:
    run = evaluations[name]
    assert run.returncode == 2, run.explain()
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and fragment in last, run.explain()
    assert not run.metrics_file.exists()


def test_a_missing_checkpoint_argument_is_an_error(tmp_path) -> None:
    run = run_script(tmp_path / "run", MT, script=META_TEST)
    assert run.returncode != 0 and "checkpoint" in run.stderr


CHECKPOINTS = REPO_ROOT / "benchmarks" / "checkpoints"
REAL_OMNIGLOT = (REPO_ROOT / ".." / "shared" / "data" / "omniglot").resolve()
# the kept 20-way checkpoints and the within-alphabet error (%) each stays under on 20 episodes of
# Early_Aramaic after 10 steps: recorded 8.5 ± 0.9 and 4.1 ± 0.6 (50 episodes; an alphabet the
# all-alphabet runs trained on) and 27.8 ± 0.5 (300 episodes; held out of the strided run); chance is 95
KEPT_CHECKPOINTS = {"omniglot_minimal_all_20way_maml_maxpool.pt": 15.0,
                    "omniglot_minimal_all_20way_maml_maxpool_protohead.pt": 10.0,
                    "omniglot_minimal_20way_maml.pt": 35.0}  # fmt: skip


@pytest.mark.skipif(not (REAL_OMNIGLOT / "images_background_small1.zip").is_file(),
                    reason=f"the Omniglot minimal sets are not in {REAL_OMNIGLOT}")  # fmt: skip
def test_the_kept_checkpoints_still_classify_real_omniglot(tmp_path) -> None:
    """benchmarks/checkpoints/ against today's code: each loads in meta_test.py and adapts on real
    within-alphabet 20-way episodes of Early_Aramaic with the error recorded for it (a change of the
    model, its BatchNorm policy or the image decoding that breaks them shows as chance-level error)."""
    assert {p.name for p in CHECKPOINTS.glob("omniglot_*.pt")} >= set(KEPT_CHECKPOINTS)
    task = ["task=omniglot", f"task.root={REAL_OMNIGLOT}", "task.sets=[background_small1]", "task.n_way=20",
            "task.q_query=5", "task.within_alphabet=true", "task.train_alphabets=[Greek,Korean,Latin]",
            "task.val_alphabets=[Balinese]", "task.test_alphabets=[Early_Aramaic]",
            f"task.cache_dir={tmp_path / 'cache'}", "test.num_tasks=20", "test.steps=[10]"]  # fmt: skip
    plans = {name: MT + [f"checkpoint={CHECKPOINTS / name}", *task] for name in KEPT_CHECKPOINTS}
    runs = run_all(tmp_path, plans, script=META_TEST)
    for name, limit in KEPT_CHECKPOINTS.items():
        assert runs[name].returncode == 0, runs[name].explain()
        error = runs[name].metrics()["error_percent_step10"]
        assert error < limit, f"{name}: {error:.1f} % within-alphabet error, recorded under {limit} %"

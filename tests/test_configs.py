"""Every option of every config group composes with meta_train.yaml, and its node instantiates."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metaloss.errors import ConfigError, DataNotFoundError
from metaloss.hypergrad import AntitheticES, CheckpointedUnrolled, EpisodicOnline, Implicit, Reptile, Unrolled
from metaloss.inner.optim import InnerOptimizer
from metaloss.logging import NullLogger, TensorBoardLogger
from metaloss.meta import HyperparameterOptimizer, MetaSGD, MLPUpdateRule, PerStepSGD, WarpPreconditioner
from metaloss.meta.weighting import AssignGradient
from metaloss.models import MLP, CifarResNet, Conv4, ResNet12, ShapedSine
from tasks.base import TaskSplits
from tasks.domain_shift import DomainTask
from tasks.noisy_label import NoisyLabelTask

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
GROUPS = ("task", "model", "algorithm", "init", "inner_loss", "inner_opt", "hypergrad", "outer_opt", "logger")
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONFIG_DIR / group).glob("*.yaml"))]
TASK_OF_MODEL = {  # models sized by task.n_way
    "conv4": "miniimagenet",
    "resnet12": "miniimagenet",
    "conv4_cifar": "cifar_fs",
    "resnet32": "cifar_fs",
    "conv4_omniglot": "omniglot",
    "cnn_28x28": "rotated_fashion_mnist",
    "mlp_28x28": "rotated_fashion_mnist",
}
CIFAR_TASKS = ("cifar_fs", "fc100")


@functools.cache
def load_common():
    """scripts/common.py, which is not a package module."""
    import common  # scripts/ is on sys.path (tests/conftest.py)

    return common


def compose_with(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("meta_train", overrides=list(overrides))


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory, make_cifar10):
    """A tiny CIFAR-10 (10 images per class) for task=noisy_cifar10."""
    return make_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory, make_cifar100):
    """A tiny CIFAR-100 (2 images per class) for the CIFAR-FS and FC100 tasks."""
    root = tmp_path_factory.mktemp("cifar100")
    make_cifar100(root)
    return root


@pytest.fixture(scope="module")
def folder_domains_overrides(tmp_path_factory, make_folder_domains) -> list[str]:
    """Overrides pointing task=folder_domains at a tiny PACS-layout fixture (4 domains, 2 classes)."""
    layout = {domain: {"dog": 12, "horse": 12} for domain in ("art_painting", "cartoon", "photo", "sketch")}
    root = make_folder_domains(tmp_path_factory.mktemp("pacs"), layout)
    return [f"task.data.root={root}", "task.data.image_size=16", "task.n_way=2", "model.filters=8"]


@pytest.fixture(scope="module")
def omniglot_overrides(tmp_path_factory, make_omniglot, make_lake_runs) -> dict[str, list[str]]:
    """Overrides pointing the Omniglot tasks at tiny fixtures (minimal sets; 2 one-shot runs of 4 classes)."""
    root = tmp_path_factory.mktemp("omniglot")
    sets, lake, cache = make_omniglot(root / "sets"), root / "lake", root / "cache"
    make_lake_runs(lake)
    return {
        "omniglot": [f"task.root={sets}", f"task.cache_dir={cache}", "task.n_way=3", "task.q_query=2"],
        "omniglot_lake": [f"task.root={lake}", "task.n_way=4"],
    }


TRAIN_GROUPS = ("data", "loss")  # scripts/train.py's groups (configs/train.yaml)


def test_every_group_directory_is_covered():
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    # experiments: tests/test_experiments.py; hydra/launcher: the SLURM launcher (below)
    assert groups == set(GROUPS) | set(TRAIN_GROUPS) | {"experiment", "hydra"}
    assert all(any(g == group for g, _ in OPTIONS) for group in GROUPS)


@pytest.mark.parametrize(
    ("group", "option"), [(g, p.stem) for g in TRAIN_GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]
)
def test_every_train_option_composes(group, option):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={option}"])
    assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(
        OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
    )


def test_defaults():
    cfg = compose_with()
    assert cfg.task._target_ == "tasks.synthetic.sinusoid_task"
    assert cfg.model._target_ == "metaloss.models.MLP"
    assert cfg.inner_opt.name == "sgd" and cfg.inner_opt._target_ == "metaloss.meta.HyperparameterOptimizer"
    assert cfg.hypergrad.mode == "full"
    assert cfg.outer_opt._target_ == "torch.optim.Adam"
    assert cfg.logger._target_ == "metaloss.logging.TensorBoardLogger"
    assert cfg.problem.adapt is None and cfg.problem.inner_steps == 1
    assert cfg.task.seed == cfg.seed == 0  # the task follows the global seed


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    # L2RW's weights are sized by a noisy-label task's minibatch, and the correctors and teachers by its
    # classes and inputs: they compose with one
    sized_by_task = ("l2rw", "mlc", "emlc", "transition")
    noisy = ["task=noisy_digits"] if option in sized_by_task and group in ("algorithm", "inner_loss") else []
    if option in DOMAIN_ALGORITHMS and group == "algorithm":
        noisy = ["task=rotated_digits"]
    if option in ("mpl", "mpl_exact", "pseudo_label") and group in ("algorithm", "inner_loss"):
        noisy = ["task=semisup_digits"]
    if group == "model" and option in TASK_OF_MODEL:
        noisy = [f"task={TASK_OF_MODEL[option]}"]
    cfg = compose_with(f"{group}={option}", *noisy)
    raw = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
    if "_target_" in raw:  # a plain group node: it lands at cfg[group] unchanged
        assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(raw)
    # everything but the Hydra-runtime interpolation of the logger (and conv4's task.n_way) resolves
    skip = {"logger"}
    if cfg.model._target_ != "metaloss.models.MLP" and "n_way" not in cfg.task:
        skip.add("model")
    OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in skip]), resolve=True)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "hypergrad"])
def test_hypergrad_instantiates(option):
    estimator = instantiate(compose_with(f"hypergrad={option}").hypergrad)
    if option.startswith("implicit_"):
        assert isinstance(estimator, Implicit) and estimator.solver == option.removeprefix("implicit_")
        return
    if option == "es":
        assert isinstance(estimator, AntitheticES) and estimator.particles >= 1
        return
    if option in ("tbptt", "pes", "es_single"):
        assert isinstance(estimator, EpisodicOnline) and estimator.kind == option
        return
    if option == "checkpointed":
        assert isinstance(estimator, CheckpointedUnrolled) and estimator.segment is None
        return
    if option == "reptile":
        assert isinstance(estimator, Reptile)
        return
    assert isinstance(estimator, Unrolled)
    assert estimator.mode == {"unrolled": "full"}.get(option, option)
    assert (estimator.truncation is not None) == (option == "truncated")


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "inner_opt"])
def test_inner_opt_instantiates_and_takes_a_first_step_of_its_lr(option):
    cfg = compose_with(f"inner_opt={option}")
    model = MLP(1, [4], 1)
    module = load_common().instantiate_for(model, cfg.inner_opt)
    kinds = {"metasgd": MetaSGD, "warp": WarpPreconditioner, "mlp_update_rule": MLPUpdateRule, "lslr": PerStepSGD}
    assert isinstance(module, kinds.get(option, HyperparameterOptimizer))
    opt = module()
    assert isinstance(opt, InnerOptimizer)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: torch.full_like(p, 0.5) for name, p in params.items()}
    new, _ = opt.update(grads, opt.init(params), params)
    for name, p in params.items():
        if option == "mlp_update_rule":  # a random MLP's first step: small (step_mult) and finite
            step = p - new[name]
            assert torch.isfinite(step).all() and 0 < step.abs().max() < 10 * cfg.inner_opt.step_mult
            continue
        # first step of SGD / momentum / Meta-SGD / warp at identity: lr * g; of Adam: lr * g / |g| (bias-corrected)
        step = cfg.inner_opt.lr * (1.0 if option == "adam" else 0.5)
        torch.testing.assert_close(p - new[name], torch.full_like(p, step), rtol=1e-4, atol=1e-7)


def test_metasgd_learns_one_rate_per_parameter_element():
    model = MLP(1, [4], 1)
    module = instantiate(compose_with("inner_opt=metasgd").inner_opt, model=model)
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "model"])
def test_model_instantiates_and_runs(option):
    # conv4 takes n_classes from task.n_way, so it is composed with the task that defines it
    overrides = [f"task={TASK_OF_MODEL[option]}", f"model={option}"] if option in TASK_OF_MODEL else [f"model={option}"]
    cfg = compose_with(*overrides)
    model = instantiate(cfg.model)
    if option in TASK_OF_MODEL and option != "mlp_28x28":
        assert isinstance(model, (Conv4, ResNet12, CifarResNet))
        size = cfg.model.get("image_size", 32 if option == "resnet32" else 84)
        out = model(torch.rand(2, cfg.model.in_channels, size, size))
        assert out.shape == (2, cfg.task.n_way)
    elif option == "shaped_sine":  # ML3's one-parameter sin(theta x): no head to adapt on its own
        assert isinstance(model, ShapedSine) and model.frequency.item() == pytest.approx(cfg.model.frequency_init)
        assert model(torch.rand(3, 1)).shape == (3, 1)
        return
    else:
        assert isinstance(model, MLP)
        assert model(torch.rand(3, cfg.model.in_features)).shape == (3, cfg.model.out_features)
    assert any(name.startswith("head.") for name, _ in model.named_parameters())  # what ANIL adapts


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "outer_opt"])
def test_outer_opt_instantiates(option):
    cfg = compose_with(f"outer_opt={option}")
    param = torch.nn.Parameter(torch.zeros(3))
    opt = instantiate(cfg.outer_opt)([param])
    param.grad = torch.ones(3)
    opt.step()
    if option == "assign_gradient":  # L2RW's: phi holds the meta-gradient
        assert isinstance(opt, AssignGradient) and torch.equal(param.detach(), torch.ones(3))
        return
    assert isinstance(opt, {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[option])
    assert opt.param_groups[0]["lr"] == cfg.outer_opt.lr
    assert (param < 0).all()


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "logger"])
def test_logger_instantiates(option, tmp_path):
    cfg = compose_with(f"logger={option}")
    if option == "tensorboard":
        # its log_dir lives in the Hydra run directory, known only inside a Hydra run
        assert OmegaConf.to_container(cfg.logger)["log_dir"] == "${hydra:runtime.output_dir}/tensorboard"
        logger = instantiate(cfg.logger, log_dir=str(tmp_path))
        assert isinstance(logger, TensorBoardLogger)
    else:
        logger = instantiate(cfg.logger)
        assert isinstance(logger, NullLogger)
    logger.log(0, {"loss": 1.0}, prefix="test/")
    logger.close()
    assert bool(list(tmp_path.glob("events.out.tfevents.*"))) == (option == "tensorboard")


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "task"])
def test_task_instantiates(option, mini_root, cifar_root, cifar10_root, omniglot_overrides,
                           folder_domains_overrides):  # fmt: skip
    data = [f"task.root={mini_root}", "task.q_query=2"] if option == "miniimagenet" else []
    if option == "noisy_cifar10":
        data = [f"task.data.root={cifar10_root}", "task.meta_per_class=2", "task.batch_size=20"]
    if option == "semisup_cifar10":
        data = [f"task.data.root={cifar10_root}", "task.labels_per_class=2", "task.batch_size=20"]
    if option in CIFAR_TASKS:
        data = [f"task.root={cifar_root}", "task.q_query=1"]
    data = omniglot_overrides.get(option, data)
    data = folder_domains_overrides if option == "folder_domains" else data
    cfg = compose_with(f"task={option}", "seed=7", *data)
    assert cfg.task.get("seed", 7) == 7  # the one-shot runs are fixed: no seed
    if option in DOMAIN_TASKS:  # domain generalisation: source-domain episodes, whole-domain evaluation
        extra = ["task.data.limit=600"] if option == "rotated_fashion_mnist" else []
        extra += ["task.data.samples=100"] if option == "mnist1d_domains" else []
        task = instantiate(compose_with(f"task={option}", "seed=7", *data, *extra).task)
        assert isinstance(task, DomainTask) and task.split.test_domain not in task.split.sources
        episode = task.train.episode(0)
        if option == "folder_domains":  # RGB images for a Conv-4
            assert episode.support_x.shape[1:] == (3, 16, 16) and task.split.data.n_classes == cfg.model.n_classes
            return
        assert episode.support_x.shape[1] == cfg.model.in_features
        assert task.split.data.n_classes == cfg.model.out_features
        return
    if option.startswith(("noisy_", "semisup_")):  # a training run of the online regime, not episodes
        task = instantiate(cfg.task)
        assert isinstance(task, NoisyLabelTask) and task.loss == "cross_entropy" and task.horizon > 0
        assert task.data.unlabelled == option.startswith("semisup_")
        if option.endswith("cifar10"):  # images: a CIFAR ResNet
            assert cfg.model._target_ == "metaloss.models.CifarResNet" and cfg.model.n_classes == task.data.n_classes
            return
        assert cfg.model.in_features == task.data.in_features and cfg.model.out_features == task.data.n_classes
        return
    splits = instantiate(cfg.task)
    assert isinstance(splits, TaskSplits)
    assert splits.loss == {"sinusoid": "mse", "shaped_sine": "mse"}.get(option, "cross_entropy")
    episode = (splits.test if splits.train is None else splits.train).episode(0)
    assert len(episode.support_x) == len(episode.support_y) > 0


def test_task_selects_its_model():
    assert compose_with("task=miniimagenet").model._target_ == "metaloss.models.Conv4"
    assert compose_with("task=sinusoid").model._target_ == "metaloss.models.MLP"
    cfg = compose_with("task=miniimagenet", "task.n_way=3")
    assert cfg.model.n_classes == 3
    for option in CIFAR_TASKS:
        cfg = compose_with(f"task={option}", "task.n_way=4")
        assert cfg.model._target_ == "metaloss.models.Conv4" and cfg.model.image_size == 32
        assert cfg.model.n_classes == 4


def test_miniimagenet_default_root_missing_reports_the_key(tmp_path):
    cfg = compose_with("task=miniimagenet", f"task.root={tmp_path / 'nowhere'}")
    with pytest.raises(Exception) as info:  # Hydra's instantiate may wrap the error
        instantiate(cfg.task)
    cause = info.value
    while cause is not None and not isinstance(cause, DataNotFoundError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None and "task.root" in str(cause)


def test_algorithm_anil_adapts_the_head_only():
    assert list(compose_with("algorithm=anil").problem.adapt) == ["head"]
    assert compose_with("algorithm=maml").problem.adapt is None


def test_algorithm_maml_is_the_default_full_unrolled_sgd():
    cfg = compose_with("algorithm=maml")
    assert cfg.hypergrad.mode == "full" and cfg.inner_opt.name == "sgd"
    assert cfg == compose_with()


def test_algorithm_fomaml_selects_first_order():
    cfg = compose_with("algorithm=fomaml")
    assert cfg.hypergrad.mode == "first_order"
    assert isinstance(instantiate(cfg.hypergrad), Unrolled)


def test_algorithm_imaml_is_a_proximal_inner_loss_with_an_implicit_gradient():
    cfg = compose_with("algorithm=imaml")
    assert cfg.hypergrad.solver == "cg" and cfg.problem.inner_regularizer._target_ == "metaloss.meta.Proximal"
    assert compose_with().problem.inner_regularizer is None


def test_algorithm_metasgd_selects_metasgd():
    cfg = compose_with("algorithm=metasgd")
    assert cfg.inner_opt._target_ == "metaloss.meta.MetaSGD"


@pytest.mark.parametrize("order", ["hypergrad-first", "algorithm-first"])
def test_command_line_hypergrad_wins_over_the_algorithm(order):
    overrides = ["hypergrad=truncated", "algorithm=fomaml"]
    cfg = compose_with(*(overrides if order == "hypergrad-first" else overrides[::-1]))
    assert cfg.hypergrad.mode == "truncated" and cfg.hypergrad.truncation == 1


def test_command_line_inner_opt_wins_over_metasgd():
    assert compose_with("algorithm=metasgd", "inner_opt=adam").inner_opt.name == "adam"


def test_algorithm_overlays_leave_the_task_alone():
    for option in [o for g, o in OPTIONS if g == "algorithm"]:
        cfg = compose_with("task=miniimagenet", f"algorithm={option}")
        assert cfg.task._target_ == "tasks.datasets.miniimagenet.miniimagenet_task"
        assert cfg.model._target_ == "metaloss.models.Conv4"


DOMAIN_TASKS = ("rotated_fashion_mnist", "rotated_digits", "mnist1d_domains", "folder_domains")
DOMAIN_ALGORITHMS = ("erm", "mldg", "maml_domains", "fish", "learned_loss_domains")
NOISY_BASELINES = {"cross_entropy", "clean_only", "gce", "sce", "nce_rce", "poly1"}
NOISY_ALGORITHMS = NOISY_BASELINES | {"mwnet", "l2rw", "ml3_online", "storm", "mlc", "emlc", "transition"}
SEMISUP_ALGORITHMS = {"mpl", "mpl_exact", "pseudo_label"}


@pytest.mark.parametrize(("group", "option"), [o for o in OPTIONS if o[0] != "logger"], ids=lambda v: str(v))
def test_every_option_builds_a_whole_problem(group, option, mini_root, cifar_root, cifar10_root,
                                            omniglot_overrides, folder_domains_overrides):  # fmt: skip
    """scripts/common.build on the composed config: task, model, inner_opt, hypergrad and outer_opt together."""
    overrides = [f"{group}={option}"]
    if (group, option) in {("task", "miniimagenet"), ("model", "conv4")}:
        overrides += ["task=miniimagenet", f"task.root={mini_root}", "task.q_query=2", "model.filters=4"]
    if (group, option) == ("model", "resnet12"):
        overrides += ["task=miniimagenet", f"task.root={mini_root}", "task.q_query=2", "model.widths=[2,2,2,2]"]
    if (group, option) == ("task", "noisy_cifar10"):
        overrides += [f"task.data.root={cifar10_root}", "task.meta_per_class=2", "task.batch_size=20"]
    if (group, option) == ("model", "resnet32"):
        overrides += ["task=cifar_fs", f"task.root={cifar_root}", "task.q_query=1", "model.blocks_per_stage=1"]
    if (group, option) in {("task", "cifar_fs"), ("task", "fc100"), ("model", "conv4_cifar")}:
        task = option if group == "task" else "cifar_fs"
        overrides += [f"task={task}", f"task.root={cifar_root}", "task.q_query=1", "model.filters=4"]
    if (group, option) in {("task", "omniglot"), ("task", "omniglot_lake"), ("model", "conv4_omniglot")}:
        task = option if group == "task" else "omniglot"
        overrides += [f"task={task}", *omniglot_overrides[task], "model.filters=4"]
    if (group, option) in {("init", "fixed"), ("init", "random")}:  # phi must live elsewhere
        overrides += ["inner_loss=ml3_regression"]
    if (group, option) in {("algorithm", "npbml"), ("algorithm", "npbml_loss"), ("inner_loss", "npbml")}:
        overrides += ["task=blobs"]  # NPBML's loss takes its number of classes from task.n_way
    if group == "task" and option.startswith("noisy_"):
        overrides += ["algorithm=mwnet"]
    if (group, option) == ("task", "semisup_cifar10"):
        overrides += [f"task.data.root={cifar10_root}", "task.labels_per_class=2", "task.batch_size=20"]
    if (group == "algorithm" and option in NOISY_ALGORITHMS) or (group, option) in {
            ("inner_loss", "l2rw"), ("inner_loss", "mlc"), ("inner_loss", "emlc"),
            ("inner_loss", "transition")}:  # fmt: skip
        overrides += ["task=noisy_digits"]  # the noisy-label methods and baselines
    if (group == "algorithm" and option in SEMISUP_ALGORITHMS) or (group, option) == ("inner_loss", "mpl"):
        overrides += ["task=semisup_digits"]
    if (group == "algorithm" and option in DOMAIN_ALGORITHMS) or (group, option) == ("hypergrad", "reptile"):
        overrides += ["task=rotated_digits"] + (["algorithm=fish"] if group == "hypergrad" else [])
    if group == "task" and option in DOMAIN_TASKS:
        overrides += {"rotated_fashion_mnist": ["task.data.limit=600"], "mnist1d_domains": ["task.data.samples=100"],
                      "folder_domains": folder_domains_overrides}.get(option, [])  # fmt: skip
    if group == "model" and option in ("mlp_28x28", "cnn_28x28"):
        flat = "true" if option == "mlp_28x28" else "false"
        overrides += ["task=rotated_fashion_mnist", "task.data.limit=600", f"task.flatten={flat}"]
    built = load_common().build(compose_with(*overrides))
    if group == "algorithm" and option in NOISY_BASELINES:  # nothing is meta-learned: no outer optimizer
        assert not built.problem.meta_parameters() and built.outer_opt is None
        return
    assert built.problem.meta_parameters()
    assert len(built.outer_opt.param_groups[0]["params"]) == len(built.problem.meta_parameters())


def test_online_estimators_take_a_truncation_schedule_and_an_update_interval():
    cfg = compose_with("hypergrad=pes", "hypergrad.truncation=[1,2,4]", "hypergrad.update=truncation")
    estimator = instantiate(cfg.hypergrad)
    assert isinstance(estimator, EpisodicOnline) and estimator.update == "truncation"
    assert estimator.make(0).lengths == (1, 2, 4)
    assert instantiate(compose_with("hypergrad=es_single", "hypergrad.update=3").hypergrad).update == 3
    with pytest.raises(Exception) as info:  # Hydra's instantiate may wrap the error
        instantiate(compose_with("hypergrad=es_single", "hypergrad.truncation=[2,0]").hypergrad)
    cause = info.value
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__ or cause.__context__
    assert cause is not None and "truncation must be" in str(cause)


def test_the_slurm_launcher_config_composes_with_submitit():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("meta_train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 2, 2)
    assert cfg.distributed.backend == "auto"

"""Meta-train a bilevel problem and meta-test it beside a pretrained baseline.

    python scripts/meta_train.py                       # MAML on sinusoid K=10
    python scripts/meta_train.py algorithm=anil hypergrad=truncated train.meta_steps=100
    python scripts/meta_train.py task=noisy_fashion_mnist algorithm=mwnet task.noise.rate=0.6   # online regime

Writes TensorBoard events, checkpoint.pt and metrics.json into the Hydra run directory;
the last stdout line is the metrics JSON.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RunDirectory,
    build,
    build_problem,
    config_errors,
    dtype_of,
    exit_after_sweep,
    finish,
    one_job,
    output_errors,
    precheck,
    start_job,
)
from domain_task import DomainRun  # noqa: E402
from online_task import OnlineTaskRun, save_transition_plot, save_weight_histogram  # noqa: E402
from settings import validate_meta_train  # noqa: E402

from metaloss.baselines import train_jointly  # noqa: E402
from metaloss.distributed import Distributed, init_distributed  # noqa: E402
from metaloss.engine import MetaTrainer, evaluate  # noqa: E402
from metaloss.errors import ConfigError  # noqa: E402
from metaloss.io import FAMILIES, save_meta_object  # noqa: E402
from metaloss.logging import NullLogger, TensorBoardLogger  # noqa: E402
from metaloss.losses import get_loss  # noqa: E402
from metaloss.plots import loss_figure, save_loss_plot  # noqa: E402


@hydra.main(config_path="../configs", config_name="meta_train", version_base="1.3")
@one_job
def main(cfg: DictConfig) -> None:
    started = time.time()
    settings, run_dir = start_job(cfg, validate_meta_train)
    with config_errors():
        dist = init_distributed(settings.distributed.backend, settings.device, settings.distributed.timeout_s)
    main_dir = Path(dist.broadcast(str(run_dir)))  # ranks > 0 write nothing: rank 0's directory is the run's
    if main_dir != run_dir:  # the directory Hydra made for this rank (a default name differs per process)
        left = list(run_dir.iterdir())
        if all(f.suffix == ".log" and f.is_file() and f.stat().st_size == 0 for f in left):
            for f in left:
                f.unlink()
            run_dir.rmdir()
    choices = HydraConfig.get().runtime.choices
    group_choices = {k: v for k, v in choices.items() if isinstance(v, str) and "/" not in k}
    directory = RunDirectory(main_dir, cfg, settings.resume, settings.overwrite, settings.checkpoint and dist.is_main,
                             extra={"choices": group_choices})  # fmt: skip
    with config_errors():
        built = build(cfg)
        if dist.enabled and getattr(built.splits, "domains", False):
            raise ConfigError("distributed runs (torchrun) split the episodes of a meta-batch, or the rows of a "
                              "noisy-label training run, over the ranks; the domain tasks run in one process for "
                              "now")  # fmt: skip
    if getattr(built.splits, "online", False):  # a noisy-label training run: the online regime
        train_online(cfg, settings, run_dir, directory, built, group_choices, started, dist)
        return
    if getattr(built.splits, "domains", False):  # domain generalisation: episodes of the source domains
        train_domains(cfg, settings, run_dir, directory, built, group_choices, started)
        return
    with config_errors():
        if built.splits.train is None:
            raise ConfigError(f"task {choices.task!r} has no training split (it only evaluates); meta-test a "
                              "checkpoint on it with meta_test.py")  # fmt: skip
        if built.splits.val is None and settings.train.validate_every:
            raise ConfigError(f"task {choices.task!r} has no validation split: set train.validate_every=0, or give "
                              "it one (e.g. Omniglot's val_alphabets or val_characters)")  # fmt: skip
        dtype = dtype_of(cfg)
        device = dist.device(settings.device)
        trainer = MetaTrainer(built.problem, built.estimator, built.outer_opt, built.splits.train,
                              meta_batch=settings.train.meta_batch, device=device, dtype=dtype,
                              max_bad_steps=settings.train.max_bad_steps, distributed=dist,
                              split=settings.distributed.split)  # fmt: skip
        if dist.is_main:
            directory.open(trainer, settings.train.meta_steps)
        if dist.enabled:  # every rank starts from rank 0's state (fresh or resumed): identical phi everywhere
            state, directory.resumed_from = dist.broadcast((trainer.state_dict(), directory.resumed_from))
            trainer.load_state_dict(state)
        with output_errors(run_dir):
            logger = instantiate(cfg.logger, purge_step=directory.resumed_from) if dist.is_main else NullLogger()
    problem, splits = built.problem, built.splits
    steps = list(settings.test.steps)

    def validate(step: int) -> dict[str, float]:
        return evaluate(problem, splits.val, settings.train.val_tasks, [settings.problem.inner_steps], device=device,
                        dtype=dtype, distributed=dist, batch_tasks=settings.test.batch_tasks,
                        threads=settings.test.threads)  # fmt: skip

    directory.train(trainer, settings.train.meta_steps, logger, "lower the learning rates, or raise "
                    "train.max_bad_steps", log_every=settings.train.log_every, validate=validate,
                    validate_every=settings.train.validate_every, progress=settings.progress and dist.is_main,
                    checkpoint_every=settings.train.checkpoint_every)  # fmt: skip
    train_seconds = time.time() - started
    test = {}  # no test split (e.g. Omniglot on every alphabet): no meta-test
    if splits.test is not None:
        test = evaluate(problem, splits.test, settings.test.num_tasks, steps, device=device, dtype=dtype,
                        progress=settings.progress and dist.is_main, distributed=dist,
                        batch_tasks=settings.test.batch_tasks, threads=settings.test.threads)  # fmt: skip
    dist.close()
    if not dist.is_main:
        return  # rank 0 writes the outputs
    run = trainer.run
    saved = []
    with output_errors(run_dir):
        for name, module in problem.meta_modules().items():
            if type(module) in FAMILIES.values():  # e.g. a learned loss, for scripts/train.py or load_loss
                saved.append(save_meta_object(module, run_dir / f"{name}.safetensors").name)
                if name == "inner_loss":  # a look at it, beside the classic loss
                    n_classes = int(cfg.task.get("n_way", 10))
                    saved.append(save_loss_plot(module, run_dir / f"{name}.png", n_classes).name)
                    if isinstance(logger, TensorBoardLogger):
                        figure = loss_figure(module, n_classes)
                        logger.writer.add_figure(f"learned/{name}", figure, settings.train.meta_steps)

    metrics: dict[str, object] = {
        "task": choices.task,
        "algorithm": choices.algorithm,
        "hypergrad": choices.hypergrad,
        "init": choices.get("init"),
        "inner_loss": choices.get("inner_loss"),
        "meta_steps": settings.train.meta_steps,
        "outer_updates": run.outer_updates,
        "skipped_updates": run.skipped_updates,
        "resumed_from_step": directory.resumed_from,
        "saved_meta_objects": saved,
        "test_tasks": settings.test.num_tasks if splits.test is not None else 0,
        "ranks": dist.world_size,
        "train_seconds": round(train_seconds, 2),
        "sample_seconds": round(run.sample_seconds, 2),
        "step_seconds": round(run.step_seconds, 2),
    }
    metrics.update({f"meta/{k}": v for k, v in test.items()})
    logger.log(settings.train.meta_steps, test, prefix="meta_test/")

    baseline_on = settings.baseline.enabled is True or (settings.baseline.enabled == "auto" and splits.loss == "mse")
    if baseline_on and splits.test is not None:
        torch.manual_seed(settings.seed + 1)
        with config_errors():
            baseline = build_problem(cfg, instantiate(cfg.model), splits, baseline=True)
        train_jointly(
            baseline.model,
            splits.train,
            get_loss(splits.loss),
            steps=settings.baseline.steps,
            tasks_per_step=settings.baseline.tasks_per_step,
            lr=settings.baseline.lr,
            progress=settings.progress,
            dtype=dtype,
        )
        base = evaluate(baseline, splits.test, settings.test.num_tasks, steps, device=device, dtype=dtype)
        metrics.update({f"pretrained/{k}": v for k, v in base.items()})
        logger.log(settings.train.meta_steps, base, prefix="pretrained_test/")
    logger.close()
    metrics["total_seconds"] = round(time.time() - started, 2)
    with output_errors(run_dir):
        finish(run_dir, metrics)


def train_online(cfg: DictConfig, settings: Any, run_dir: Path, directory: RunDirectory, built: Any,
                 choices: dict[str, str], started: float, dist: Distributed) -> None:  # fmt: skip
    """One model trained on a noisy-label task while phi learns from look-aheads (scripts/online_task.py);
    metrics.json holds the trained model's final test accuracy. Under torchrun the run is data-parallel
    (every batch's rows split over the ranks); rank 0 logs, evaluates and writes."""
    task = built.splits
    with config_errors():
        outer_opt = built.outer_opt or torch.optim.SGD([torch.nn.Parameter(torch.zeros(0))], lr=0.0)  # no phi
        run = OnlineTaskRun(task, built.problem, built.estimator, outer_opt, settings.seed,
                            settings.train.max_bad_steps, dist, settings.distributed.split)  # fmt: skip
        if dist.is_main:
            directory.open(run.trainer, run.meta_steps, unit="look-ahead")
        if dist.enabled:  # every rank starts from rank 0's state (fresh or resumed)
            state, directory.resumed_from = dist.broadcast((run.trainer.state_dict(), directory.resumed_from))
            run.trainer.load_state_dict(state)
        with output_errors(run_dir):
            logger = instantiate(cfg.logger, purge_step=directory.resumed_from) if dist.is_main else NullLogger()
    if run.state() is not None:  # resumed: the epochs already logged are not logged again
        run.epochs_logged = run.state()["t"] // task.steps_per_epoch
    directory.train(run.trainer, run.meta_steps, logger, "lower outer_opt.lr or inner_opt.lr",
                    log_every=settings.train.log_every, progress=settings.progress and dist.is_main,
                    checkpoint_every=settings.train.checkpoint_every,
                    after_step=(lambda trainer: run.after_step(logger, trainer)) if dist.is_main else None)  # fmt: skip
    train_seconds = time.time() - started
    final, weights = run.finish()  # the pending real steps: every rank takes its share
    dist.close()
    if not dist.is_main:
        return
    logger.log(task.epochs, final, prefix="final/")
    saved = []
    with output_errors(run_dir):
        for name, module in built.problem.meta_modules().items():
            if type(module) in FAMILIES.values():  # a learned loss: for scripts/train.py
                saved.append(save_meta_object(module, run_dir / f"{name}.safetensors").name)
        inner_loss = built.problem.inner_loss
        if hasattr(inner_loss, "transition") and not task.data.unlabelled:
            title = f"{choices.get('algorithm')}: {task.data.name}"
            saved.append(save_transition_plot(inner_loss.transition().detach().cpu(), task.truth.transition,
                                              run_dir / "transition.png", title).name)  # fmt: skip
        if weights is not None:
            is_noisy = run.analysis[3]
            title = f"{choices.get('algorithm')}: {task.data.name}, final weights"
            saved.append(save_weight_histogram(weights, is_noisy, run_dir / "weights.png", title).name)
    logger.close()
    metrics: dict[str, object] = {
        "task": choices.get("task"),
        "algorithm": choices.get("algorithm"),
        "inner_loss": choices.get("inner_loss"),
        "data": task.data.name,
        **({"noise": dict(cfg.task.noise), "meta_per_class": cfg.task.meta_per_class} if "noise" in cfg.task
           else {"labels_per_class": cfg.task.get("labels_per_class")}),
        "meta_steps": run.meta_steps,  # look-aheads, each followed by an update of phi
        "ranks": dist.world_size,
        "outer_updates": run.trainer.run.outer_updates,
        "skipped_updates": run.trainer.run.skipped_updates,
        "resumed_from_step": directory.resumed_from,
        "saved": saved,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(run.trainer.run.step_seconds / max(task.epochs, 1), 3),
        **final,
        "total_seconds": round(time.time() - started, 2),
    }
    with output_errors(run_dir):
        finish(run_dir, metrics)


def train_domains(cfg: DictConfig, settings: Any, run_dir: Path, directory: RunDirectory, built: Any,
                  choices: dict[str, str], started: float) -> None:  # fmt: skip
    """The model trained on episodes of the source domains (scripts/domain_task.py); metrics.json holds the
    per-domain accuracies and the test-domain accuracy selected by training-domain validation."""
    task = built.splits
    with config_errors():
        run = DomainRun(task, built.problem, run_dir)
        trainer = MetaTrainer(built.problem, built.estimator, built.outer_opt, task.train,
                              meta_batch=settings.train.meta_batch, device=settings.device, dtype=dtype_of(cfg),
                              max_bad_steps=settings.train.max_bad_steps)  # fmt: skip
        directory.open(trainer, settings.train.meta_steps)
        run.resume(directory.resumed_from)
        with output_errors(run_dir):
            logger = instantiate(cfg.logger, purge_step=directory.resumed_from)
    directory.train(trainer, settings.train.meta_steps, logger, "lower the learning rates, or raise "
                    "train.max_bad_steps", log_every=settings.train.log_every, validate=run.validate,
                    validate_every=settings.train.validate_every, progress=settings.progress,
                    checkpoint_every=settings.train.checkpoint_every)  # fmt: skip
    train_seconds = time.time() - started
    final = run.final(settings.train.meta_steps)
    logger.log(settings.train.meta_steps, {k: v for k, v in final.items() if isinstance(v, float)}, prefix="final/")
    logger.close()
    saved = []
    with output_errors(run_dir):
        for name, module in built.problem.meta_modules().items():
            if type(module) in FAMILIES.values():  # a learned loss: for scripts/train.py
                saved.append(save_meta_object(module, run_dir / f"{name}.safetensors").name)
    metrics: dict[str, object] = {
        "task": choices.get("task"),
        "algorithm": choices.get("algorithm"),
        "hypergrad": choices.get("hypergrad"),
        "meta_steps": settings.train.meta_steps,
        "outer_updates": trainer.run.outer_updates,
        "skipped_updates": trainer.run.skipped_updates,
        "resumed_from_step": directory.resumed_from,
        "train_seconds": round(train_seconds, 2),
        "step_seconds": round(trainer.run.step_seconds, 2),
        "saved_meta_objects": saved,
        **final,
        "total_seconds": round(time.time() - started, 2),
    }
    with output_errors(run_dir):
        finish(run_dir, metrics)


if __name__ == "__main__":
    precheck(sys.argv[1:], "meta_train", validate_meta_train)
    main()
    exit_after_sweep()

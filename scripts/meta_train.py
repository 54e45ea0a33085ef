"""Meta-train a bilevel problem and meta-test it beside a pretrained baseline.

    python scripts/meta_train.py                       # MAML on sinusoid K=10
    python scripts/meta_train.py algorithm=anil hypergrad=truncated train.meta_steps=100

Writes TensorBoard events, checkpoint.pt and metrics.json into the Hydra run directory;
the last stdout line is the metrics JSON.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    build,
    build_problem,
    config_errors,
    dtype_of,
    exit_after_sweep,
    fail,
    finish,
    one_job,
    output_errors,
    precheck,
    prepare_run_dir,
    resolved,
)
from settings import validate_meta_train  # noqa: E402

from metaloss.baselines import train_jointly  # noqa: E402
from metaloss.checkpoint import save_checkpoint  # noqa: E402
from metaloss.engine import MetaTrainer, NonFiniteError, evaluate  # noqa: E402
from metaloss.errors import ConfigError  # noqa: E402
from metaloss.io import FAMILIES, save_meta_object  # noqa: E402
from metaloss.logging import TensorBoardLogger  # noqa: E402
from metaloss.losses import get_loss  # noqa: E402
from metaloss.plots import loss_figure, save_loss_plot  # noqa: E402


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    """The run's composed config and its command-line overrides under .hydra/, as Hydra writes them,
    but only once the run directory has been accepted (a refused run changes nothing there)."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    if not (hydra_dir / "config.yaml").exists():
        OmegaConf.save(cfg, hydra_dir / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), hydra_dir / "overrides.yaml")


@hydra.main(config_path="../configs", config_name="meta_train", version_base="1.3")
@one_job
def main(cfg: DictConfig) -> None:
    started = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    choices = HydraConfig.get().runtime.choices
    with config_errors():
        settings = validate_meta_train(cfg)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    config = resolved(cfg)
    group_choices = {k: v for k, v in choices.items() if isinstance(v, str) and "/" not in k}
    with config_errors():
        built = build(cfg)
        if built.splits.train is None or built.splits.val is None:
            raise ConfigError(f"task {choices.task!r} only evaluates; meta-test a checkpoint on it with meta_test.py")
        dtype = dtype_of(cfg)
        trainer = MetaTrainer(built.problem, built.estimator, built.outer_opt, built.splits.train,
                              meta_batch=settings.train.meta_batch, device=settings.device, dtype=dtype,
                              max_bad_steps=settings.train.max_bad_steps)  # fmt: skip
        resume_from = prepare_run_dir(run_dir, config, settings.resume, settings.overwrite)
        if resume_from is not None:
            trainer.load_state_dict(resume_from)
            print(f"resuming at meta-step {trainer.run.step} of {settings.train.meta_steps}", file=sys.stderr)
        with output_errors(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir, cfg)
            logger = instantiate(cfg.logger, purge_step=trainer.run.step if resume_from is not None else None)
    problem, splits = built.problem, built.splits
    device, steps = settings.device, list(settings.test.steps)
    checkpoint_path = run_dir / "checkpoint.pt"

    def save(trainer: MetaTrainer) -> None:
        if settings.checkpoint:
            with output_errors(run_dir):
                save_checkpoint(checkpoint_path, {**trainer.state_dict(), "config": config, "choices": group_choices})

    def validate(step: int) -> dict[str, float]:
        return evaluate(problem, splits.val, settings.train.val_tasks, [settings.problem.inner_steps], device=device,
                        dtype=dtype)  # fmt: skip

    try:
        with config_errors():
            trainer.train(
                settings.train.meta_steps,
                logger=logger,
                log_every=settings.train.log_every,
                validate=validate,
                validate_every=settings.train.validate_every,
                progress=settings.progress,
                checkpoint=save,
                checkpoint_every=settings.train.checkpoint_every,
            )
    except NonFiniteError as err:
        logger.close()
        if all(bool(p.isfinite().all()) for p in problem.meta_parameters()):
            save(trainer)  # the skipped updates left phi as it was: the last good phi, at the step reached
        kept = f"the last good checkpoint is {checkpoint_path}" if checkpoint_path.is_file() else "no checkpoint"
        fail(f"{err}; stopped: {kept} (lower the learning rates, or raise train.max_bad_steps)", code=3)
    run = trainer.run
    train_seconds = time.time() - started
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
        "resumed_from_step": None if resume_from is None else int(resume_from["run"]["step"]),
        "saved_meta_objects": saved,
        "test_tasks": settings.test.num_tasks,
        "train_seconds": round(train_seconds, 2),
        "sample_seconds": round(run.sample_seconds, 2),
        "step_seconds": round(run.step_seconds, 2),
    }
    test = evaluate(problem, splits.test, settings.test.num_tasks, steps, device=device, dtype=dtype,
                    progress=settings.progress)  # fmt: skip
    metrics.update({f"meta/{k}": v for k, v in test.items()})
    logger.log(settings.train.meta_steps, test, prefix="meta_test/")

    if settings.baseline.enabled is True or (settings.baseline.enabled == "auto" and splits.loss == "mse"):
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


if __name__ == "__main__":
    precheck(sys.argv[1:], "meta_train", validate_meta_train)
    main()
    exit_after_sweep()

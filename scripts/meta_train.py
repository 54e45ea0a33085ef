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
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build, build_problem, check_group_choices, config_errors, dtype_of, finish, resolved  # noqa: E402

from metaloss.baselines import train_jointly  # noqa: E402
from metaloss.checkpoint import save_checkpoint  # noqa: E402
from metaloss.engine import evaluate, meta_train  # noqa: E402
from metaloss.errors import ConfigError  # noqa: E402
from metaloss.losses import get_loss  # noqa: E402


def validate_run_settings(cfg: DictConfig) -> None:
    t, b, s = cfg.train, cfg.baseline, cfg.test
    if t.meta_steps < 0 or t.meta_batch < 1:
        raise ConfigError(f"train.meta_steps must be >= 0, train.meta_batch >= 1; got {t.meta_steps}, {t.meta_batch}")
    if s.num_tasks < 1 or not s.steps or min(s.steps) < 0:
        raise ConfigError(f"test.num_tasks must be >= 1 and test.steps >= 0, got {s.num_tasks}, {list(s.steps)}")
    if b.enabled not in (True, False, "auto"):
        raise ConfigError(f"baseline.enabled must be true, false or auto, got {b.enabled!r}")
    if b.enabled and (b.steps < 0 or b.tasks_per_step < 1 or b.lr <= 0):
        raise ConfigError("baseline.steps must be >= 0, baseline.tasks_per_step >= 1 and baseline.lr > 0")


@hydra.main(config_path="../configs", config_name="meta_train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    started = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    choices = HydraConfig.get().runtime.choices
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    with config_errors():
        validate_run_settings(cfg)
        built = build(cfg)
        if built.splits.train is None or built.splits.val is None:
            raise ConfigError(f"task {choices.task!r} only evaluates; meta-test a checkpoint on it with meta_test.py")
        dtype = dtype_of(cfg)
        logger = instantiate(cfg.logger)
    problem, splits = built.problem, built.splits
    device, steps = cfg.device, list(cfg.test.steps)

    def validate(step: int) -> dict[str, float]:
        return evaluate(problem, splits.val, cfg.train.val_tasks, [cfg.problem.inner_steps], device=device, dtype=dtype)

    history = meta_train(
        problem,
        built.estimator,
        built.outer_opt,
        splits.train,
        meta_steps=cfg.train.meta_steps,
        meta_batch=cfg.train.meta_batch,
        logger=logger,
        log_every=cfg.train.log_every,
        validate=validate,
        validate_every=cfg.train.validate_every,
        progress=cfg.progress,
        device=device,
        dtype=dtype,
    )
    train_seconds = time.time() - started
    if cfg.checkpoint:
        save_checkpoint(
            run_dir / "checkpoint.pt",
            problem,
            built.outer_opt,
            cfg.train.meta_steps,
            config=resolved(cfg),
            choices={k: v for k, v in choices.items() if isinstance(v, str) and "/" not in k},
        )

    metrics: dict[str, object] = {
        "task": choices.task,
        "algorithm": choices.algorithm,
        "hypergrad": choices.hypergrad,
        "meta_steps": cfg.train.meta_steps,
        "outer_updates": int(sum(h.get("outer_updates", 1) for h in history)),
        "test_tasks": cfg.test.num_tasks,
        "train_seconds": round(train_seconds, 2),
        "sample_seconds": round(sum(h["seconds/sample"] for h in history), 2),
        "step_seconds": round(sum(h["seconds/step"] for h in history), 2),
    }
    test = evaluate(problem, splits.test, cfg.test.num_tasks, steps, device=device, dtype=dtype, progress=cfg.progress)
    metrics.update({f"meta/{k}": v for k, v in test.items()})
    logger.log(cfg.train.meta_steps, test, prefix="meta_test/")

    if cfg.baseline.enabled is True or (cfg.baseline.enabled == "auto" and splits.loss == "mse"):
        torch.manual_seed(cfg.seed + 1)
        with config_errors():
            baseline = build_problem(cfg, instantiate(cfg.model), splits)
        train_jointly(
            baseline.model,
            splits.train,
            get_loss(splits.loss),
            steps=cfg.baseline.steps,
            tasks_per_step=cfg.baseline.tasks_per_step,
            lr=cfg.baseline.lr,
            progress=cfg.progress,
            dtype=dtype,
        )
        base = evaluate(baseline, splits.test, cfg.test.num_tasks, steps, device=device, dtype=dtype)
        metrics.update({f"pretrained/{k}": v for k, v in base.items()})
        logger.log(cfg.train.meta_steps, base, prefix="pretrained_test/")
    logger.close()
    metrics["total_seconds"] = round(time.time() - started, 2)
    finish(run_dir, metrics)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()

"""Ordinary training (no meta-learning) of an MLP classifier with a chosen or a learned loss (image
data, e.g. `data=cifar10`, is flattened to vectors):

    python scripts/train.py data=mnist1d loss=poly1
    python scripts/train.py data=fashion_mnist loss=learned loss.path=outputs/.../inner_loss.safetensors

A plain SGD-with-momentum loop over shuffled minibatches, through the one outer loop, so it logs to
TensorBoard, checkpoints, resumes exactly and stops on non-finite steps like meta_train.py. Test
accuracy and cross-entropy go to metrics.json and the last stdout line.
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

from common import (  # noqa: E402
    RunDirectory,
    config_errors,
    exit_after_sweep,
    finish,
    one_job,
    output_errors,
    precheck,
    start_job,
)
from settings import validate_train  # noqa: E402

from metaloss.engine import MetaTrainer  # noqa: E402
from metaloss.logging import TensorBoardLogger  # noqa: E402
from metaloss.models import MLP  # noqa: E402
from metaloss.training import MinibatchGradient, TrainingProblem, evaluate_classifier  # noqa: E402
from tasks.classification import MinibatchSampler  # noqa: E402


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@one_job
def main(cfg: DictConfig) -> None:
    started = time.time()
    settings, run_dir = start_job(cfg, validate_train)
    choices = HydraConfig.get().runtime.choices
    t = settings.train
    directory = RunDirectory(run_dir, cfg, settings.resume, settings.overwrite, settings.checkpoint)
    with config_errors():
        torch.manual_seed(settings.seed)
        data = instantiate(cfg.data)
        loss = instantiate(cfg.loss)
        x_train, x_test = data.x_train.flatten(1), data.x_test.flatten(1)  # images [N, C, H, W] -> [N, C*H*W]
        model = MLP(data.in_features, settings.model.hidden, data.n_classes).to(settings.device)
        problem = TrainingProblem(model, loss)
        optimizer = torch.optim.SGD(problem.meta_parameters(), lr=t.lr, momentum=t.momentum)
        sampler = MinibatchSampler(x_train, data.y_train, t.batch_size, settings.seed)
        trainer = MetaTrainer(problem, MinibatchGradient(), optimizer, sampler, device=settings.device,
                              max_bad_steps=t.max_bad_steps)  # type: ignore[arg-type]  # fmt: skip
        directory.open(trainer, t.steps, unit="step")
        with output_errors(run_dir):
            logger = TensorBoardLogger(run_dir / "tensorboard", purge_step=directory.resumed_from)
    directory.train(trainer, t.steps, logger, "lower train.lr", log_every=t.log_every, progress=settings.progress,
                    checkpoint_every=t.checkpoint_every)  # fmt: skip
    test = evaluate_classifier(model, x_test.to(settings.device), data.y_test.to(settings.device))
    train = evaluate_classifier(model, x_train.to(settings.device), data.y_train.to(settings.device))
    logger.log(t.steps, test, prefix="test/")
    logger.close()
    metrics = {
        "data": choices.data,
        "loss": choices.loss,
        "steps": t.steps,
        "skipped_updates": trainer.run.skipped_updates,
        "resumed_from_step": directory.resumed_from,
        "test_accuracy": test["accuracy"],
        "test_cross_entropy": test["loss"],
        "train_accuracy": train["accuracy"],
        "train_cross_entropy": train["loss"],
        "total_seconds": round(time.time() - started, 2),
    }
    with output_errors(run_dir):
        finish(run_dir, metrics)


if __name__ == "__main__":
    precheck(sys.argv[1:], "train", validate_train)
    main()
    exit_after_sweep()

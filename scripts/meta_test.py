"""Meta-test a checkpoint written by meta_train.py: mean accuracy (or loss) with a 95% confidence
interval over fixed episodes, and the error rate in percent for classification tasks.

    python scripts/meta_test.py checkpoint=outputs/.../checkpoint.pt
    python scripts/meta_test.py checkpoint=ckpt.pt task=omniglot_lake task.root=DIR test.steps=[10]

The episodes are fixed by the task's seed, so two evaluations of one checkpoint see the same tasks.
The last stdout line is the metrics JSON, also written to metrics.json in the run directory (meta_test.json
when the run directory is a training run's, whose files are never replaced).
"""

from __future__ import annotations

import json
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
from settings import validate_meta_test  # noqa: E402

from metaloss.checkpoint import load_meta_state, read_checkpoint  # noqa: E402
from metaloss.engine import evaluate  # noqa: E402
from metaloss.errors import ConfigError  # noqa: E402


def results_name(run_dir: Path) -> str:
    """metrics.json in meta_test.py's own directory; meta_test.json in a training run's directory
    (one with checkpoint.pt, or a metrics.json that counts meta-steps), whose files are never replaced."""
    training_metrics = run_dir / "metrics.json"
    if (run_dir / "checkpoint.pt").exists():
        return "meta_test.json"
    if training_metrics.is_file():
        try:
            if "meta_steps" in json.loads(training_metrics.read_text()):
                return "meta_test.json"
        except (ValueError, OSError):
            return "meta_test.json"  # not ours to replace either
    return "metrics.json"


@hydra.main(config_path="../configs", config_name="meta_test", version_base="1.3")
@one_job
def main(cfg: DictConfig) -> None:
    started = time.time()
    settings, run_dir = start_job(cfg, validate_meta_test)
    with config_errors():
        if not Path(cfg.checkpoint).is_file():
            raise ConfigError(f"checkpoint not found: {Path(cfg.checkpoint).resolve()} (set checkpoint=PATH)")
        state = read_checkpoint(cfg.checkpoint)
        if "config" not in state:
            raise ConfigError(f"{cfg.checkpoint} is not a meta_train.py checkpoint (no 'config' entry)")
        trained = OmegaConf.create(state["config"])
        task_node = cfg.task if cfg.get("task") is not None else trained.task
        task_name = HydraConfig.get().runtime.choices.get("task") or state.get("choices", {}).get("task")
        splits = instantiate(task_node)
        problem = build_problem(trained, instantiate(trained.model), splits)
        load_meta_state(state, problem, str(cfg.checkpoint))
        steps = list(cfg.test.steps if cfg.test.steps is not None else trained.test.steps)
        sampler = splits.test
        num_tasks = min(cfg.test.num_tasks, len(sampler)) if hasattr(sampler, "__len__") else cfg.test.num_tasks
        batch_tasks, threads = cfg.test.get("batch_tasks", "auto"), cfg.test.get("threads", "auto")
        if num_tasks < 1 or not steps or min(steps) < 0 or not all(v == "auto" or (type(v) is int and v >= 1)
                                                                   for v in (batch_tasks, threads)):  # fmt: skip
            raise ConfigError(f"test.num_tasks must be >= 1, test.batch_tasks and test.threads >= 1 or auto and "
                              f"test.steps >= 0, got {num_tasks}, {batch_tasks!r}, {threads!r}, {steps}")  # fmt: skip
        dtype = dtype_of(trained)
        first = sampler.episode(0).to(trained.device, dtype)
        try:
            with torch.no_grad():
                problem.predict(problem.init(), first.support_x[:1])
        except RuntimeError as err:  # e.g. a sinusoid MLP given 28 x 28 images
            trained_size, size = trained.task.get("image_size"), task_node.get("image_size")
            hint = (f"; it was trained on task.image_size={trained_size}: set task.image_size={trained_size}"
                    if trained_size is not None and size is not None and trained_size != size else "")  # fmt: skip
            raise ConfigError(
                f"the checkpoint's model ({state.get('choices', {}).get('model', '?')}) cannot take this task's inputs "
                f"of shape {list(first.support_x.shape[1:])}: {str(err).strip().splitlines()[0][:160]}{hint}"
            ) from None
        if splits.metric == "accuracy":
            with torch.no_grad():
                outputs = problem.predict(problem.init(), first.support_x[:1]).shape[-1]
            n_way = int(first.support_y.max()) + 1
            if outputs != n_way:
                raise ConfigError(f"the checkpoint's model has {outputs} outputs but the task is {n_way}-way")

    result = evaluate(
        problem, sampler, num_tasks, steps, device=trained.device, dtype=dtype, progress=cfg.progress, desc="meta-test",
        batch_tasks=batch_tasks, threads=threads,
    )
    metrics: dict[str, object] = {"checkpoint": str(cfg.checkpoint), "task": task_name, "test_tasks": num_tasks}
    metrics.update(result)
    if splits.metric == "accuracy":
        for t in steps:
            metrics[f"error_percent_step{t}"] = 100.0 * (1.0 - result[f"accuracy_step{t}"])
            metrics[f"error_percent_step{t}_ci95"] = 100.0 * result[f"accuracy_step{t}_ci95"]
    metrics["total_seconds"] = round(time.time() - started, 2)
    with output_errors(run_dir):
        finish(run_dir, metrics, results_name(run_dir))


if __name__ == "__main__":
    precheck(sys.argv[1:], "meta_test", validate_meta_test)
    main()
    exit_after_sweep()

"""What every entry point shares: config checks before Hydra runs, building the bilevel problem
from a composed config, one-line errors, and the final metrics line. Hydra stays in scripts/."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metaloss.errors import ConfigError
from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad.base import HypergradEstimator
from metaloss.losses import get_loss, get_metric
from metaloss.meta import LearnedInit
from metaloss.problem import BilevelProblem
from tasks.base import TaskSplits

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_group_choices(argv: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Reject `group=option` arguments naming an option that has no config file, before Hydra
    composes anything (Hydra's own message spans several lines)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        group_dir = config_dir / key
        if sep and group_dir.is_dir() and "." not in key and not (group_dir / f"{value}.yaml").is_file():
            options = sorted(p.stem for p in group_dir.glob("*.yaml"))
            fail(f"unknown {key} {value!r}; available: {', '.join(options)}")


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Turn invalid-input errors raised while building (also when wrapped by Hydra's instantiate)
    into one line and exit code 2. Other exceptions are bugs and keep their traceback."""
    try:
        yield
    except ConfigError as err:
        fail(str(err))
    except HydraException as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        fail(str(cause) if cause is not None else str(err).splitlines()[0])
    except OmegaConfBaseException as err:  # e.g. an interpolation naming a key this task lacks
        fail(f"config: {str(err).splitlines()[0]}")


def dtype_of(cfg: DictConfig) -> torch.dtype:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    return DTYPES[cfg.dtype]


@dataclass
class Built:
    splits: TaskSplits
    problem: BilevelProblem
    estimator: HypergradEstimator
    outer_opt: torch.optim.Optimizer


def instantiate_for(model: torch.nn.Module, node: DictConfig) -> Any:
    """Instantiate `node`, passing `model` when its target takes one (Meta-SGD, per-element penalties)."""
    make = instantiate(node, _partial_=True)
    return make(model=model) if "model" in inspect.signature(make.func).parameters else make()


def build_problem(cfg: DictConfig, model: torch.nn.Module, splits: TaskSplits) -> BilevelProblem:
    """The bilevel problem of `cfg` around `model`: a learned init, the configured inner optimizer
    and inner regulariser (built for the model when their constructors take one), the task's loss."""
    dtype = dtype_of(cfg)
    apply_batchnorm_policy(model, cfg.problem.batchnorm)
    model.to(cfg.device, dtype)
    inner_opt = instantiate_for(model, cfg.inner_opt).to(cfg.device, dtype)
    regularizer = cfg.problem.get("inner_regularizer")
    loss = get_loss(splits.loss)
    adapt = cfg.problem.adapt
    return BilevelProblem(
        model=model,
        init=LearnedInit(model),
        inner_opt=inner_opt,
        inner_loss=loss,
        outer_loss=loss,
        inner_steps=cfg.problem.inner_steps,
        adapt=None if adapt is None else list(adapt),
        metric=None if splits.metric is None else get_metric(splits.metric),
        metric_name=splits.metric or "metric",
        inner_regularizer=None if regularizer is None else instantiate_for(model, regularizer).to(cfg.device, dtype),
    )


def build(cfg: DictConfig) -> Built:
    """Everything a meta-training run needs, validated before any training starts."""
    torch.manual_seed(cfg.seed)
    splits = instantiate(cfg.task)
    problem = build_problem(cfg, instantiate(cfg.model), splits)
    estimator = instantiate(cfg.hypergrad)
    try:
        outer_opt = instantiate(cfg.outer_opt)(problem.meta_parameters())
    except ValueError as err:  # torch.optim rejects e.g. a negative learning rate
        raise ConfigError(f"outer_opt: {err}") from None
    return Built(splits, problem, estimator, outer_opt)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def finish(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json in the run directory and print the same object as the last stdout line."""
    write_json_atomic(run_dir / "metrics.json", metrics)
    print(json.dumps(metrics), flush=True)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]

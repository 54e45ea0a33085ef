"""What every entry point shares: config checks before Hydra runs, building the bilevel problem
from a composed config, one-line errors, and the final metrics line. Hydra stays in scripts/."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import math
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metaloss.checkpoint import CheckpointError, atomic_write, read_checkpoint
from metaloss.distributed import exit_closed_job
from metaloss.errors import ConfigError
from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad.base import HypergradEstimator
from metaloss.losses import get_loss, get_metric
from metaloss.meta import LearnedInit
from metaloss.problem import BilevelProblem
from tasks.base import TaskSplits

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
RUN_ID = secrets.token_hex(3)  # one per process: two runs started in the same second get different directories
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", lambda: RUN_ID)


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_group_choices(argv: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Reject `group=option` arguments naming an option that has no config file, before Hydra
    composes anything (Hydra's own message spans several lines). A sweep (`-m group=a,b`) is
    checked option by option."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        group_dir = config_dir / key
        if not sep or not group_dir.is_dir() or "." in key or key.startswith("hydra/"):
            continue  # hydra/...: Hydra's groups, whose options also come from its plugins
        for option in value.split(",") if _multirun(argv) else [value]:
            if not (group_dir / f"{option}.yaml").is_file():
                options = sorted(p.stem for p in group_dir.glob("*.yaml"))
                fail(f"unknown {key} {option!r}; available: {', '.join(options)}")


def check_writable(argv: list[str]) -> None:
    """The run (or sweep) directory, or the folder the default ones go under, must take a file:
    a read-only or full file system is one line and exit 4 here, not a traceback from Hydra."""
    key = "hydra.sweep.dir" if _multirun(argv) else "hydra.run.dir"
    chosen = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(key + "=")]
    target = Path(chosen[-1]) if chosen else Path("multirun" if _multirun(argv) else "outputs")
    if "${" in str(target):
        return  # interpolated: Hydra resolves it
    probe = target / f".metaloss-write-probe-{RUN_ID}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        fail(f"cannot write to the run directory {target}: {err.strerror or err}", code=4)


def _multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def precheck(argv: list[str], config_name: str, validate: Callable[[DictConfig], Any], max_jobs: int = 64) -> None:
    """Compose the config of every job that `argv` asks for (each combination of a sweep's values,
    up to `max_jobs`) and validate it, before Hydra starts: an unknown key, a wrong type or an
    out-of-range value is one line on stderr and exit 2, and no run directory is touched."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_group_choices(argv)
    args = [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # --help, --cfg, --info, ...: Hydra's own business
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException as err:
        fail(f"cannot parse the overrides: {str(err).strip().splitlines()[0]}")
    choices = []
    for override, line in zip(overrides, args):
        if override.is_sweep_override() and _multirun(argv):
            head = line.split("=", 1)[0]
            choices.append([f"{head}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([line])
    jobs = list(itertools.islice(itertools.product(*choices), max_jobs))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for job in jobs:
            try:
                cfg = compose(config_name, overrides=list(job))
            except (HydraException, OmegaConfBaseException) as err:
                lines = [x.strip() for x in str(err).strip().splitlines() if x.strip() and "full_key" not in x]
                fail(f"config: {' '.join(lines[:3])}")
            with config_errors():
                validate(cfg)
    GlobalHydra.instance().clear()
    check_writable(argv)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Turn invalid-input errors raised while building (also when wrapped by Hydra's instantiate)
    into one line and exit code 2. Other exceptions are bugs and keep their traceback."""
    try:
        yield
    except ConfigError as err:
        fail(str(err))
    except HydraException as err:  # instantiate() wraps what a target raised
        cause: BaseException | None = err
        while isinstance(cause, HydraException):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ConfigError):
            fail(str(cause))
        if cause is not None:  # a bug inside a target: its own traceback, not "Error in call to target"
            raise cause from None
        fail(str(err).splitlines()[0])
    except OmegaConfBaseException as err:  # e.g. an interpolation naming a key this task lacks
        fail(f"config: {str(err).splitlines()[0]}")


@contextlib.contextmanager
def output_errors(run_dir: Path) -> Iterator[None]:
    """A run directory that cannot be written (read-only, disk full, file too large) is one line on
    stderr and exit 4; the files written before (the last checkpoint) stay as they were."""
    try:
        yield
    except OSError as err:
        where = err.filename or run_dir
        kept = "; the last checkpoint written is kept" if (run_dir / "checkpoint.pt").is_file() else ""
        fail(f"cannot write to the run directory: {where}: {err.strerror or err}{kept}", code=4)


def start_job(cfg: DictConfig, validate: Callable[[DictConfig], Any]) -> tuple[Any, Path]:
    """A script's first lines: its validated settings (one line and exit 2 when bad), torch's thread
    count set from them, and the job's run directory."""
    from hydra.core.hydra_config import HydraConfig

    with config_errors():
        settings = validate(cfg)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return settings, Path(HydraConfig.get().runtime.output_dir)


def dtype_of(cfg: DictConfig) -> torch.dtype:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    return DTYPES[cfg.dtype]


@dataclass
class Built:
    splits: TaskSplits
    problem: BilevelProblem
    estimator: HypergradEstimator
    outer_opt: torch.optim.Optimizer | None  # None: nothing is meta-learned (an online-regime baseline)


def instantiate_for(model: torch.nn.Module, node: DictConfig) -> Any:
    """Instantiate `node`, passing `model` when its target takes one (Meta-SGD, per-element penalties)."""
    if node.get("_partial_"):  # the node is itself a partial (e.g. a fixed loss with its coefficients)
        return instantiate(node)
    make = instantiate(node, _partial_=True)
    return make(model=model) if "model" in inspect.signature(make.func).parameters else make()


def build_problem(
    cfg: DictConfig, model: torch.nn.Module, splits: TaskSplits, baseline: bool = False
) -> BilevelProblem:
    """The bilevel problem of `cfg` around `model`: the configured init (learned by default), inner
    loss (the task's own unless `inner_loss` names a target), inner optimizer and inner regulariser
    (built for the model when their constructors take one), the task's outer loss. baseline: the
    pretrained baseline's problem, which fine-tunes the model's own weights with the task's loss."""
    dtype = dtype_of(cfg)
    apply_batchnorm_policy(model, cfg.problem.batchnorm)
    model.to(cfg.device, dtype)
    inner_opt = instantiate_for(model, cfg.inner_opt).to(cfg.device, dtype)
    regularizer = cfg.problem.get("inner_regularizer")
    loss = get_loss(splits.loss)
    inner_loss = cfg.get("inner_loss")
    if not baseline and inner_loss is not None and inner_loss.get("_target_") is not None:
        inner_loss = instantiate_for(model, inner_loss)
        if isinstance(inner_loss, torch.nn.Module):
            inner_loss.to(cfg.device, dtype)
    else:
        inner_loss = loss
    init = None if baseline else cfg.get("init")
    adapt = cfg.problem.adapt
    return BilevelProblem(
        model=model,
        init=LearnedInit(model) if init is None else instantiate(init, model=model),
        inner_opt=inner_opt,
        inner_loss=inner_loss,
        outer_loss=loss,
        inner_steps=cfg.problem.inner_steps,
        adapt=None if adapt is None else list(adapt),
        metric=None if splits.metric is None else get_metric(splits.metric),
        metric_name=splits.metric or "metric",
        inner_regularizer=None if regularizer is None else instantiate_for(model, regularizer).to(cfg.device, dtype),
        meta_objective=cfg.problem.get("meta_objective", "query"),
        inner_batch_size=cfg.problem.get("inner_batch_size"),
        shuffle_seed=cfg.problem.get("shuffle_seed"),
        support_weight=cfg.problem.get("support_weight", 0.0),
    )


def build(cfg: DictConfig) -> Built:
    """Everything a meta-training run needs, validated before any training starts."""
    torch.manual_seed(cfg.seed)
    splits = instantiate(cfg.task)
    problem = build_problem(cfg, instantiate(cfg.model), splits)
    estimator = instantiate(cfg.hypergrad)
    if not problem.meta_parameters() and getattr(splits, "online", False):
        return Built(splits, problem, estimator, None)  # a baseline run of the online regime: nothing to update
    if not problem.meta_parameters():
        raise ConfigError("nothing is meta-learned: with init=fixed, learn a loss (inner_loss=ml3, ...), inner "
                          "hyperparameters (inner_opt.learn=[lr]) or a regulariser")  # fmt: skip
    try:
        outer_opt = instantiate(cfg.outer_opt)(problem.meta_parameters())
    except ValueError as err:  # torch.optim rejects e.g. a negative learning rate
        raise ConfigError(f"outer_opt: {err}") from None
    return Built(splits, problem, estimator, outer_opt)


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n"))


def strict_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with every non-finite number as null and, when there was one, `non_finite` naming
    those keys: strict JSON parsers reject NaN and Infinity."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return metrics
    return {**{k: None if k in bad else v for k, v in metrics.items()}, "non_finite": bad}


def finish(run_dir: Path, metrics: dict[str, Any], name: str = "metrics.json") -> None:
    """Write the metrics (strict JSON) as `name` in the run directory and print the same object as the
    last stdout line."""
    metrics = strict_json(metrics)
    write_json_atomic(run_dir / name, metrics)
    print(json.dumps(metrics, allow_nan=False), flush=True)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


IGNORED_KEYS = ("resume", "overwrite", "progress", "threads", "train.checkpoint_every", "logger.")


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two resolved configs, except those that do not
    change a run's result (progress bars, threads, where the logger writes, resume settings)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out or {prefix[:-1]: {}}
        return {prefix[:-1]: d}

    a, b = flat(saved), flat(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [k for k in keys if not any(k == i or (i.endswith(".") and k.startswith(i)) for i in IGNORED_KEYS)]


RUN_FILES = ("checkpoint.pt", "metrics.json", "tensorboard", ".hydra")


def prepare_run_dir(run_dir: Path, config: dict[str, Any], resume: str | None, overwrite: bool) -> dict | None:
    """Decide what a meta-training run does with its directory, before writing anything there.
    Returns the checkpoint to resume from, or None for a fresh start:
    - resume=PATH (a checkpoint or a run directory): continue that run here; its config must match;
    - a directory holding a finished run (metrics.json): refused unless overwrite=true;
    - a directory holding an unfinished run (checkpoint.pt) of the same config: resumed
      automatically; of another config: refused, naming the keys that differ;
    - overwrite=true: the old run's files are removed first."""
    for stale in run_dir.glob(".*.tmp"):  # a write that a SIGKILL interrupted
        stale.unlink()
    finished, existing = (run_dir / "metrics.json").is_file(), (run_dir / "checkpoint.pt").is_file()
    if resume is not None:
        state = read_checkpoint(resume)
        _same_config(state, config, resume)
        source = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        if source.resolve() != run_dir.resolve() and (finished or existing) and not overwrite:
            raise ConfigError(f"run directory {run_dir} already holds another run; resume into a new directory "
                              "or set overwrite=true")  # fmt: skip
        return state
    if overwrite:
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return None
    if finished:
        raise ConfigError(f"run directory {run_dir} holds a finished run (metrics.json): choose another "
                          "hydra.run.dir, or set overwrite=true to replace it")  # fmt: skip
    if existing:
        state = read_checkpoint(run_dir / "checkpoint.pt")
        _same_config(state, config, str(run_dir))
        return state
    return None


def _same_config(state: dict[str, Any], config: dict[str, Any], where: str) -> None:
    if "config" not in state:
        raise CheckpointError(f"{where}: the checkpoint has no config, so it cannot be resumed")
    differ = config_diff(state["config"], config)
    if differ:
        shown = ", ".join(f"{k} ({_get(state['config'], k)!r} -> {_get(config, k)!r})" for k in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise ConfigError(f"{where} holds an unfinished run of another config: {shown}{more}; "
                          "use another hydra.run.dir, or overwrite=true")  # fmt: skip


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return "<absent>"
        d = d[part]
    return d


FAILED_JOBS: list[int] = []


def one_job(task: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """In a sweep (-m), a job that stops with an error is recorded in FAILED_JOBS and the sweep goes
    on with the next job; the script exits with the worst code after the sweep (`exit_after_sweep`)."""

    @functools.wraps(task)  # Hydra finds the config directory from the task's module
    def wrapper(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            task(cfg)
        except SystemExit as err:
            if err.code in (0, None) or HydraConfig.get().mode != RunMode.MULTIRUN:
                raise
            FAILED_JOBS.append(int(err.code) if isinstance(err.code, int) else 1)

    return wrapper


def exit_after_sweep() -> None:
    """The end of a script: a non-zero exit if a job of the sweep failed; else a distributed rank
    whose job ended well exits at once (`metaloss.distributed.exit_closed_job`)."""
    if FAILED_JOBS:
        fail(f"{len(FAILED_JOBS)} job(s) of the sweep failed (see their error lines above)", max(FAILED_JOBS))
    exit_closed_job()


class RunDirectory:
    """What a training script does with its run directory, for meta_train.py and train.py alike:
    accept it (or resume the run it holds) before writing anything there, write the config and
    the checkpoints, and stop a diverging run with its last good checkpoint."""

    def __init__(self, run_dir: Path, cfg: DictConfig, resume: str | None, overwrite: bool, checkpoint: bool,
                 extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.dir, self.cfg, self.config = run_dir, cfg, resolved(cfg)
        self.resume, self.overwrite, self.checkpoint, self.extra = resume, overwrite, checkpoint, extra or {}
        self.checkpoint_path = run_dir / "checkpoint.pt"
        self.resumed_from: int | None = None

    def open(self, trainer: Any, total: int, unit: str = "meta-step") -> None:
        """Resume `trainer` from the directory's (or `resume`'s) checkpoint when there is one, then
        write .hydra/config.yaml and overrides.yaml (once). Raises ConfigError on a refused directory."""
        from hydra.core.hydra_config import HydraConfig

        state = prepare_run_dir(self.dir, self.config, self.resume, self.overwrite)
        if state is not None:
            trainer.load_state_dict(state)
            self.resumed_from = trainer.run.step
            print(f"resuming at {unit} {trainer.run.step} of {total}", file=sys.stderr)
        with output_errors(self.dir):
            hydra_dir = self.dir / ".hydra"
            hydra_dir.mkdir(parents=True, exist_ok=True)
            if not (hydra_dir / "config.yaml").exists():
                OmegaConf.save(self.cfg, hydra_dir / "config.yaml")
                OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), hydra_dir / "overrides.yaml")

    def save(self, trainer: Any) -> None:
        """The trainer's state as the directory's checkpoint (when checkpoints are on)."""
        from metaloss.checkpoint import save_checkpoint

        if self.checkpoint:
            with output_errors(self.dir):
                save_checkpoint(self.checkpoint_path, {**trainer.state_dict(), "config": self.config, **self.extra})

    def train(self, trainer: Any, steps: int, logger: Any, hint: str, **train: Any) -> None:
        """`trainer.train(steps, ...)` with checkpoints; bad input met on the way is one line and exit 2,
        divergence (`NonFiniteError`) saves the last good state and exits 3 with `hint`."""
        from metaloss.engine import NonFiniteError

        try:
            with config_errors():
                trainer.train(steps, logger=logger, checkpoint=self.save, **train)
        except NonFiniteError as err:
            logger.close()
            if all(bool(p.isfinite().all()) for p in trainer.problem.meta_parameters()):
                self.save(trainer)  # skipped updates leave the weights as they were: the last good ones
            path = self.checkpoint_path
            kept = f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint"
            fail(f"{err}; stopped: {kept} ({hint})", code=3)

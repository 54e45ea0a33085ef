"""Typed schemas of the run settings (the config keys outside the config groups), checked before
anything is built: a wrong type, an out-of-range value or an impossible device is one line.

The config groups (task/, model/, hypergrad/, ...) are checked by their targets' constructors,
which raise `ConfigError`; their value types are checked here against the target's annotations.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metaloss.distributed import BACKENDS
from metaloss.engine import SPLITS
from metaloss.errors import ConfigError

# Optional[...] / Union[...] (not "X | None") so that OmegaConf can read the annotations on Python 3.10


@dataclass
class ProblemSettings:
    inner_steps: int = 1
    adapt: Optional[list[str]] = None  # noqa: UP045
    inner_regularizer: Optional[Any] = None  # noqa: UP045
    batchnorm: str = "transductive"
    meta_objective: str = "query"
    inner_batch_size: Optional[int] = None  # noqa: UP045
    shuffle_seed: Optional[int] = None  # noqa: UP045
    support_weight: float = 0.0


@dataclass
class TrainSettings:
    meta_steps: int = 3000
    meta_batch: int = 25
    log_every: int = 20
    validate_every: int = 500
    val_tasks: int = 100
    checkpoint_every: int = 100
    max_bad_steps: int = 10


@dataclass
class TestSettings:
    num_tasks: int = 600
    batch_tasks: Any = "auto"  # an int >= 1 or "auto"
    threads: Any = "auto"  # an int >= 1 or "auto"
    steps: list[int] = field(default_factory=lambda: [0, 1, 10])


@dataclass
class BaselineSettings:
    enabled: Any = "auto"
    steps: int = 3000
    tasks_per_step: int = 25
    lr: float = 1e-3


@dataclass
class DistributedSettings:
    backend: str = "auto"
    timeout_s: float = 300.0
    split: str = "auto"


@dataclass
class MetaTrainSettings:
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    threads: Optional[int] = None  # noqa: UP045
    problem: ProblemSettings = field(default_factory=ProblemSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    test: TestSettings = field(default_factory=TestSettings)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    checkpoint: bool = True
    resume: Optional[str] = None  # noqa: UP045
    overwrite: bool = False


@dataclass
class MetaTestSettings:
    checkpoint: str = "???"
    seed: int = 0
    progress: bool = True
    threads: Optional[int] = None  # noqa: UP045
    test: dict[str, Any] = field(default_factory=dict)


@dataclass
class OrdinaryTrainSettings:
    steps: int = 2000
    batch_size: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    log_every: int = 50
    checkpoint_every: int = 500
    max_bad_steps: int = 10


@dataclass
class ModelSettings:
    hidden: list[int] = field(default_factory=lambda: [100, 100])


@dataclass
class TrainScriptSettings:
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    threads: Optional[int] = None  # noqa: UP045
    model: ModelSettings = field(default_factory=ModelSettings)
    train: OrdinaryTrainSettings = field(default_factory=OrdinaryTrainSettings)
    checkpoint: bool = True
    resume: Optional[str] = None  # noqa: UP045
    overwrite: bool = False


DTYPES = ("float32", "float64")
BATCHNORM = ("transductive", "frozen")


def typed(cfg: DictConfig, schema: type) -> Any:
    """The run settings of `cfg` as an instance of `schema` (a dataclass): wrong types raise ConfigError."""
    names = {f.name for f in dataclasses.fields(schema)}
    values = OmegaConf.masked_copy(cfg, [k for k in names if k in cfg])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None


def _one_line(err: OmegaConfBaseException) -> str:
    """OmegaConf's validation message, e.g. "train.meta_steps: Value 'abc' of type 'str' could not be
    converted to Integer"."""
    key = getattr(err, "full_key", None)
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{key}: {message}" if key else message


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but this machine has no CUDA GPU (torch sees none); use device=cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device} but MPS is not available on this machine")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_meta_train(cfg: DictConfig) -> MetaTrainSettings:
    """Types, ranges and combinations of meta_train.py's settings; raises ConfigError (one line)."""
    s: MetaTrainSettings = typed(cfg, MetaTrainSettings)
    t, b, p = s.train, s.baseline, s.problem
    _require(s.dtype in DTYPES, f"dtype must be one of {list(DTYPES)}, got {s.dtype!r}")
    _require(s.threads is None or s.threads >= 1, f"threads must be >= 1 or null, got {s.threads}")
    check_device(s.device)
    _require(p.inner_steps >= 1, f"problem.inner_steps must be >= 1 for meta-training, got {p.inner_steps}")
    _require(p.batchnorm in BATCHNORM, f"problem.batchnorm must be one of {list(BATCHNORM)}, got {p.batchnorm!r}")
    _require(t.meta_steps >= 0, f"train.meta_steps must be >= 0, got {t.meta_steps}")
    _require(t.meta_batch >= 1, f"train.meta_batch must be >= 1, got {t.meta_batch}")
    _require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _require(t.validate_every >= 0, f"train.validate_every must be >= 0 (0: never), got {t.validate_every}")
    _require(
        t.val_tasks >= 1 or t.validate_every == 0,
        f"train.val_tasks must be >= 1 when validating (train.validate_every={t.validate_every}), got {t.val_tasks}",
    )
    _require(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (0: at the end), got {t.checkpoint_every}")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    _require(s.test.num_tasks >= 1, f"test.num_tasks must be >= 1, got {s.test.num_tasks}")
    _require(s.test.batch_tasks == "auto" or (type(s.test.batch_tasks) is int and s.test.batch_tasks >= 1),
             f"test.batch_tasks must be an int >= 1 or auto, got {s.test.batch_tasks!r}")  # fmt: skip
    _require(s.test.threads == "auto" or (type(s.test.threads) is int and s.test.threads >= 1),
             f"test.threads must be an int >= 1 or auto, got {s.test.threads!r}")  # fmt: skip
    _require(bool(s.test.steps) and min(s.test.steps) >= 0, f"test.steps must be a non-empty list of ints >= 0, got "
             f"{s.test.steps}")  # fmt: skip
    _require(b.enabled in (True, False, "auto"), f"baseline.enabled must be true, false or auto, got {b.enabled!r}")
    if b.enabled:
        _require(b.steps >= 0 and b.tasks_per_step >= 1 and b.lr > 0,
                 "baseline.steps must be >= 0, baseline.tasks_per_step >= 1 and baseline.lr > 0")  # fmt: skip
    d = s.distributed
    _require(d.backend in BACKENDS, f"distributed.backend must be one of {BACKENDS}, got {d.backend!r}")
    _require(d.timeout_s > 0, f"distributed.timeout_s must be > 0, got {d.timeout_s}")
    _require(d.split in SPLITS, f"distributed.split must be one of {SPLITS}, got {d.split!r}")
    check_episodes(cfg)
    for group in ("task", "model", "init", "inner_loss", "inner_opt", "hypergrad", "outer_opt", "logger"):
        if group in cfg and isinstance(cfg[group], DictConfig):
            check_target_types(cfg[group], group)
    return s


def validate_meta_test(cfg: DictConfig) -> MetaTestSettings:
    s: MetaTestSettings = typed(cfg, MetaTestSettings)
    _require(s.threads is None or s.threads >= 1, f"threads must be >= 1 or null, got {s.threads}")
    if cfg.get("task") is not None:
        check_episodes(cfg)
        check_target_types(cfg.task, "task")
    return s


def check_episodes(cfg: DictConfig) -> None:
    """Episodes that cannot score anything: one class (always right), or no query examples (no outer loss)."""
    task = cfg.get("task")
    if not isinstance(task, DictConfig):
        return
    n_way, q_query = task.get("n_way"), task.get("q_query")
    if isinstance(n_way, int) and n_way < 2:
        raise ConfigError(f"task.n_way must be >= 2, got {n_way}: a 1-way episode is always classified right")
    if isinstance(q_query, int) and q_query < 1:
        raise ConfigError(f"task.q_query must be >= 1, got {q_query}: the outer loss is measured on the query examples")


SIMPLE = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


def check_target_types(node: DictConfig, group: str) -> None:
    """Each key of a `_target_` node whose target annotates it with int, float, bool or str (or an
    Optional / Union of them) must hold such a value: `inner_opt.lr=abc` is one line, not a TypeError
    deep inside a constructor."""
    target = node.get("_target_")
    if not isinstance(target, str):
        return
    hints = _hints(target)
    for key in node:
        hint = hints.get(key, hints.get("*"))
        if key.startswith("_") or hint is None:
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:  # an interpolation resolved only at run time (e.g. ${hydra:...})
            continue
        allowed = _simple_types(hint)
        if allowed is None or value is None or isinstance(value, (DictConfig, ListConfig)):
            continue
        if not any(_matches(value, t) for t in allowed):
            wanted = " or ".join(SIMPLE[t] for t in allowed) or "a list"
            raise ConfigError(f"{group}.{key} must be {wanted}, got {value!r}")


def _hints(target: str) -> dict[str, Any]:
    """The target's parameter annotations; keys that only a `**kwargs: T` takes map to T (as "*")."""
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        hints = typing.get_type_hints(fn)
        for param in inspect.signature(fn).parameters.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD and param.name in hints:
                hints["*"] = hints.pop(param.name)
        return hints
    except Exception:  # an unresolvable annotation is not the user's error: leave it to the constructor
        return {}


def _simple_types(hint: Any) -> tuple[type, ...] | None:
    """The scalar types a config value may have for this hint: () when it takes only a list (a
    sequence), None when unknown (anything goes). A YAML value is never a tensor, so a Union's
    non-scalar members (Tensor, Sequence[...]) leave its scalar members."""
    if hint in SIMPLE:
        return (hint,)
    origin = typing.get_origin(hint)
    if origin in (list, tuple, collections.abc.Sequence):
        return ()
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        scalars = tuple(a for a in args if a in SIMPLE)
        rest = [_simple_types(a) if typing.get_origin(a) else ((), None)[a is Any or not inspect.isclass(a)]
                for a in args if a not in SIMPLE]  # fmt: skip
        if any(r is None or r != () for r in rest):
            return None  # Any, a callable, a literal, ...: leave it to the target
        return scalars
    return None


def _matches(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def validate_train(cfg: DictConfig) -> TrainScriptSettings:
    """Types and ranges of train.py's settings; raises ConfigError (one line)."""
    s: TrainScriptSettings = typed(cfg, TrainScriptSettings)
    t = s.train
    _require(s.threads is None or s.threads >= 1, f"threads must be >= 1 or null, got {s.threads}")
    check_device(s.device)
    _require(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")
    _require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _require(t.lr > 0 and t.momentum >= 0, f"train.lr must be > 0 and train.momentum >= 0, got {t.lr}, {t.momentum}")
    _require(t.log_every >= 1 and t.checkpoint_every >= 0 and t.max_bad_steps >= 1,
             "train.log_every and train.max_bad_steps must be >= 1, train.checkpoint_every >= 0")  # fmt: skip
    _require(all(h >= 1 for h in s.model.hidden), f"model.hidden must be positive, got {s.model.hidden}")
    for group in ("data", "loss"):
        if group in cfg and isinstance(cfg[group], DictConfig):
            check_target_types(cfg[group], group)
    return s

"""Checkpoints: written atomically, read without running code.

A checkpoint is one `torch.save`d dict of tensors, numbers, strings, lists and dicts only, so it
is read with `torch.load(..., weights_only=True)`: a file whose pickle asks for anything else (a
class, a function, a `__reduce__` payload) is refused before any of it runs. Format version 2
(see the README, "Checkpoints"):

    format: "metaloss-checkpoint", version: 2
    meta:       {meta-module name -> state_dict}          phi (what `meta_test.py` needs)
    outer_opt:  torch.optim state_dict                     (resume)
    estimator:  the estimator's state_dict()               (resume; {} when stateless)
    run:        {step, outer_updates, skipped_updates, bad_streak, ...}   (resume)
    rng:        {torch, numpy, python}                      (resume)
    config, choices: the resolved run config and the config-group choices (scripts)

Version-1 checkpoints (no `format` key: phi, step, config) still load for evaluation.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaloss.errors import ConfigError
from metaloss.problem import BilevelProblem

FORMAT, VERSION = "metaloss-checkpoint", 2


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, unsafe, or made for another problem."""


def atomic_write(path: str | Path, write: Any) -> Path:
    """Call `write(tmp_path)`, fsync the file, rename it over `path` and fsync the directory: `path`
    is always either the old complete file or the new one. On any failure the temporary file is
    removed and the old file left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)  # "File too large" alone does not say which file
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and plain numbers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings and containers of them) atomically as a version-2
    checkpoint. It is serialised in memory first, so a full disk is a plain OSError from the write."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`. Raises CheckpointError (one line) for a missing,
    truncated, foreign, unsafe or newer-version file."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path.resolve()}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 5": the refusal below says enough
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"global ([\w.]+)", str(err))
        what = found.group(1) if found else "an object that is not a tensor or a plain value"
        raise CheckpointError(
            f"{path} is not a readable checkpoint: refused to unpickle {what} (checkpoints hold tensors and plain "
            "values only, and loading one never runs code)"
        ) from None
    except Exception as err:  # a truncated or foreign file: torch raises several types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint: {first[:200]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("meta"), dict):
        raise CheckpointError(f"{path} is not a metaloss checkpoint (no 'meta' entry)")
    version = state.get("version", 1)
    if state.get("format", FORMAT) != FORMAT or not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state.get('format')!r} version {version!r}; "
            f"this metaloss reads {FORMAT!r} up to version {VERSION}"
        )
    return state


def check_meta_state(saved: dict[str, dict], problem: BilevelProblem, source: str = "checkpoint") -> None:
    """One line naming what differs when `saved` (a problem state_dict) does not fit `problem`."""
    expected = problem.state_dict()
    if set(saved) != set(expected):
        raise CheckpointError(
            f"the {source} holds meta-modules {sorted(saved)} but this problem has {sorted(expected)} "
            "(another algorithm or inner optimizer?)"
        )
    for module, tensors in expected.items():
        got = saved[module]
        missing, extra = sorted(set(tensors) - set(got)), sorted(set(got) - set(tensors))
        if missing or extra:
            raise CheckpointError(
                f"the {source}'s {module} does not match this model: missing {missing[:4]}, unexpected {extra[:4]} "
                "(another model or task?)"
            )
        for name, value in tensors.items():
            if tuple(got[name].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"the {source}'s {module}.{name} has shape {list(got[name].shape)} but this model's has "
                    f"{list(value.shape)} (another model or task, e.g. another n_way?)"
                )


def load_meta_state(state: dict[str, Any], problem: BilevelProblem, source: str = "checkpoint") -> None:
    """Restore phi from a checkpoint dict, after checking that it fits the problem."""
    check_meta_state(state["meta"], problem, source)
    problem.load_state_dict(state["meta"])


def load_checkpoint(
    path: str | Path, problem: BilevelProblem, outer_opt: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore phi (and the outer optimizer, when given and saved) from `path`; returns the checkpoint."""
    state = read_checkpoint(path)
    load_meta_state(state, problem, str(path))
    if outer_opt is not None and "outer_opt" in state:
        outer_opt.load_state_dict(state["outer_opt"])
    return state

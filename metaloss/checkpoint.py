"""Checkpoints of phi and the outer optimizer, written atomically (a crash never leaves half a file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from metaloss.problem import BilevelProblem


def save_checkpoint(
    path: str | Path, problem: BilevelProblem, outer_opt: torch.optim.Optimizer | None, step: int, **extra: Any
) -> Path:
    """Write {meta state, outer optimizer state, step, extra} to `path` via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {"meta": problem.state_dict(), "step": step, **extra}
    if outer_opt is not None:
        state["outer_opt"] = outer_opt.state_dict()
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | Path, problem: BilevelProblem, outer_opt: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore phi (and the outer optimizer, when given) from `path`; returns the whole saved dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    problem.load_state_dict(state["meta"])
    if outer_opt is not None and "outer_opt" in state:
        outer_opt.load_state_dict(state["outer_opt"])
    return state

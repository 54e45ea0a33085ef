"""Scalar logging to TensorBoard event files (and nothing else, so it is easy to swap)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class TensorBoardLogger:
    """Writes scalars to `log_dir` (view with `tensorboard --logdir <run dir>`). purge_step: a resumed
    run's first step; events an interrupted run logged from there on are dropped, not duplicated."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"{prefix}{name}", float(value), global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class NullLogger:
    """A logger that drops everything (tests, `logger=none`)."""

    def __init__(self, purge_step: int | None = None) -> None:
        pass

    def log(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass

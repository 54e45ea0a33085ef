"""Scalar logging to TensorBoard event files (and nothing else, so it is easy to swap)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class TensorBoardLogger:
    """Writes scalars to `log_dir` (view with `tensorboard --logdir <run dir>`)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"{prefix}{name}", float(value), global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class NullLogger:
    """A logger that drops everything (tests, `logger=none`)."""

    def log(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass

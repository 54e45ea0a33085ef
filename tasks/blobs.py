"""Synthetic few-shot classification: every episode draws `n_way` Gaussian clusters in `dim`
dimensions (class means ~ N(0, I), points ~ N(mean, spread^2 I)) and labels them 0..n_way-1. No
files, a few microseconds per episode: the classification analogue of the sinusoid, for testing
classification meta-learners (learned losses, NPBML) in seconds."""

from __future__ import annotations

import torch

from metaloss.errors import ConfigError
from metaloss.types import Episode
from tasks.base import SPLITS, TaskSplits, episode_generator


class BlobsSampler:
    """Episode i: n_way means [n_way, dim], k_shot support and q_query query points per class
    around them (class-major), a pure function of (seed, split, i)."""

    def __init__(self, n_way: int = 3, k_shot: int = 5, q_query: int = 10, dim: int = 8, spread: float = 0.7,
                 seed: int = 0, split: str = "train") -> None:  # fmt: skip
        if n_way < 2 or k_shot < 1 or q_query < 1 or dim < 1 or spread <= 0:
            raise ConfigError(f"blobs need n_way >= 2, k_shot >= 1, q_query >= 1, dim >= 1, spread > 0; got "
                              f"{n_way}, {k_shot}, {q_query}, {dim}, {spread}")  # fmt: skip
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.n_way, self.k_shot, self.q_query, self.dim, self.spread = n_way, k_shot, q_query, dim, spread
        self.seed, self.stream = seed, SPLITS.index(split)

    def episode(self, index: int) -> Episode:
        g = episode_generator(self.seed, index, self.stream)
        means = torch.randn(self.n_way, self.dim, generator=g)  # [n_way, dim]

        def points(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.arange(self.n_way).repeat_interleave(per_class)  # [n_way * per_class]
            noise = torch.randn(len(labels), self.dim, generator=g) * self.spread
            return means[labels] + noise, labels

        (sx, sy), (qx, qy) = points(self.k_shot), points(self.q_query)
        return Episode(sx, sy, qx, qy)


def blobs_task(n_way: int = 3, k_shot: int = 5, q_query: int = 10, dim: int = 8, spread: float = 0.7,
               seed: int = 0) -> TaskSplits:  # fmt: skip
    """Train / val / test samplers of Gaussian-cluster episodes (independent random streams)."""
    make = [BlobsSampler(n_way, k_shot, q_query, dim, spread, seed, split) for split in SPLITS]
    return TaskSplits(*make, loss="cross_entropy", metric="accuracy")

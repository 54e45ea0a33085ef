"""Synthetic task families."""

from __future__ import annotations

import math

import torch

from metaloss.errors import ConfigError
from metaloss.types import Episode
from tasks.base import SPLITS, TaskSplits, episode_generator


class SinusoidSampler:
    """Sinusoid regression of MAML (Finn et al. 2017, sec. 5.1).

    y = A sin(x - p), A ~ U[0.1, 5.0], p ~ U[0, pi], x ~ U[-5, 5];
    K support points and a separate set of query points from the same task.
    The zero predictor's expected MSE is E[A^2]/2 = (5^3 - 0.1^3) / (3 * 4.9) / 2 = 4.25.
    """

    def __init__(
        self,
        k_support: int = 10,
        k_query: int = 10,
        seed: int = 0,
        split: str = "train",
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        if k_support < 1 or k_query < 1:
            raise ConfigError(f"k_support and k_query must be >= 1, got {k_support} and {k_query}")
        for name, (lo, hi) in {"amplitude": amplitude, "phase": phase, "x_range": x_range}.items():
            if lo > hi:
                raise ConfigError(f"sinusoid {name} range is empty: [{lo}, {hi}]")
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.k_support, self.k_query, self.seed, self.stream = k_support, k_query, seed, SPLITS.index(split)
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def episode(self, index: int) -> Episode:
        g = episode_generator(self.seed, index, self.stream)

        def uniform(lo_hi: tuple[float, float], *shape: int) -> torch.Tensor:
            lo, hi = lo_hi
            return lo + (hi - lo) * torch.rand(*shape, generator=g)

        amp, phase = uniform(self.amplitude, 1), uniform(self.phase, 1)
        x = uniform(self.x_range, self.k_support + self.k_query, 1)  # [K + Q, 1]
        y = amp * torch.sin(x - phase)  # [K + Q, 1]
        k = self.k_support
        return Episode(x[:k], y[:k], x[k:], y[k:], {"amplitude": amp.item(), "phase": phase.item()})


def sinusoid_task(k_support: int = 10, k_query: int = 10, seed: int = 0) -> TaskSplits:
    """The sinusoid family with independent train / val / test task streams (held-out tasks)."""
    return TaskSplits(*(SinusoidSampler(k_support, k_query, seed=seed, split=split) for split in SPLITS), loss="mse")

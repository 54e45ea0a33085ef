"""The task-sampler contract.

A sampler is a random-access family of episodes: `episode(i)` is a pure
function of (the sampler's seed, i). Meta-training reads indices
[step * B, (step + 1) * B); meta-testing reads 0..N-1 of a sampler built on
held-out data or another seed, so two evaluations see the same tasks in any
order and any process split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metaloss.types import Episode, TaskSampler, sample_episodes

__all__ = ["Episode", "TaskSampler", "TaskSplits", "episode_generator", "sample_episodes"]

SPLITS = ("train", "val", "test")


def episode_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """An independent torch generator for episode `index` of a sampler seeded with `seed`;
    `stream` separates samplers that share a seed (train / val / test)."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class TaskSplits:
    """A task family's meta-train, meta-validation and meta-test samplers, and how to score it.

    loss: name of the task loss (`metaloss.losses`); metric: name of an extra query metric or None.
    A benchmark that only evaluates (e.g. the Omniglot one-shot runs) has train = val = None.
    """

    train: TaskSampler | None
    val: TaskSampler | None
    test: TaskSampler
    loss: str
    metric: str | None = None

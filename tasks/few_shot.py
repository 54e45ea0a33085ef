"""N-way K-shot Q-query classification episodes over any labelled tensor dataset."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.types import Episode
from tasks.base import SPLITS, episode_generator


def split_classes(classes: Sequence[int], fractions: Sequence[float], seed: int = 0) -> list[list[int]]:
    """Shuffle `classes` with `seed` and cut them into consecutive parts of the given fractions
    (e.g. (0.6, 0.2, 0.2) for train/val/test); the parts are disjoint and every class is used."""
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"class split fractions must be positive and sum to 1, got {list(fractions)}")
    order = np.random.default_rng(seed).permutation(np.asarray(sorted(set(classes))))
    bounds = np.round(np.cumsum([0.0, *fractions]) * len(order)).astype(int)
    parts = [sorted(order[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
    if any(not part for part in parts):
        raise ConfigError(f"{len(order)} classes cannot be split into non-empty parts {list(fractions)}")
    return parts


class FewShotSampler:
    """Episodes of `n_way` classes drawn from `classes`, relabelled 0..n_way-1 in random order,
    with `k_shot` support and `q_query` query examples per class, drawn without replacement.

    inputs: [N, *shape] (any dtype; floating point is kept, uint8 is scaled to [0, 1]);
    labels: [N] integer class ids; split: which of the train / val / test random streams to use.
    groups: class id -> group (e.g. Omniglot's alphabet): every episode first draws one group among
    those with at least n_way classes, then its n_way classes within it (Lake et al. 2015's
    within-alphabet one-shot runs); the classes of smaller groups are never drawn (a warning names
    them); None: the classes of an episode come from anywhere.
    augment: applied to the episode's images with the episode's generator (e.g. `tasks.augment.RandomAffine`).
    Support tensors are class-major: [n_way * k_shot, *shape].
    """

    def __init__(
        self,
        inputs: Tensor,
        labels: Tensor,
        classes: Sequence[int],
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        split: str = "train",
        groups: Mapping[int, str] | None = None,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        if n_way < 1 or k_shot < 1 or q_query < 0:
            raise ConfigError(f"need n_way >= 1, k_shot >= 1, q_query >= 0; got {n_way}, {k_shot}, {q_query}")
        if len(inputs) != len(labels):
            raise ConfigError(f"{len(inputs)} inputs but {len(labels)} labels")
        classes = sorted(set(int(c) for c in classes))
        if n_way > len(classes):
            raise ConfigError(f"n_way={n_way} but this split has only {len(classes)} classes")
        labels = torch.as_tensor(labels)
        self.by_class = {c: torch.nonzero(labels == c).flatten() for c in classes}
        short = {c: len(ix) for c, ix in self.by_class.items() if len(ix) < k_shot + q_query}
        if short:
            c, n = next(iter(short.items()))
            raise ConfigError(
                f"k_shot + q_query = {k_shot + q_query} examples per class are needed, but class {c} has {n}"
                f" ({len(short)} classes are too small)"
            )
        self.inputs, self.classes = inputs, classes
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.n_way, self.k_shot, self.q_query, self.seed = n_way, k_shot, q_query, seed
        self.stream = SPLITS.index(split)  # train / val / test draw from independent streams
        self.augment = augment
        self.groups: list[list[int]] | None = None  # per eligible group: positions in self.classes
        if groups is not None:
            members: dict[str, list[int]] = {}
            for position, c in enumerate(classes):
                members.setdefault(str(groups[c]), []).append(position)
            self.groups = [members[name] for name in sorted(members) if len(members[name]) >= n_way]
            if not self.groups:
                largest = max(len(m) for m in members.values())
                raise ConfigError(f"within-group episodes of n_way={n_way} need a group (alphabet) with {n_way} "
                                  f"classes; the largest in the {split} split has {largest}")  # fmt: skip
            small = [f"{name} ({len(members[name])})" for name in sorted(members) if len(members[name]) < n_way]
            if small:  # e.g. Omniglot's Tagalog (17 characters) in 20-way within-alphabet episodes
                left_out = sum(len(members[name]) for name in members if len(members[name]) < n_way)
                warnings.warn(f"within-group {n_way}-way episodes of the {split} split never draw the {left_out} "
                              f"classes of its {len(small)} group(s) with fewer than {n_way}: "
                              f"{', '.join(small[:8])}{', ...' if len(small) > 8 else ''}", stacklevel=2)  # fmt: skip

    def _images(self, index: Tensor) -> Tensor:
        x = self.inputs[index]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def episode(self, index: int) -> Episode:
        g = episode_generator(self.seed, index, self.stream)
        if self.groups is None:
            chosen = torch.randperm(len(self.classes), generator=g)[: self.n_way]  # position = new label
        else:  # one group, then n_way of its classes
            group = torch.tensor(self.groups[int(torch.randint(len(self.groups), (1,), generator=g))])
            chosen = group[torch.randperm(len(group), generator=g)[: self.n_way]]
        support, query = [], []
        for c in chosen.tolist():
            pool = self.by_class[self.classes[c]]
            picked = pool[torch.randperm(len(pool), generator=g)[: self.k_shot + self.q_query]]
            support.append(picked[: self.k_shot])
            query.append(picked[self.k_shot :])
        labels = torch.arange(self.n_way)
        support_x, query_x = self._images(torch.cat(support)), self._images(torch.cat(query))
        if self.augment is not None:
            support_x, query_x = self.augment(support_x, g), self.augment(query_x, g)
        return Episode(
            support_x=support_x,  # [n_way * k_shot, *shape]
            support_y=labels.repeat_interleave(self.k_shot),  # [n_way * k_shot]
            query_x=query_x,  # [n_way * q_query, *shape]
            query_y=labels.repeat_interleave(self.q_query),  # [n_way * q_query]
            meta={"classes": [self.classes[c] for c in chosen.tolist()]},
        )

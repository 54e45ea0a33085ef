"""Noisy-label data: seeded label-noise injection for any labelled dataset, a clean meta set split off
before the noise, and the hidden truth (true labels, noise mask) kept apart from what a method sees.

    y_noisy ~ T(y_true, x),   T[i, j] = P(y_noisy = j | y_true = i)   (realised: counted, `transition`)

Noise types (`rate` = r in [0, 1)):
- symmetric: with probability r the label is replaced by a *different* class drawn uniformly, so the
  realised flip rate is r (Co-teaching, SCE and APL's convention; T = (1-r) I + r/(C-1) (11' - I));
- uniform: with probability r the label is redrawn from all C classes, the true one included (MW-Net's
  and GLC's code), so the flip rate is r (C-1)/C;
- pair: with probability r, class c goes to pair_map[c] ("next": c -> c+1 mod C; "cifar10": truck ->
  automobile, bird -> airplane, deer -> horse, cat <-> dog, the other classes kept; or an explicit map);
- instance: instance-dependent noise (Xia et al. 2020, "Part-dependent label noise"): a flip rate q_n
  per sample from N(r, 0.1^2) truncated to [0, 1], and the flip target from softmax(x_n W_{y_n}) over
  the other classes, W a fixed random projection [C, d, C]; the mean flip rate is about r.

A method reads `NoisyLabelData` (the noisy training set, the clean meta set, the test set); the truth
(`NoiseTruth`: true labels and the noise mask of the training rows) is for analysis metrics only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.types import Episode
from tasks.base import episode_generator
from tasks.classification import LabelledData

NOISE_TYPES = ("none", "symmetric", "uniform", "pair", "instance")
CIFAR10_PAIRS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, bird->airplane, deer->horse, cat<->dog
PairMap = Union[str, Mapping[int, int]]

_NOISE_STREAM, _META_STREAM, _PROJECTION_STREAM = 11, 12, 13  # generators independent of each other


def pair_map_of(pair_map: PairMap, n_classes: int) -> dict[int, int]:
    """A pair map as {class: target class}: "next", "cifar10" or an explicit mapping."""
    if pair_map == "next":
        return {c: (c + 1) % n_classes for c in range(n_classes)}
    if pair_map == "cifar10":
        if n_classes != 10:
            raise ConfigError(f"the cifar10 pair map is for 10 classes, this data has {n_classes}")
        return dict(CIFAR10_PAIRS)
    if isinstance(pair_map, str) or not isinstance(pair_map, Mapping):
        raise ConfigError(f"pair_map must be 'next', 'cifar10' or a {{class: class}} mapping, got {pair_map!r}")
    out = {int(k): int(v) for k, v in pair_map.items()}
    missing = sorted(c for c in (*out, *out.values()) if not 0 <= c < n_classes)
    if missing:
        raise ConfigError(f"pair_map names classes {missing}, but the data has classes 0..{n_classes - 1}")
    if any(k == v for k, v in out.items()):
        raise ConfigError(f"pair_map maps a class to itself: {out}")
    return out


def check_noise(kind: str, rate: float) -> None:
    if kind not in NOISE_TYPES:
        raise ConfigError(f"unknown noise type {kind!r}; expected one of {', '.join(NOISE_TYPES)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"noise rate must be in [0, 1), got {rate!r}")


def transition_matrix(y_true: Tensor, y_noisy: Tensor, n_classes: int) -> Tensor:
    """The realised T [C, C]: T[i, j] = #(true i, noisy j) / #(true i) (a row of zeros for an absent class)."""
    counts = torch.zeros(n_classes, n_classes, dtype=torch.float64)
    counts.index_put_((y_true, y_noisy), torch.ones(len(y_true), dtype=torch.float64), accumulate=True)
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def inject_noise(y: Tensor, n_classes: int, kind: str, rate: float, seed: int, x: Tensor | None = None,
                 pair_map: PairMap = "next") -> Tensor:  # fmt: skip
    """Noisy labels [N] for true labels y [N] (inputs x [N, ...] for instance noise), a pure function
    of (y, x, kind, rate, pair_map, seed)."""
    check_noise(kind, rate)
    g = episode_generator(seed, 0, _NOISE_STREAM)
    n = len(y)
    if kind == "none" or rate == 0:
        return y.clone()
    if kind in ("symmetric", "uniform", "pair"):
        flip = torch.rand(n, generator=g) < rate  # [N]
        if kind == "symmetric":  # a different class: y + 1 + U{0 .. C-2} mod C
            other = (y + 1 + torch.randint(n_classes - 1, (n,), generator=g)) % n_classes
        elif kind == "uniform":
            other = torch.randint(n_classes, (n,), generator=g)
        else:
            table = torch.arange(n_classes)
            for c, target in pair_map_of(pair_map, n_classes).items():
                table[c] = target
            other = table[y]
        return torch.where(flip, other, y)
    if x is None:
        raise ConfigError("instance-dependent noise needs the inputs x")
    features = x.reshape(n, -1).double()  # [N, d]
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gp = episode_generator(seed, 0, _PROJECTION_STREAM)
    projection = torch.randn(n_classes, features.shape[1], n_classes, generator=gp, dtype=torch.float64)  # [C, d, C]
    q = (rate + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(0, 1)  # [N] per-sample flip rates
    for _ in range(100):  # truncate to [0, 1] by resampling the clipped draws
        out = (q <= 0) | (q >= 1)
        if not out.any():
            break
        q[out] = rate + 0.1 * torch.randn(int(out.sum()), generator=g, dtype=torch.float64)
    q = q.clamp(0, 1)
    scores = torch.einsum("nd,ndc->nc", features, projection[y])  # [N, C]
    scores[torch.arange(n), y] = -torch.inf
    probs = q[:, None] * torch.softmax(scores, dim=1)  # [N, C]: the other classes share q_n
    probs[torch.arange(n), y] = 1 - q
    return torch.multinomial(probs, 1, generator=g).squeeze(1)


def split_meta(y: Tensor, n_classes: int, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """(meta rows, training rows): `per_class` rows of every class (by the true label) drawn with
    `seed` for a clean meta set, the rest for training; disjoint, both sorted."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
        raise ConfigError(f"meta_per_class must be an int >= 0, got {per_class!r}")
    g = episode_generator(seed, 0, _META_STREAM)
    meta = []
    for c in range(n_classes):
        rows = (y == c).nonzero().squeeze(1)
        if per_class >= len(rows):
            raise ConfigError(f"meta_per_class={per_class} takes all of class {c} ({len(rows)} rows): nothing "
                              "of it would be left to train on")  # fmt: skip
        meta.append(rows[torch.randperm(len(rows), generator=g)[:per_class]])
    meta_rows = torch.cat(meta).sort().values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[meta_rows] = False
    return meta_rows, keep.nonzero().squeeze(1)


@dataclass
class NoiseTruth:
    """What no method may read: the true labels of the noisy training rows and which were flipped.
    For analysis metrics (mean weight of clean and noisy rows, AUC) and the realised noise."""

    y_true: Tensor  # [N] true labels of the training rows
    is_noisy: Tensor  # [N] bool: the observed label differs from the true one
    transition: Tensor  # [C, C] realised T

    @property
    def noise_rate(self) -> float:
        return float(self.is_noisy.float().mean())


@dataclass
class NoisyLabelData:
    """What a method sees: the training set with noisy labels, the clean meta set, the test set."""

    name: str
    x_train: Tensor  # [N, ...]
    y_train: Tensor  # [N] noisy labels
    x_meta: Tensor  # [M, ...] clean meta set (M = meta_per_class * C)
    y_meta: Tensor  # [M]
    x_test: Tensor
    y_test: Tensor
    n_classes: int

    @property
    def in_features(self) -> int:
        return int(self.x_train[0].numel())

    @property
    def unlabelled(self) -> bool:
        """Whether the training rows carry no labels (a semi-supervised task, `tasks.semisup`)."""
        return bool(len(self.y_train)) and bool((self.y_train < 0).all())


def make_noisy(data: LabelledData, kind: str = "symmetric", rate: float = 0.4, meta_per_class: int = 10,
               seed: int = 0, pair_map: PairMap = "next") -> tuple[NoisyLabelData, NoiseTruth]:  # fmt: skip
    """Split a clean meta set off `data`'s training set, inject noise into the rest, and return what a
    method sees and, apart, the hidden truth. Bad settings raise `ConfigError` before any work."""
    check_noise(kind, rate)
    if kind == "pair":
        pair_map_of(pair_map, data.n_classes)
    meta_rows, train_rows = split_meta(data.y_train, data.n_classes, meta_per_class, seed)
    x, y = data.x_train[train_rows], data.y_train[train_rows]
    noisy = inject_noise(y, data.n_classes, kind, rate, seed, x=x, pair_map=pair_map)
    seen = NoisyLabelData(f"{data.name}_{kind}{rate:g}", x, noisy, data.x_train[meta_rows], data.y_train[meta_rows],
                          data.x_test, data.y_test, data.n_classes)  # fmt: skip
    return seen, NoiseTruth(y, noisy != y, transition_matrix(y, noisy, data.n_classes))


TRAIN_ON = ("noisy", "meta")


@dataclass
class NoisyLabelTask:
    """A noisy-label training run, the online regime's task: one model trained for `epochs` epochs
    of minibatches of `batch_size` on the noisy training set (train_on="meta": on the clean meta set
    alone, the same number of steps, a baseline), phi updated from look-aheads scored on
    `meta_batch_size` rows of the clean meta set (None: all of it), or (meta_source="train") on the
    noisy rows the weighting ranks highest among `select_factor` times as many. `real_step` is the
    look-ahead order of `metaloss.lookahead.LookaheadTraining`. `average` > 0: the trained model is the
    exponential moving average of the iterates with that decay (`metaloss.inner.optim.averaged`), the
    last iterate reported beside it. `truth` is for analysis metrics only."""

    online = True  # a task of the online regime (scripts/online_task.py), not a sampler of episodes
    data: NoisyLabelData
    truth: NoiseTruth
    batch_size: int = 128
    epochs: int = 8
    meta_batch_size: int | None = 100
    train_on: str = "noisy"
    real_step: str = "after_update"
    meta_source: str = "meta"
    select_factor: int = 4
    average: float = 0.0
    loss: str = "cross_entropy"
    metric: str | None = "accuracy"

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"task.train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if self.batch_size < 1 or self.batch_size > len(self.data.y_train) or self.epochs < 1:
            raise ConfigError(f"need 1 <= task.batch_size <= {len(self.data.y_train)} training rows and "
                              f"task.epochs >= 1, got {self.batch_size} and {self.epochs}")  # fmt: skip
        if isinstance(self.average, bool) or not isinstance(self.average, (int, float)) or not 0 <= self.average < 1:
            raise ConfigError(f"task.average (the decay of the iterates' moving average) must be in [0, 1), got "
                              f"{self.average!r}")  # fmt: skip
        if self.meta_batch_size is not None and self.meta_batch_size < 1:
            raise ConfigError(f"task.meta_batch_size must be >= 1 or null, got {self.meta_batch_size}")
        if len(self.data.y_meta) == 0 and (self.meta_source == "meta" or self.train_on == "meta"):
            raise ConfigError("look-aheads scored on the meta set and train_on=meta need a clean meta set: "
                              "task.meta_per_class >= 1 (or meta_source=train, STORM-style)")  # fmt: skip

    @property
    def steps_per_epoch(self) -> int:
        """Minibatches per epoch of the noisy training set (the last incomplete one dropped)."""
        return len(self.data.y_train) // self.batch_size

    @property
    def horizon(self) -> int:
        """Training steps in the run, the same whatever `train_on` is."""
        return self.epochs * self.steps_per_epoch

    @property
    def inner_batch_size(self) -> int:
        return min(self.batch_size, len(self.episode().support_y))

    def episode(self) -> Episode:
        """support: the rows trained on (noisy labels, or the clean meta set); query: the meta set."""
        d = self.data
        if self.train_on == "meta":
            return Episode(d.x_meta, d.y_meta, d.x_meta, d.y_meta)
        return Episode(d.x_train, d.y_train, d.x_meta, d.y_meta)


def noisy_label_task(data: LabelledData, noise: Mapping[str, Any] | None = None, meta_per_class: int = 10,
                     seed: int = 0, **settings: Any) -> NoisyLabelTask:  # fmt: skip
    """`data` with a clean meta set split off and noise injected (noise: {type, rate, pair_map}),
    as a `NoisyLabelTask` (its other fields in `settings`)."""
    noise = dict(noise or {})
    unknown = sorted(set(noise) - {"type", "rate", "pair_map"})
    if unknown:
        raise ConfigError(f"unknown task.noise keys {unknown}; expected type, rate, pair_map")
    pair_map = noise.get("pair_map", "next")
    pair_map = dict(pair_map) if isinstance(pair_map, Mapping) else pair_map
    seen, truth = make_noisy(data, noise.get("type", "symmetric"), noise.get("rate", 0.4), meta_per_class, seed,
                             pair_map)  # fmt: skip
    settings.pop("n_way", None)  # read by configs (the model's width, plots), not by the task
    return NoisyLabelTask(seen, truth, **settings)

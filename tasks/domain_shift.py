"""Domain-labelled data and leave-one-domain-out splits (domain generalisation: train on source domains,
test on a domain never seen). Readers stay in `tasks/datasets/`; this module holds what is common:

- `DomainData`: rows grouped by domain, one label space;
- `rotated_domains`: DomainBed's RotatedMNIST protocol (Gulrajani & Lopez-Paz 2021) for any image set:
  all rows shuffled with the seed and dealt round-robin to the domains, the rows of the domain at
  angle a rotated by a degrees (counter-clockwise, bilinear, zero fill);
- `leave_one_domain_out`: the source domains, each split into a training and a validation part
  (DomainBed's `holdout_fraction`, 20 %), and the held-out test domain (also split, for the test-domain
  oracle of model selection, reported apart). No row of the test domain is in a source part;
- `DomainEpisodes`: training episodes drawn from the source domains' training parts only (ERM, MLDG and
  MAML over domains, Fish);
- `TargetFewShotEpisodes` and `TestTimeEpisodes`: evaluation episodes on the held-out domain, few-shot
  adaptation (k labelled rows per class of its oracle part, queries from the rest) and test-time
  adaptation (an unlabelled batch, then its labels for scoring); `TargetAdaptation` says how the
  trained model adapts on them (scripts/domain_task.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.types import Episode
from tasks.base import episode_generator

ROTATED_ANGLES = (0, 15, 30, 45, 60, 75)  # DomainBed's RotatedMNIST
EPISODE_MODES = ("erm", "mldg", "fish")
_DEAL_STREAM, _HOLDOUT_STREAM, _EPISODE_STREAM, _TARGET_STREAM = 21, 22, 23, 24
UNLABELLED = -1


@dataclass
class DomainData:
    """x[d] [N_d, ...] and y[d] [N_d] (class indices in one label space of n_classes) of the domain
    named domains[d]."""

    name: str
    domains: list[str]
    x: list[Tensor]
    y: list[Tensor]
    n_classes: int

    def __post_init__(self) -> None:
        if len(self.domains) != len(self.x) or len(self.x) != len(self.y):
            raise ConfigError(f"{self.name}: {len(self.domains)} domain names for {len(self.x)} domains of inputs "
                              f"and {len(self.y)} of labels")  # fmt: skip
        empty = [name for name, y in zip(self.domains, self.y) if len(y) == 0]
        if empty:
            raise ConfigError(f"{self.name}: domain(s) {empty} have no samples")

    def index(self, domain: str | int) -> int:
        """The position of the domain called `domain` (names are compared as strings: 75 and "75")."""
        name = str(domain)
        if name not in self.domains:
            raise ConfigError(f"unknown test domain {name!r} of {self.name}; its domains are {', '.join(self.domains)}")
        return self.domains.index(name)


def rotate_images(images: Tensor, degrees: float) -> Tensor:
    """images [N, H, W] or [N, C, H, W] rotated by `degrees` counter-clockwise about the image centre,
    bilinear, zero outside the image (torchvision's `rotate(..., fill=0)` with bilinear interpolation;
    90 degrees is `torch.rot90(images, 1, (-2, -1))`)."""
    if degrees % 360 == 0:
        return images.clone()
    flat = images.unsqueeze(1) if images.dim() == 3 else images  # [N, C, H, W]
    a = math.radians(degrees)
    h, w = flat.shape[-2:]
    # output pixel (x, y), normalised to [-1, 1] with y down, samples the input at R(-a) (x, y)
    theta = torch.tensor([[math.cos(a), -math.sin(a) * h / w, 0.0], [math.sin(a) * w / h, math.cos(a), 0.0]],
                         dtype=flat.dtype)  # fmt: skip
    grid = F.affine_grid(theta.expand(len(flat), 2, 3), list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1) if images.dim() == 3 else out


def rotated_domains(name: str, images: Tensor, labels: Tensor, n_classes: int,
                    angles: Sequence[float] = ROTATED_ANGLES, seed: int = 0) -> DomainData:  # fmt: skip
    """DomainBed's rotated-domains protocol on images [N, H, W] (or [N, C, H, W]): rows shuffled with
    `seed` and dealt round-robin to len(angles) domains; domain d rotated by angles[d]."""
    if not angles:
        raise ConfigError("a rotated-domains dataset needs at least one angle")
    order = torch.randperm(len(labels), generator=episode_generator(seed, 0, _DEAL_STREAM))
    xs, ys = [], []
    for d, angle in enumerate(angles):
        rows = order[d :: len(angles)]
        xs.append(rotate_images(images[rows], float(angle)))
        ys.append(labels[rows])
    return DomainData(name, [f"{a:g}" for a in angles], xs, ys, n_classes)


@dataclass
class DomainSplit:
    """Leave-one-domain-out: per source domain its training and validation rows, and the test domain's
    rows (all of them for the test accuracy; `test_select` / `test_eval`: the oracle's split)."""

    data: DomainData
    test_domain: int
    sources: list[int]
    train: list[tuple[Tensor, Tensor]]  # per source domain (x, y)
    val: list[tuple[Tensor, Tensor]]  # per source domain (x, y)
    test: tuple[Tensor, Tensor]
    test_select: tuple[Tensor, Tensor]  # the test domain's holdout part: the oracle selects on it
    test_eval: tuple[Tensor, Tensor]  # the rest of the test domain

    @property
    def source_names(self) -> list[str]:
        return [self.data.domains[d] for d in self.sources]


def holdout_rows(n: int, fraction: float, seed: int, domain: int) -> tuple[Tensor, Tensor]:
    """(kept rows, held-out rows) of a domain of n rows: a `fraction` held out at random (seed, domain)."""
    order = torch.randperm(n, generator=episode_generator(seed, domain, _HOLDOUT_STREAM))
    cut = int(round(n * fraction))
    return order[cut:].sort().values, order[:cut].sort().values


def leave_one_domain_out(data: DomainData, test_domain: str | int, holdout_fraction: float = 0.2,
                         seed: int = 0) -> DomainSplit:  # fmt: skip
    """The split with `test_domain` (a name) held out (see the module docstring)."""
    if not 0 < holdout_fraction < 1:
        raise ConfigError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if len(data.domains) < 2:
        raise ConfigError(f"{data.name} has one domain: leaving it out leaves nothing to train on")
    test = data.index(test_domain)
    sources = [d for d in range(len(data.domains)) if d != test]
    train, val = [], []
    for d in sources:
        keep, hold = holdout_rows(len(data.y[d]), holdout_fraction, seed, d)
        if len(keep) == 0 or len(hold) == 0:
            raise ConfigError(f"domain {data.domains[d]!r} of {data.name} has too few samples ({len(data.y[d])}) to "
                              f"hold out {holdout_fraction:g} of them for validation")  # fmt: skip
        train.append((data.x[d][keep], data.y[d][keep]))
        val.append((data.x[d][hold], data.y[d][hold]))
    keep, hold = holdout_rows(len(data.y[test]), holdout_fraction, seed, test)
    x, y = data.x[test], data.y[test]
    return DomainSplit(data, test, sources, train, val, (x, y), (x[hold], y[hold]), (x[keep], y[keep]))


class DomainEpisodes:
    """Episodes of `batch_size` rows from the training part of every source domain of `split`, drawn
    anew for each index (a pure function of (seed, index)). The episode's meta records which domains
    played which part. mode:

    - "erm": support = query = the batches of all source domains together;
    - "mldg" (MLDG, Li et al. 2018; MAML over domains): `meta_test_domains` source domains drawn per
      episode give the query set (virtual test domains), the others the support set;
    - "fish" (Shi et al. 2022): support = the batches one domain after another, in an order drawn per
      episode, so that an inner loop with inner_batch_size = batch_size takes one step per domain;
      query = all of them.
    """

    def __init__(self, split: DomainSplit, batch_size: int = 64, mode: str = "erm", meta_test_domains: int = 1,
                 seed: int = 0) -> None:  # fmt: skip
        if mode not in EPISODE_MODES:
            raise ConfigError(f"unknown domain episode mode {mode!r}; expected one of {EPISODE_MODES}")
        if batch_size < 1:
            raise ConfigError(f"task.batch_size must be >= 1, got {batch_size}")
        if mode == "mldg" and not 1 <= meta_test_domains < len(split.sources):
            raise ConfigError(f"MLDG needs 1 <= meta_test_domains < {len(split.sources)} source domains, got "
                              f"{meta_test_domains}")  # fmt: skip
        self.split, self.batch_size, self.mode = split, batch_size, mode
        self.meta_test_domains, self.seed = meta_test_domains, seed

    def episode(self, index: int) -> Episode:
        g = episode_generator(self.seed, index, _EPISODE_STREAM)
        batches = []
        for x, y in self.split.train:
            rows = torch.randint(len(y), (self.batch_size,), generator=g)  # with replacement, like DomainBed's
            batches.append((x[rows], y[rows]))
        order = torch.randperm(len(batches), generator=g).tolist()
        names = self.split.source_names
        everything = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        if self.mode == "erm":
            return Episode(*everything, *everything, {"domains": names})
        if self.mode == "fish":
            sequence = [batches[d] for d in order]
            support = (torch.cat([b[0] for b in sequence]), torch.cat([b[1] for b in sequence]))
            return Episode(*support, *everything, {"domain_order": [names[d] for d in order]})
        test, train = sorted(order[: self.meta_test_domains]), sorted(order[self.meta_test_domains :])
        pick = lambda ds, k: torch.cat([batches[d][k] for d in ds])  # noqa: E731
        return Episode(pick(train, 0), pick(train, 1), pick(test, 0), pick(test, 1),
                       {"meta_train": [names[d] for d in train], "meta_test": [names[d] for d in test]})  # fmt: skip


class TargetFewShotEpisodes:
    """Few-shot adaptation to the held-out domain: `k_shot` labelled rows of each of `n_way` classes
    drawn from the test domain's select part (the support set) and `q_query` rows of the same classes
    from its eval part (the query set), disjoint by construction; a pure function of (seed, index).
    Labels 0..n_way-1 in the order drawn (`relabel`, for a fresh head), or the classes' own indices
    (for the model trained on the source domains, whose head already knows them)."""

    def __init__(self, split: DomainSplit, n_way: int, k_shot: int = 1, q_query: int = 5, seed: int = 0,
                 relabel: bool = True) -> None:  # fmt: skip
        (_, ys), (_, ye) = split.test_select, split.test_eval
        classes = sorted(set(ys.tolist()) & set(ye.tolist()))
        usable = [c for c in classes if int((ys == c).sum()) >= k_shot and int((ye == c).sum()) >= q_query]
        if n_way < 2 or k_shot < 1 or q_query < 1 or len(usable) < n_way:
            raise ConfigError(f"few-shot target episodes need n_way >= 2, k_shot >= 1, q_query >= 1 and n_way "
                              f"classes with k_shot and q_query rows in the test domain's parts; got {n_way}, "
                              f"{k_shot}, {q_query} and {len(usable)} such classes")  # fmt: skip
        self.split, self.classes, self.n_way, self.k_shot, self.q_query, self.seed = (
            split, usable, n_way, k_shot, q_query, seed)  # fmt: skip
        self.relabel = relabel

    def episode(self, index: int) -> Episode:
        g = episode_generator(self.seed, index, _TARGET_STREAM)
        chosen = [self.classes[i] for i in torch.randperm(len(self.classes), generator=g)[: self.n_way].tolist()]
        parts = []
        for (x, y), count in ((self.split.test_select, self.k_shot), (self.split.test_eval, self.q_query)):
            rows = [torch.nonzero(y == c).squeeze(1) for c in chosen]
            picked = [r[torch.randperm(len(r), generator=g)[:count]] for r in rows]
            labels = torch.cat([torch.full((count,), i if self.relabel else c) for i, c in enumerate(chosen)])
            parts.append((x[torch.cat(picked)], labels))
        return Episode(*parts[0], *parts[1], {"classes": chosen})


class TestTimeEpisodes:
    """Test-time adaptation on the held-out domain: `batch_size` rows of the test domain, the support set
    unlabelled (labels UNLABELLED: an inner loss that reads no labels, e.g. entropy, adapts on it) and
    the same rows with their labels as the query set (scored after adaptation)."""

    def __init__(self, split: DomainSplit, batch_size: int = 64, seed: int = 0) -> None:
        if batch_size < 1:
            raise ConfigError(f"test-time episodes need batch_size >= 1, got {batch_size}")
        self.split, self.batch_size, self.seed = split, batch_size, seed

    def episode(self, index: int) -> Episode:
        x, y = self.split.test
        rows = torch.randperm(len(y), generator=episode_generator(self.seed, index, _TARGET_STREAM + 1))
        rows = rows[: self.batch_size]
        return Episode(x[rows], torch.full_like(y[rows], UNLABELLED), x[rows], y[rows])


ADAPTED_PARAMETERS = ("all", "norm")


@dataclass
class TargetAdaptation:
    """How the trained model adapts to the held-out domain, scored on `episodes` episodes of each kind
    (scripts/domain_task.py): few-shot (`steps` SGD steps of size `lr` on the cross-entropy of k labelled
    rows per class, then the query rows) and test-time (the same steps on the prediction entropy of an
    unlabelled batch, Tent, Wang et al. 2021, then that batch's labels), adapting every parameter or
    only the normalisation layers' (`test_time_parameters="norm"`, as Tent)."""

    few_shot: TargetFewShotEpisodes
    test_time: TestTimeEpisodes
    episodes: int = 10
    steps: int = 10
    lr: float = 0.01
    test_time_parameters: str = "all"


def target_adaptation(split: DomainSplit, episodes: int = 0, k_shot: int = 5, q_query: int = 15,
                      test_time_batch: int = 64, steps: int = 10, lr: float = 0.01,
                      test_time_parameters: str = "all", seed: int = 0) -> TargetAdaptation | None:  # fmt: skip
    """The adaptation episodes on `split`'s test domain (every class in few-shot episodes), or None for
    `episodes=0`."""
    if episodes < 0 or steps < 0 or lr < 0:
        raise ConfigError(f"task.adaptation needs episodes, steps and lr >= 0, got {episodes}, {steps}, {lr}")
    if test_time_parameters not in ADAPTED_PARAMETERS:
        raise ConfigError(f"task.adaptation.test_time_parameters must be one of {ADAPTED_PARAMETERS}, got "
                          f"{test_time_parameters!r}")  # fmt: skip
    if episodes == 0:
        return None
    few_shot = TargetFewShotEpisodes(split, split.data.n_classes, k_shot, q_query, seed, relabel=False)
    return TargetAdaptation(few_shot, TestTimeEpisodes(split, test_time_batch, seed), episodes, steps, lr,
                            test_time_parameters)  # fmt: skip


@dataclass
class DomainTask:
    """A domain-generalisation run of the episodic regime (scripts/domain_task.py): the meta-parameters
    are trained on `train` episodes of the source domains and the model is scored on every source
    domain's validation part and on the held-out test domain: a learned initialisation (the model
    itself) as it is, anything else (e.g. a learned loss) after `eval_steps` minibatch steps of the
    inner loop on the source domains' training parts from the problem's initialisation."""

    domains = True  # marks the task for meta_train.py
    split: DomainSplit
    train: DomainEpisodes
    loss: str = "cross_entropy"
    metric: str | None = "accuracy"
    eval_steps: int = 300  # a learned loss (not a learned initialisation): training steps before scoring
    adaptation: TargetAdaptation | None = None  # adaptation to the test domain, scored after training


def domain_task(data: DomainData, test_domain: str | int, episodes: str = "erm", batch_size: int = 64,
                meta_test_domains: int = 1, holdout_fraction: float = 0.2, seed: int = 0, flatten: bool = True,
                eval_steps: int = 300, n_way: int | None = None,
                adaptation: Mapping[str, Any] | None = None) -> DomainTask:  # fmt: skip
    """`data` with `test_domain` left out and training episodes of kind `episodes` (see DomainEpisodes);
    adaptation: the arguments of `target_adaptation` (few-shot and test-time episodes on the test
    domain, scored after training; none by default). flatten: the inputs as flat vectors (for an MLP);
    else grey images [n, h, w] get their one channel ([n, 1, h, w], for a CNN). n_way: the model's
    width in the configs, checked against the data's classes."""
    if flatten:
        data = DomainData(data.name, data.domains, [x.flatten(1) for x in data.x], data.y, data.n_classes)
    elif data.x[0].dim() == 3:
        data = DomainData(data.name, data.domains, [x.unsqueeze(1) for x in data.x], data.y, data.n_classes)
    split = leave_one_domain_out(data, test_domain, holdout_fraction, seed)
    if eval_steps < 1:
        raise ConfigError(f"task.eval_steps must be >= 1, got {eval_steps}")
    if n_way is not None and n_way != data.n_classes:
        raise ConfigError(f"{data.name} has {data.n_classes} classes but task.n_way (the model's width) is {n_way}")
    adapt = target_adaptation(split, **{"seed": seed, **(adaptation or {})})
    return DomainTask(split, DomainEpisodes(split, batch_size, episodes, meta_test_domains, seed),
                      eval_steps=eval_steps, adaptation=adapt)  # fmt: skip

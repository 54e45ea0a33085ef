"""Domain-labelled data and leave-one-domain-out splits (domain generalisation: train on source domains,
test on a domain never seen). Readers stay in `tasks/datasets/`; this module holds what is common:

- `DomainData`: rows grouped by domain, one label space;
- `rotated_domains`: DomainBed's RotatedMNIST protocol (Gulrajani & Lopez-Paz 2021) for any image set:
  all rows shuffled with the seed and dealt round-robin to the domains, the rows of the domain at
  angle a rotated by a degrees (counter-clockwise, bilinear, zero fill);
- `leave_one_domain_out`: the source domains, each split into a training and a validation part
  (DomainBed's `holdout_fraction`, 20 %), and the held-out test domain (also split, for the test-domain
  oracle of model selection, reported apart). No row of the test domain is in a source part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metaloss.errors import ConfigError
from tasks.base import episode_generator

ROTATED_ANGLES = (0, 15, 30, 45, 60, 75)  # DomainBed's RotatedMNIST
_DEAL_STREAM, _HOLDOUT_STREAM = 21, 22


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

"""Image augmentation for episode samplers: seeded by the episode's generator, so an episode stays a pure
function of (seed, index)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metaloss.errors import ConfigError


@dataclass
class RandomAffine:
    """A small random affine transform per image (rotation within +-degrees, shear within +-shear
    degrees along x, scale in [1 - scale, 1 + scale], translation within +-translate of the size),
    bilinear, zero fill: the "small affine transforms" of Omniglot training (e.g. Koch et al. 2015's
    siamese networks). images: [n, C, H, W] floating point -> the same shape."""

    degrees: float = 10.0
    shear: float = 10.0
    scale: float = 0.1
    translate: float = 0.1

    def __post_init__(self) -> None:
        if min(self.degrees, self.shear, self.scale, self.translate) < 0 or self.scale >= 1:
            raise ConfigError(f"affine augmentation needs degrees, shear, translate >= 0 and 0 <= scale < 1, got "
                              f"{self}")  # fmt: skip

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        n = len(images)
        u = torch.rand(n, 5, generator=generator, dtype=torch.float64) * 2 - 1  # [n, 5] in [-1, 1)
        angle, shear = u[:, 0] * math.radians(self.degrees), u[:, 1] * math.radians(self.shear)
        zoom, shift = 1 + u[:, 2] * self.scale, u[:, 3:] * 2 * self.translate  # shift in [-1, 1] grid units
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        # the output-to-input map of grid_sample: rotation @ shear, divided by the zoom, then shifted
        theta = torch.stack([torch.stack([cos, cos * tan - sin, shift[:, 0]], 1),
                             torch.stack([sin, sin * tan + cos, shift[:, 1]], 1)], 1)  # fmt: skip  # [n, 2, 3]
        theta[:, :, :2] /= zoom[:, None, None]
        grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

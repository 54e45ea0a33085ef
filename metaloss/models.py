"""Backbones used by the few-shot and regression tasks. Each is head(body(x)), and `split()` names
the two submodules, so head-only adaptation (ANIL) is the config `adapt: [head]` and the inner loop
can compute the body's features once per episode (`BilevelProblem.reuse_features`). `ShapedSine`,
a one-parameter model, has no such split."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaloss.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Fully connected network (ReLU or tanh); MAML's sinusoid model is MLP(1, [40, 40], 1), the
    MNIST-1D paper's learning-rate experiment uses MLP(40, [50], 10, "tanh")."""

    def __init__(
        self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden):
            raise ConfigError(f"MLP sizes must be positive: in={in_features} hidden={list(hidden)} out={out_features}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:  # x: [n, in_features] -> [n, out_features]
        return self.head(self.body(x))

    def split(self) -> tuple[str, str]:
        """(body, head) submodule names: forward(x) = head(body(x))."""
        return "body", "head"


class PerStepBatchNorm2d(nn.Module):
    """BatchNorm with one affine pair per inner step: MAML++'s per-step BatchNorm weights and biases
    (BNWB; Antoniou et al. 2019, "How to train your MAML"). Normalises with the statistics of the
    batch it is given (the transductive policy; no running statistics), then

        y = gamma_k * (x - mean) / sqrt(var + eps) + beta_k,   k = min(step, K - 1),

    with step None (the query after adaptation) using the last pair, K - 1. With K = T + 1 for T
    training inner steps, every support step and the query have their own pair; evaluation with more
    steps reuses the last one."""

    takes_step = True

    def __init__(self, channels: int, steps: int, eps: float = 1e-5) -> None:
        super().__init__()
        if steps < 1:
            raise ConfigError(f"per-step BatchNorm needs >= 1 step, got {steps}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(steps, channels))  # [K, C]
        self.bias = nn.Parameter(torch.zeros(steps, channels))  # [K, C]

    def forward(self, x: Tensor, step: int | None = None) -> Tensor:  # x: [n, C, H, W]
        last = self.weight.shape[0] - 1
        k = last if step is None else min(step, last)
        return F.batch_norm(x, None, None, self.weight[k], self.bias[k], training=True, eps=self.eps)


class Conv4(nn.Module):
    """The four-block convnet of MAML (Finn et al. 2017) / matching networks (Vinyals et al. 2016).

    Block: conv3x3(filters) -> BatchNorm -> ReLU -> downsample, where downsampling is
    a stride-2 convolution (`pool="stride"`, MAML's Omniglot variant) or a 2x2
    max-pool (`pool="max"`, its mini-ImageNet variant; run before the ReLU, the same function and
    gradients, about 5 % faster a MAML step). Head: linear on the flattened features,
    or on their spatial mean (`global_pool=True`, as MAML's Omniglot model: 64 features).
    `norm="group"`: GroupNorm with 8 groups instead of BatchNorm (per sample, so no statistics of a
    batch reach a prediction; DomainBed's MNIST CNN, Gulrajani & Lopez-Paz 2021).
    `norm="batch_per_step"`: `PerStepBatchNorm2d` with `norm_steps` affine pairs (MAML++), selected
    by the inner step that `forward(x, step)` is given.
    """

    def __init__(
        self,
        n_classes: int = 5,
        in_channels: int = 1,
        filters: int = 64,
        image_size: int = 28,
        pool: str = "stride",
        global_pool: bool = False,
        norm: str = "batch",
        norm_steps: int = 2,
    ) -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ConfigError(f"Conv4 pool must be 'stride' or 'max', got {pool!r}")
        if norm not in ("batch", "group", "batch_per_step") or (norm == "group" and filters % 8):
            raise ConfigError("Conv4 norm must be 'batch', 'group' (filters divisible by 8) or 'batch_per_step', "
                              f"got {norm!r}")  # fmt: skip
        self.takes_step = norm == "batch_per_step"
        if n_classes < 1 or filters < 1 or in_channels < 1:
            raise ConfigError("Conv4 n_classes, filters and in_channels must be positive")
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            if pool == "stride":
                blocks += [nn.Conv2d(channels, filters, 3, stride=2, padding=1)]
            else:
                blocks += [nn.Conv2d(channels, filters, 3, padding=1)]
            if norm == "batch":
                blocks += [nn.BatchNorm2d(filters)]
            elif norm == "group":
                blocks += [nn.GroupNorm(8, filters)]
            else:
                blocks += [PerStepBatchNorm2d(filters, norm_steps)]
            # relu(maxpool(x)) = maxpool(relu(x)) (both monotone): the ReLU on a quarter of the values
            blocks += [nn.MaxPool2d(2), nn.ReLU()] if pool == "max" else [nn.ReLU()]
            channels = filters
            size = (size + 1) // 2 if pool == "stride" else size // 2
        if size < 1:
            raise ConfigError(f"image_size {image_size} is too small for four downsampling blocks")
        if global_pool:
            blocks += [nn.AdaptiveAvgPool2d(1)]
            size = 1
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(filters * size * size, n_classes)

    def forward(self, x: Tensor, step: int | None = None) -> Tensor:  # x: [n, C, H, W] -> [n, n_classes]
        """step: the inner step (per-step BatchNorm's pair; None: the last, the query's)."""
        if not self.takes_step:
            return self.head(self.features(x))
        for layer in self.features:
            x = layer(x, step) if isinstance(layer, PerStepBatchNorm2d) else layer(x)
        return self.head(x)

    def split(self) -> tuple[str, str]:
        """(body, head) submodule names: forward(x) = head(features(x))."""
        return "features", "head"


class _ResidualBlock(nn.Module):
    """Three conv3x3-BatchNorm-LeakyReLU(0.1) layers, a 1x1-conv + BatchNorm shortcut, 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(out_channels)]
            if i < 2:
                layers += [nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:  # [n, C_in, H, W] -> [n, C_out, H/2, W/2]
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019): four residual
    blocks of widths (64, 160, 320, 640), global average pooling, linear head. No DropBlock."""

    def __init__(self, n_classes: int = 5, in_channels: int = 3, widths: Sequence[int] = (64, 160, 320, 640)) -> None:
        super().__init__()
        if n_classes < 1 or in_channels < 1 or len(widths) != 4 or any(w < 1 for w in widths):
            raise ConfigError(f"ResNet12 needs positive n_classes, in_channels and four widths, got {list(widths)}")
        blocks, channels = [], in_channels
        for width in widths:
            blocks.append(_ResidualBlock(channels, width))
            channels = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [n, C, H, W] -> [n, n_classes]
        return self.head(self.features(x))

    def split(self) -> tuple[str, str]:
        """(body, head) submodule names: forward(x) = head(features(x))."""
        return "features", "head"


class _BasicBlock(nn.Module):
    """Two conv3x3-BatchNorm layers with ReLU and an identity shortcut; where the block halves the
    resolution and widens, the shortcut subsamples and pads the new channels with zeros (He et al.
    2016's option A for CIFAR, parameter-free)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.stride, self.pad = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:  # [n, C_in, H, W] -> [n, C_out, H/stride, W/stride]
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return torch.relu(self.body(x) + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNets of He et al. 2016 (6n + 2 layers; n = 5: ResNet-32, MW-Net's CIFAR model):
    conv3x3(16)-BN-ReLU, three stages of n basic blocks of widths 16, 32, 64 (the last two start with
    stride 2), global average pooling, linear head. x [n, 3, 32, 32] -> [n, n_classes]."""

    def __init__(self, n_classes: int = 10, in_channels: int = 3, blocks_per_stage: int = 5,
                 widths: Sequence[int] = (16, 32, 64)) -> None:  # fmt: skip
        super().__init__()
        if n_classes < 1 or in_channels < 1 or blocks_per_stage < 1 or len(widths) != 3 or min(widths) < 1:
            raise ConfigError(f"CifarResNet needs positive sizes and three widths, got n_classes={n_classes}, "
                              f"blocks_per_stage={blocks_per_stage}, widths={list(widths)}")  # fmt: skip
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU()]  # fmt: skip
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                layers.append(_BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
                channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def split(self) -> tuple[str, str]:
        """(body, head) submodule names: forward(x) = head(features(x))."""
        return "features", "head"


class ShapedSine(nn.Module):
    """The one-parameter model of ML3's shaped-sine experiment (Bechtle et al. 2021, "Meta Learning
    via Learned Loss"; official code `ml3/optimizee.py: ShapedSineModel`): y = sin(theta x)
    with a single scalar frequency theta, named `frequency`, started at `frequency_init` (0.1 there)
    for every task. Its MSE landscape in theta is full of local minima, which the learned loss is
    meant to shape away."""

    def __init__(self, frequency_init: float = 0.1) -> None:
        super().__init__()
        self.frequency = nn.Parameter(torch.tensor([float(frequency_init)]))  # [1]

    def forward(self, x: Tensor) -> Tensor:  # x: [n, 1] -> [n, 1]
        return torch.sin(self.frequency * x)

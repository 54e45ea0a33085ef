"""Backbones used by the few-shot and regression tasks. The last layer is always `head`,
so head-only adaptation (ANIL) is the config `adapt: [head]`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metaloss.errors import ConfigError


class MLP(nn.Module):
    """Fully connected ReLU network; MAML's sinusoid model is MLP(1, [40, 40], 1)."""

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden):
            raise ConfigError(f"MLP sizes must be positive: in={in_features} hidden={list(hidden)} out={out_features}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:  # x: [n, in_features] -> [n, out_features]
        return self.head(self.body(x))


class Conv4(nn.Module):
    """The four-block convnet of MAML (Finn et al. 2017) / matching networks (Vinyals et al. 2016).

    Block: conv3x3(filters) -> BatchNorm -> ReLU -> downsample, where downsampling is
    a stride-2 convolution (`pool="stride"`, MAML's Omniglot variant) or a 2x2
    max-pool (`pool="max"`, its mini-ImageNet variant). Head: linear on the flattened features.
    """

    def __init__(
        self,
        n_classes: int = 5,
        in_channels: int = 1,
        filters: int = 64,
        image_size: int = 28,
        pool: str = "stride",
    ) -> None:
        super().__init__()
        if pool not in ("stride", "max"):
            raise ConfigError(f"Conv4 pool must be 'stride' or 'max', got {pool!r}")
        if n_classes < 1 or filters < 1 or in_channels < 1:
            raise ConfigError("Conv4 n_classes, filters and in_channels must be positive")
        blocks: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            if pool == "stride":
                blocks += [nn.Conv2d(channels, filters, 3, stride=2, padding=1)]
            else:
                blocks += [nn.Conv2d(channels, filters, 3, padding=1)]
            blocks += [nn.BatchNorm2d(filters), nn.ReLU()]
            if pool == "max":
                blocks += [nn.MaxPool2d(2)]
            channels = filters
            size = (size + 1) // 2 if pool == "stride" else size // 2
        if size < 1:
            raise ConfigError(f"image_size {image_size} is too small for four downsampling blocks")
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(filters * size * size, n_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [n, C, H, W] -> [n, n_classes]
        return self.head(self.features(x))

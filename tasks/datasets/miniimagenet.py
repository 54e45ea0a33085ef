"""mini-ImageNet (Vinyals et al. 2016, Ravi & Larochelle 2017 class split) from the pickled caches
`mini-imagenet-cache-{train,validation,test}.pkl`: a dict with `image_data` (uint8, N x 84 x 84 x 3)
and `class_dict` (class name -> list of row indices).

The Ravi-Larochelle `images/*.jpg` + CSV layout, downloads and decoded-array caches are not read yet.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metaloss.errors import ConfigError
from tasks.base import TaskSplits
from tasks.datasets.common import require_files
from tasks.few_shot import FewShotSampler

FILES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}


def check_files(root: str | Path, root_key: str = "task.root") -> Path:
    """Raise DataNotFoundError naming the missing files, the directory and the config key."""
    return require_files(root, FILES.values(), "mini-ImageNet (pickled caches)", root_key)


def load_split(path: str | Path) -> tuple[Tensor, Tensor, list[str]]:
    """One cache file -> (images uint8 [N, 3, 84, 84], labels int64 [N], class names)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ConfigError(f"{path} is not a readable mini-ImageNet pickle: {err}") from None
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path} should hold a dict with 'image_data' and 'class_dict', found {keys}")
    images = np.asarray(data["image_data"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"{path}: image_data should be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    names = sorted(data["class_dict"])
    labels = np.full(len(images), -1, dtype=np.int64)
    for label, name in enumerate(names):
        rows = np.asarray(data["class_dict"][name], dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(images)):
            raise ConfigError(f"{path}: class {name!r} lists rows outside 0..{len(images) - 1}")
        labels[rows] = label
    if (labels < 0).any():
        raise ConfigError(f"{path}: {(labels < 0).sum()} images belong to no class in class_dict")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), names


def miniimagenet_task(root: str, n_way: int = 5, k_shot: int = 1, q_query: int = 15, seed: int = 0) -> TaskSplits:
    """N-way K-shot episodes on the 64 / 16 / 20 class train / val / test split."""
    root_path = check_files(root)
    samplers = []
    for split, name in FILES.items():
        images, labels, names = load_split(root_path / name)
        samplers.append(FewShotSampler(images, labels, range(len(names)), n_way, k_shot, q_query, seed, split))
    return TaskSplits(*samplers, loss="cross_entropy", metric="accuracy")

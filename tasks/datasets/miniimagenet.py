"""mini-ImageNet (Vinyals et al. 2016) on the class split of Ravi & Larochelle (2017): 64 / 16 / 20
train / val / test classes of 600 images, read from either of its two common layouts:

- the pickled caches `mini-imagenet-cache-{train,validation,test}.pkl`: a dict
  with `image_data` (uint8, N x 84 x 84 x 3) and `class_dict` (class name -> list of row indices);
- Ravi & Larochelle's layout: `images/*.jpg` (the original ImageNet JPEGs) and `train.csv`,
  `val.csv`, `test.csv` with the header `filename,label` (label: a WordNet id such as n01532829).
  Images are decoded with PIL, converted to RGB and resized to 84 x 84 with the Lanczos filter,
  without cropping (aspect ratio not kept), as MAML's `proc_images.py` (Finn et al. 2017) does.
  Decoding 60,000 JPEGs takes minutes, so the decoded arrays are cached (`cached_arrays`, written
  atomically), one `.npz` per split keyed by the image size and a SHA-256 of that split's CSV file,
  in `cache_dir` (default `$XDG_CACHE_HOME/metaloss/miniimagenet`, i.e. `~/.cache/...`; the data
  directory may be read-only). Changing the images but not the CSV files needs a new cache_dir.

In either layout a split's labels are 0..C-1 in the sorted order of its class names.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metaloss.errors import ConfigError
from tasks.base import SPLITS, TaskSplits
from tasks.datasets.common import cache_file, cached_arrays, require_files, require_layout, user_cache_dir
from tasks.few_shot import FewShotSampler

FILES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
IMAGE_DIR = "images"
CSV_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
CSV_HEADER = ["filename", "label"]
IMAGE_SIZE = 84
FORMATS = ("auto", "pickle", "csv")
PICKLE_LAYOUT = "the pickled caches"
CSV_LAYOUT = "the Ravi & Larochelle images/ + CSV layout"
LAYOUT_FILES = {PICKLE_LAYOUT: list(FILES.values()), CSV_LAYOUT: [IMAGE_DIR + "/", *CSV_FILES.values()]}


def check_files(root: str | Path, root_key: str = "task.root") -> Path:
    """The pickled caches' directory; else DataNotFoundError naming the missing files, the directory
    and the config key."""
    return require_files(root, FILES.values(), "mini-ImageNet (pickled caches)", root_key)


def check_csv_files(root: str | Path, root_key: str = "task.root") -> Path:
    """The directory of the images/ + CSV layout; else DataNotFoundError as `check_files`."""
    return require_files(root, LAYOUT_FILES[CSV_LAYOUT], "mini-ImageNet (images/ + CSV layout)", root_key)


def find_format(root: str | Path, format: str = "auto", root_key: str = "task.root") -> str:
    """The layout to read, "pickle" or "csv": the one `format` asks for if its files are complete,
    or for "auto" the pickled caches if complete, else the CSV layout; DataNotFoundError naming the
    missing files (of both layouts for "auto"), the directory and `root_key` otherwise."""
    if format == "pickle":
        check_files(root, root_key)
        return "pickle"
    if format == "csv":
        check_csv_files(root, root_key)
        return "csv"
    if format != "auto":
        raise ConfigError(f"mini-ImageNet format must be one of {', '.join(FORMATS)}, got {format!r}")
    layout = require_layout(root, LAYOUT_FILES, "mini-ImageNet", root_key)
    return "pickle" if layout == PICKLE_LAYOUT else "csv"


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


def read_csv(path: str | Path) -> list[tuple[str, str]]:
    """The (filename, label) rows of a Ravi & Larochelle split file; ConfigError naming the file
    (and line) for a wrong header, a malformed row or no rows at all."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{path} is not a readable CSV file: {err}") from None
    header = [cell.strip() for cell in rows[0]] if rows else None
    if header != CSV_HEADER:
        found = repr(",".join(rows[0])) if rows else "an empty file"
        raise ConfigError(f"{path}: expected the header {','.join(CSV_HEADER)!r}, found {found}")
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue  # blank line
        if len(cells) != 2 or not all(cells):
            raise ConfigError(f"{path}, line {line}: expected 'filename,label', found {','.join(row)!r}")
        entries.append((cells[0], cells[1]))
    if not entries:
        raise ConfigError(f"{path} lists no images")
    return entries


def decode_image(path: str | Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image file -> uint8 [size, size, 3]: PIL decode, RGB, Lanczos resize (no crop)."""
    try:
        from PIL import Image
    except ImportError:  # pillow is the optional `data` extra
        raise ConfigError("reading JPEG images needs pillow: pip install 'metaloss[data]'") from None
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ConfigError(f"{path} is not a readable image: {err}") from None


def decode_csv_split(
    root: str | Path, split: str, image_size: int = IMAGE_SIZE, workers: int | None = None
) -> dict[str, np.ndarray]:
    """Decode one split of the CSV layout: {"images": uint8 [N, 3, S, S], "labels": int64 [N],
    "classes": the sorted WordNet ids}. Every listed image is checked to exist before any is decoded."""
    root = Path(root).expanduser()
    csv_path, image_dir = root / CSV_FILES[split], root / IMAGE_DIR
    entries = read_csv(csv_path)
    missing = [name for name, _ in entries if not (image_dir / name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ConfigError(
            f"{csv_path} names {len(missing)} of its {len(entries)} images that are not in "
            f"{image_dir.resolve()}: {shown}"
        )
    names = sorted({label for _, label in entries})
    index = {name: i for i, name in enumerate(names)}
    images = np.empty((len(entries), 3, image_size, image_size), dtype=np.uint8)
    pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1))  # PIL releases the GIL while decoding
    try:
        paths = [image_dir / name for name, _ in entries]
        for i, pixels in enumerate(pool.map(lambda p: decode_image(p, image_size), paths)):
            images[i] = pixels.transpose(2, 0, 1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {
        "images": images,
        "labels": np.array([index[label] for _, label in entries], dtype=np.int64),
        "classes": np.array(names, dtype=str),
    }


def csv_cache_name(root: str | Path, split: str, image_size: int = IMAGE_SIZE) -> str:
    """The cache file name of one split: image size and the SHA-256 of its CSV file."""
    digest = hashlib.sha256((Path(root).expanduser() / CSV_FILES[split]).read_bytes()).hexdigest()
    return f"miniimagenet-{split}-{image_size}px-{digest[:16]}.npz"


def load_csv_split(
    root: str | Path, split: str, image_size: int = IMAGE_SIZE, cache_dir: str | Path | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """One split of the images/ + CSV layout -> (images uint8 [N, 3, S, S], labels int64 [N],
    sorted class names), decoded once, then read from the cache in `cache_dir` (default
    `user_cache_dir("miniimagenet")`, i.e. `~/.cache/metaloss/miniimagenet`)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
    folder = user_cache_dir("miniimagenet") if cache_dir is None else cache_dir
    cache = cache_file(folder, csv_cache_name(root, split, image_size))
    arrays = cached_arrays(cache, lambda: decode_csv_split(root, split, image_size))
    return torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"]), arrays["classes"].tolist()


def miniimagenet_task(
    root: str,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    seed: int = 0,
    format: str = "auto",
    cache_dir: str | None = None,
) -> TaskSplits:
    """N-way K-shot episodes on the 64 / 16 / 20 class train / val / test split (Ravi & Larochelle
    2017), from the pickled caches or the images/ + CSV layout (`format`: "auto", "pickle", "csv").
    `cache_dir` holds the decoded CSV-layout arrays (default `~/.cache/metaloss/miniimagenet`)."""
    layout = find_format(root, format)
    samplers = []
    for split in SPLITS:
        if layout == "pickle":
            images, labels, names = load_split(Path(root).expanduser() / FILES[split])
        else:
            images, labels, names = load_csv_split(root, split, IMAGE_SIZE, cache_dir)
        samplers.append(FewShotSampler(images, labels, range(len(names)), n_way, k_shot, q_query, seed, split))
    return TaskSplits(*samplers, loss="cross_entropy", metric="accuracy")

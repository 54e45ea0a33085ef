"""Clothing1M (Xiao et al. 2015, "Learning from massive noisy labeled data for image
classification"): one million clothing images from online shops, 14 classes, with labels taken
from the surrounding text (about 38% wrong) and, for a small subset, labels checked by hand.

Layout, as distributed, in `root`:
- `annotations/noisy_label_kv.txt` and `annotations/clean_label_kv.txt`: lines "images/0/12/123.jpg 5",
  an image path relative to `root` and a label 0..13;
- `annotations/noisy_train_key_list.txt`, `clean_train_key_list.txt`, `clean_val_key_list.txt`,
  `clean_test_key_list.txt`: one image path per line, the four splits (the usual protocol trains on
  noisy_train with its noisy labels, selects on clean_val and reports clean_test);
- `annotations/category_names_eng.txt`: the 14 class names, one a line, in label order;
- the JPEG images under `root/images/` (they ship as `images/0.tar` .. `images/9.tar`: extract them
  in place so that the listed paths exist).

noisy_train takes its labels from noisy_label_kv, the clean splits theirs from clean_label_kv.
Images are decoded with Pillow (the optional `data` extra) to RGB, the shorter side resized to
`image_size` (bilinear, antialiased, as torchvision's Resize) and the centre `image_size` x
`image_size` square cropped: the aspect ratio is kept, the borders of the longer side are lost.
JPEGs are decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps the shorter side at least
`image_size` (libjpeg's DCT scaling: much faster for small sizes, pixel values differ slightly from
a full decode then resize).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.classification import LabelledData
from tasks.datasets.common import require_files

ANNOTATIONS = "annotations"
LABEL_FILES = {"noisy": "noisy_label_kv.txt", "clean": "clean_label_kv.txt"}
KEY_LISTS = {
    "noisy_train": "noisy_train_key_list.txt",
    "clean_train": "clean_train_key_list.txt",
    "clean_val": "clean_val_key_list.txt",
    "clean_test": "clean_test_key_list.txt",
}
SPLIT_LABELS = {"noisy_train": "noisy", "clean_train": "clean", "clean_val": "clean", "clean_test": "clean"}
CLASS_FILE = "category_names_eng.txt"
N_CLASSES = 14
FILES = [f"{ANNOTATIONS}/{name}" for name in (*LABEL_FILES.values(), *KEY_LISTS.values(), CLASS_FILE)]
DATASET = "Clothing1M"

Item = tuple[str, int]  # (image path relative to root, label)


class Clothing1MIndex(NamedTuple):
    """The annotations: split -> [(relative image path, label)] in key-list order, and the 14 class names."""

    splits: dict[str, list[Item]]
    classes: list[str]


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a text file; ConfigError if unreadable."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [(n, text) for n, line in enumerate(f, start=1) if (text := line.strip())]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not a readable text file: {err}") from None


def read_label_file(path: str | Path, n_classes: int = N_CLASSES) -> dict[str, int]:
    """A `*_label_kv.txt` file: {relative image path: label}; ConfigError naming the file and line for
    a line that is not "path label", a label outside 0..n_classes-1 or a path given two labels."""
    path = Path(path)
    labels: dict[str, int] = {}
    for number, text in _lines(path):
        parts = text.rsplit(maxsplit=1)
        try:
            key, label = parts[0], int(parts[1])
        except (IndexError, ValueError):
            raise ConfigError(f"{path}, line {number}: expected 'image_path label', found {text!r}") from None
        if not 0 <= label < n_classes:
            raise ConfigError(f"{path}, line {number}: label {label} outside 0..{n_classes - 1}")
        if labels.setdefault(key, label) != label:
            raise ConfigError(f"{path}, line {number}: {key} is labelled both {labels[key]} and {label}")
    return labels


def read_clothing1m(root: str | Path, root_key: str = "data.root") -> Clothing1MIndex:
    """The four splits of Clothing1M in `root` (see the module docstring) with their labels and the
    class names; no image is opened. Missing annotation files: one DataNotFoundError naming them, the
    directory and `root_key`; a key listed in a split but absent from its label file: a ConfigError
    naming both files and the key."""
    root = require_files(root, FILES, DATASET, root_key)
    folder = root / ANNOTATIONS
    classes = [text for _, text in _lines(folder / CLASS_FILE)]
    if len(classes) != N_CLASSES:
        raise ConfigError(f"{folder / CLASS_FILE} should list {N_CLASSES} class names, found {len(classes)}")
    labels = {kind: read_label_file(folder / name) for kind, name in LABEL_FILES.items()}
    splits = {}
    for split, name in KEY_LISTS.items():
        kind = SPLIT_LABELS[split]
        table = labels[kind]
        keys = [text for _, text in _lines(folder / name)]
        absent = [k for k in keys if k not in table]
        if absent:
            shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise ConfigError(
                f"{folder / name} lists {len(absent)} images that {folder / LABEL_FILES[kind]} does not label: {shown}"
            )
        splits[split] = [(k, table[k]) for k in keys]
    return Clothing1MIndex(splits, classes)


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:  # pillow is the optional `data` extra
        raise DataNotFoundError("reading Clothing1M images needs Pillow: pip install 'metaloss[data]'") from None
    return Image


def decode_image(path: str | Path, image_size: int) -> np.ndarray:
    """One image file -> uint8 [3, image_size, image_size]: RGB, shorter side resized to image_size
    (bilinear), centre crop (see the module docstring); ConfigError naming an unreadable file."""
    image_module = _pillow()
    try:
        with image_module.open(path) as im:
            im.draft("RGB", (image_size, image_size))  # JPEG: DCT-scaled decode, never below image_size
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, image_module.DecompressionBombError) as err:
        raise ConfigError(f"{path} is not a readable image: {err}") from None
    w, h = rgb.size
    short, long = min(w, h), max(w, h)
    resized_long = max(image_size, int(image_size * long / short))  # torchvision's Resize(int) rounding
    size = (image_size, resized_long) if w <= h else (resized_long, image_size)
    if size != (w, h):
        rgb = rgb.resize(size, image_module.Resampling.BILINEAR)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    rgb = rgb.crop((left, top, left + image_size, top + image_size))
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def load_clothing1m_images(
    root: str | Path,
    items: Sequence[Item | str],
    image_size: int = 224,
    limit: int | None = None,
    workers: int | None = None,
    root_key: str = "data.root",
) -> np.ndarray:
    """uint8 [N, 3, image_size, image_size] of the images `items` ((relative path, label) pairs as
    `read_clothing1m` gives, or paths), the first `limit` only when given; decoded by `workers`
    threads (default: up to 8). Every image is checked to exist before any is decoded: missing ones
    are a ConfigError naming them (a DataNotFoundError when `root/images/` itself is missing)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be null or a non-negative integer, got {limit!r}")
    _pillow()  # fail early, before looking at any file
    root = Path(root).expanduser()
    paths = [root / (item if isinstance(item, str) else item[0]) for item in items[:limit]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        if not (root / "images").is_dir():
            require_files(root, ["images/"], f"{DATASET} images", root_key)
        shown = ", ".join(str(p) for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
        tars = " (the images ship as images/0.tar .. 9.tar: extract them in images/)"
        hint = tars if any((root / "images").glob("*.tar")) else ""
        raise ConfigError(f"{len(missing)} of {len(paths)} {DATASET} images are missing: {shown}{hint}")
    images = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1))  # Pillow releases the GIL while decoding
    try:
        for i, pixels in enumerate(pool.map(lambda p: decode_image(p, image_size), paths)):
            images[i] = pixels
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error, skip the images not started yet
    return images


def _check_limit(limit: int | None, key: str) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{key} must be null or a positive integer, got {limit!r}")


def clothing1m_data(
    root: str,
    image_size: int = 64,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> LabelledData:
    """Clothing1M for small experiments: train = noisy_train with its noisy labels, test = clean_test
    with its clean labels (the first `train_limit` / `test_limit` of each, in key-list order), images
    float32 [N, 3, image_size, image_size] in [0, 1], not normalised, 14 classes. Memory: the whole
    noisy_train (about 1M images) is 12 * image_size**2 bytes per image as float32, so set train_limit."""
    _check_limit(train_limit, "data.train_limit")
    _check_limit(test_limit, "data.test_limit")
    index = read_clothing1m(root)
    train, test = index.splits["noisy_train"][:train_limit], index.splits["clean_test"][:test_limit]

    def pixels(items: list[Item]) -> torch.Tensor:
        return torch.from_numpy(load_clothing1m_images(root, items, image_size)).float().div_(255.0)

    def labels(items: list[Item]) -> torch.Tensor:
        return torch.tensor([label for _, label in items], dtype=torch.int64)

    return LabelledData("clothing1m", pixels(train), labels(train), pixels(test), labels(test), N_CLASSES)

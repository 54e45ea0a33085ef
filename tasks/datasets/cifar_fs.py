"""CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers") and
FC100 (Oreshkin et al. 2018, "TADAM: Task dependent adaptive metric for improved few-shot
learning"): two class splits of CIFAR-100 (Krizhevsky 2009), read from the official python version.

Files, in `root`: the folder `cifar-100-python/` with `train`, `test` and `meta`, or the archive
`cifar-100-python.tar.gz` it comes in (the folder wins if both are there; the archive is read in
place, never extracted). `train` and `test` are pickled dicts with byte keys: b"data" (uint8
N x 3072, each row a row-major 3 x 32 x 32 image), b"fine_labels", b"coarse_labels"; `meta` holds
b"fine_label_names" (100) and b"coarse_label_names" (20). As is standard for both benchmarks, the
train and test images are pooled: 600 images per class.

- CIFAR-FS: 64 / 16 / 20 train / val / test classes, chosen at random by Bertinetto et al. The lists
  below are those of their release (files `splits/bertinetto/{train,val,test}.txt` of the CIFAR-FS
  download), reproduced from torchmeta's copy (`torchmeta/datasets/assets/cifar100/cifar-fs/*.json`);
  learn2learn and MetaOptNet (Lee et al. 2019) use the same split.
- FC100: split by superclass so that train and test classes are semantically far apart: 12 / 4 / 4
  superclasses, i.e. 60 / 20 / 20 classes. The superclass lists are those of Oreshkin et al., as in
  torchmeta (`torchmeta/datasets/assets/cifar100/fc100/*.json`).

Only class names are reproduced; labels index CIFAR-100's `fine_label_names` (given by `meta`), so
every split shares one image tensor (uint8 [60000, 3, 32, 32]) and samples its own classes.
The download (off by default) is the official archive, checked against its published md5.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from metaloss.errors import ConfigError
from tasks.base import SPLITS, TaskSplits
from tasks.datasets.common import cache_file, cached_arrays, missing_files, require_layout
from tasks.datasets.common import download as download_file
from tasks.few_shot import FewShotSampler

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
MEMBERS = ("train", "test", "meta")
BASE_URL = "https://www.cs.toronto.edu/~kriz/"
CHECKSUM = "md5:eb9058c3a382ffc7106e4002c42a8d85"
FOLDER_LAYOUT = f"the extracted folder {FOLDER}/"
ARCHIVE_LAYOUT = f"the archive {ARCHIVE}"
LAYOUT_FILES = {FOLDER_LAYOUT: [f"{FOLDER}/{m}" for m in MEMBERS], ARCHIVE_LAYOUT: [ARCHIVE]}

CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": tuple(
        """apple aquarium_fish bear bee bottle bowl boy bridge bus can castle caterpillar chair clock cloud
        cockroach couch cup dinosaur dolphin elephant forest girl hamster house kangaroo keyboard lawn_mower
        lion lizard lobster mountain mouse mushroom oak_tree orange orchid palm_tree pear pine_tree plate
        porcupine possum rabbit raccoon ray road seal shrew skunk skyscraper snake spider squirrel streetcar
        sunflower tank tiger train trout tulip turtle willow_tree wolf""".split()
    ),
    "val": tuple(
        """beaver beetle butterfly camel cattle crab crocodile flatfish lamp maple_tree motorcycle otter sea
        shark television tractor""".split()
    ),
    "test": tuple(
        """baby bed bicycle chimpanzee fox leopard man pickup_truck plain poppy rocket rose snail sweet_pepper
        table telephone wardrobe whale woman worm""".split()
    ),
}

FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish",
        "flowers",
        "food_containers",
        "fruit_and_vegetables",
        "household_electrical_devices",
        "household_furniture",
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "reptiles",
        "trees",
        "vehicles_1",
        "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}


@dataclass(frozen=True)
class Cifar100:
    """CIFAR-100's train then test images, pooled. images: uint8 [N, 3, 32, 32]; fine, coarse:
    int64 [N] indices into fine_names (100) and coarse_names (20), in the order of `meta`."""

    images: Tensor
    fine: Tensor
    coarse: Tensor
    fine_names: list[str]
    coarse_names: list[str]


def archive_url(base_url: str = BASE_URL) -> str:
    return base_url.rstrip("/") + "/" + ARCHIVE


def find_source(
    root: str | Path,
    download_missing: bool = False,
    base_url: str = BASE_URL,
    checksum: str | None = CHECKSUM,
    root_key: str = "task.root",
) -> Path:
    """The folder `root/cifar-100-python` if complete, else the archive `root/cifar-100-python.tar.gz`,
    downloaded first when `download_missing`; else DataNotFoundError naming the files of both layouts,
    the directory and `root_key`."""
    root = Path(root).expanduser()
    if download_missing and missing_files(root, LAYOUT_FILES[FOLDER_LAYOUT]) and not (root / ARCHIVE).is_file():
        download_file(archive_url(base_url), root / ARCHIVE, checksum)
    hint = f", or set task.download=true to fetch {archive_url(base_url)}"
    layout = require_layout(root, LAYOUT_FILES, "CIFAR-100 (python version)", root_key, hint)
    return root / FOLDER if layout == FOLDER_LAYOUT else root / ARCHIVE


def _unpickle(f: IO[bytes], where: str, dataset: str = "CIFAR-100") -> dict[str, Any]:
    """A pickled dict of the official files, keys as str (they are bytes: Python 2 pickles)."""
    try:
        obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise ConfigError(f"{where} is not a readable {dataset} pickle: {err}") from None
    except (OSError, zlib.error) as err:  # a damaged archive, noticed while decompressing
        raise ConfigError(f"{where} could not be read: {err}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} should hold a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def member_location(source: Path, folder: str, member: str) -> str:
    """Where `member` of the folder or archive `source` is read from, for messages."""
    return str(source / member) if source.is_dir() else f"{source} ({folder}/{member})"


def _read_members(source: Path, folder: str = FOLDER, members: tuple[str, ...] = MEMBERS,
                  dataset: str = "CIFAR-100") -> dict[str, dict[str, Any]]:  # fmt: skip
    """The unpickled `members` (CIFAR-100's train, test and meta) of the folder or the archive
    `source` (holding them under `folder`)."""
    if source.is_dir():
        found = {}
        for member in members:
            with open(source / member, "rb") as f:
                found[member] = _unpickle(f, member_location(source, folder, member), dataset)
        return found
    wanted = {f"{folder}/{m}": m for m in members}
    found = {}
    try:
        with tarfile.open(source, "r:gz") as tar:
            for info in tar:  # one pass: seeking back in a .gz means decompressing again
                name = info.name.removeprefix("./")
                if name in wanted and info.isfile():
                    f = tar.extractfile(info)
                    if f is not None:  # always, for a regular file
                        found[wanted[name]] = _unpickle(f, member_location(source, folder, wanted[name]), dataset)
                if len(found) == len(members):
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ConfigError(f"{source} is not a readable {dataset} archive: {err}") from None
    absent = [n for n, m in wanted.items() if m not in found]
    if absent:
        raise ConfigError(f"{source} does not contain {', '.join(absent)}")
    return found


def _names(meta: dict[str, Any], key: str, count: int, where: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or len(names) != count:
        found = f"{len(names)} entries" if isinstance(names, (list, tuple)) else type(names).__name__
        raise ConfigError(f"{where}: {key!r} should list {count} names, found {found}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _arrays(part: dict[str, Any], where: str, n_fine: int, n_coarse: int) -> tuple[np.ndarray, ...]:
    missing = [k for k in ("data", "fine_labels", "coarse_labels") if k not in part]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)} (found keys {sorted(part)})")
    data = np.asarray(part["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ConfigError(f"{where}: 'data' should be uint8 N x 3072, got {data.dtype} {data.shape}")
    try:
        fine, coarse = (np.asarray(part[k], dtype=np.int64) for k in ("fine_labels", "coarse_labels"))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: the labels should be lists of integers ({err})") from None
    if fine.shape != (len(data),) or coarse.shape != (len(data),):
        raise ConfigError(f"{where}: {len(data)} images but {fine.shape} fine and {coarse.shape} coarse labels")
    for labels, n, key in ((fine, n_fine, "fine_labels"), (coarse, n_coarse, "coarse_labels")):
        if labels.size and (labels.min() < 0 or labels.max() >= n):
            raise ConfigError(f"{where}: {key} outside 0..{n - 1}")
    return data.reshape(-1, 3, 32, 32), fine, coarse


def read_cifar100(source: str | Path) -> dict[str, np.ndarray]:
    """Decode the folder or archive `source`: {"images": uint8 [N, 3, 32, 32], "fine", "coarse":
    int64 [N], "fine_names", "coarse_names"}, train images first; ConfigError naming the file for
    anything that is not in the official format."""
    source = Path(source)
    parts = _read_members(source)
    where = {m: str(source / m) if source.is_dir() else f"{source} ({FOLDER}/{m})" for m in MEMBERS}
    fine_names = _names(parts["meta"], "fine_label_names", 100, where["meta"])
    coarse_names = _names(parts["meta"], "coarse_label_names", 20, where["meta"])
    images, fine, coarse = (
        np.concatenate(arrays) for arrays in zip(*(_arrays(parts[m], where[m], 100, 20) for m in ("train", "test")))
    )
    pairs = np.unique(np.stack([fine, coarse]), axis=1)  # each fine class must sit in one superclass
    if len(np.unique(pairs[0])) != pairs.shape[1]:
        raise ConfigError(f"{source}: some fine classes carry more than one coarse label")
    return {
        "images": np.ascontiguousarray(images),
        "fine": fine,
        "coarse": coarse,
        "fine_names": np.array(fine_names, dtype=str),
        "coarse_names": np.array(coarse_names, dtype=str),
    }


def _fingerprint(source: Path) -> str:
    """Names, sizes and modification times of the source files: cheap, and changes with them."""
    files = [source / m for m in MEMBERS] if source.is_dir() else [source]
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(repr((str(source.resolve()), stats)).encode()).hexdigest()[:16]


def load_cifar100(
    root: str | Path,
    download: bool = False,
    cache_dir: str | Path | None = None,
    base_url: str = BASE_URL,
    checksum: str | None = CHECKSUM,
    root_key: str = "task.root",
) -> Cifar100:
    """CIFAR-100 from `root` (folder or archive, see the module docstring), downloading the archive
    from `base_url` when `download` and neither is there. With `cache_dir`, the decoded arrays are
    cached there; None caches nothing (the folder reads in about 1 s, the archive in about 4 s)."""
    source = find_source(root, download, base_url, checksum, root_key)
    cache = None if cache_dir is None else cache_file(cache_dir, f"cifar100-{_fingerprint(source)}.npz")
    arrays = cached_arrays(cache, lambda: read_cifar100(source))
    return Cifar100(
        images=torch.from_numpy(arrays["images"]),
        fine=torch.from_numpy(arrays["fine"]),
        coarse=torch.from_numpy(arrays["coarse"]),
        fine_names=arrays["fine_names"].tolist(),
        coarse_names=arrays["coarse_names"].tolist(),
    )


def _indices(wanted: tuple[str, ...], names: list[str], what: str) -> list[int]:
    absent = [n for n in wanted if n not in names]
    if absent:
        raise ConfigError(f"CIFAR-100's meta file lacks the {what} {', '.join(absent)}")
    return sorted(names.index(n) for n in wanted)


def cifar_fs_classes(data: Cifar100) -> dict[str, list[int]]:
    """Split -> the fine class indices of CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20."""
    return {split: _indices(CIFAR_FS_CLASSES[split], data.fine_names, "CIFAR-FS classes") for split in SPLITS}


def fc100_classes(data: Cifar100) -> dict[str, list[int]]:
    """Split -> the fine class indices of FC100 (Oreshkin et al. 2018): every class of the split's
    superclasses, 60 / 20 / 20."""
    parts = {}
    for split in SPLITS:
        coarse = _indices(FC100_SUPERCLASSES[split], data.coarse_names, "FC100 superclasses")
        parts[split] = sorted(set(data.fine[torch.isin(data.coarse, torch.tensor(coarse))].tolist()))
    return parts


def _task(
    classes: Callable[[Cifar100], dict[str, list[int]]],
    root: str,
    n_way: int,
    k_shot: int,
    q_query: int,
    seed: int,
    download: bool,
    cache_dir: str | None,
    base_url: str,
    checksum: str | None,
) -> TaskSplits:
    data = load_cifar100(root, download, cache_dir, base_url, checksum)
    parts = classes(data)
    samplers = [
        FewShotSampler(data.images, data.fine, parts[split], n_way, k_shot, q_query, seed, split) for split in SPLITS
    ]
    return TaskSplits(*samplers, loss="cross_entropy", metric="accuracy")


def cifar_fs_task(
    root: str,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    seed: int = 0,
    download: bool = False,
    cache_dir: str | None = None,
    base_url: str = BASE_URL,
    checksum: str | None = CHECKSUM,
) -> TaskSplits:
    """N-way K-shot episodes on CIFAR-FS (Bertinetto et al. 2019), images uint8 [3, 32, 32]."""
    return _task(cifar_fs_classes, root, n_way, k_shot, q_query, seed, download, cache_dir, base_url, checksum)


def fc100_task(
    root: str,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    seed: int = 0,
    download: bool = False,
    cache_dir: str | None = None,
    base_url: str = BASE_URL,
    checksum: str | None = CHECKSUM,
) -> TaskSplits:
    """N-way K-shot episodes on FC100 (Oreshkin et al. 2018), images uint8 [3, 32, 32]."""
    return _task(fc100_classes, root, n_way, k_shot, q_query, seed, download, cache_dir, base_url, checksum)

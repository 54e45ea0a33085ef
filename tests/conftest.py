"""Shared test helpers: tiny mini-ImageNet (official pickled caches) and Omniglot (official zips
and one-shot runs) fixtures."""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# tests/tasks must never shadow the `tasks` package when tests/ itself lands on sys.path
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# scripts/common.py and scripts/settings.py import as `common` and `settings`, as the scripts import them
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.append(str(REPO_ROOT / "scripts"))



@pytest.fixture
def one_torch_thread():
    """Tests that train run with one intra-op thread (oversubscribed, a few seconds become minutes);
    the count is restored afterwards. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MINI_FILES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def mini_pixel(split: str, class_index: int, channel: int) -> int:
    """The value every pixel of `channel` holds in an image of `class_index` (in insertion order) of `split`."""
    return 80 * SPLIT_CODE[split] + 8 * class_index + channel


def write_miniimagenet(root: Path, n_classes: int = 6, per_class: int = 3, size: int = 84) -> dict[str, dict]:
    """Write mini-imagenet-cache-{train,validation,test}.pkl into `root` and return what was pickled.

    Each file is {'image_data': uint8 [N, size, size, 3], 'class_dict': name -> list of row indices}.
    Rows of different classes are interleaved and class names do not sort in insertion order, so a
    reader has to follow class_dict. Every pixel encodes (split, class, channel), see `mini_pixel`.
    """
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, filename in MINI_FILES.items():
        images = np.empty((n_classes * per_class, size, size, 3), dtype=np.uint8)
        class_dict = {}
        for k in range(n_classes):
            rows = [k + n_classes * j for j in range(per_class)]
            for c in range(3):
                images[rows, :, :, c] = mini_pixel(split, k, c)
            class_dict[f"n{SPLIT_CODE[split]}{(n_classes - k):07d}"] = rows  # reverse-sorted names
        data = {"image_data": images, "class_dict": class_dict}
        with open(root / filename, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        written[split] = data
    return written


@pytest.fixture(scope="session")
def make_miniimagenet():
    """`write_miniimagenet`, for tests and fixtures of any scope."""
    return write_miniimagenet


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    """A directory with a tiny mini-ImageNet: 6 classes x 3 images of 84 x 84 in every split."""
    root = tmp_path / "miniimagenet"
    write_miniimagenet(root)
    return root


# ----------------------------------------------------------------------------- Omniglot fixtures
# Tiny trees in the official layouts: images_background_smallN/<Alphabet>/characterNN/<id>_<drawer>.png
# (zipped or extracted) and the one-shot runs all_runs/runNN/{training,test,class_labels.txt}.

OMNIGLOT_SETS = {  # folder -> alphabet -> number of characters; Greek and Latin identical in both
    "images_background_small1": {"Balinese": 3, "Early_Aramaic": 2, "Greek": 2, "Korean": 2, "Latin": 2},
    "images_background_small2": {"Greek": 2, "Japanese_(katakana)": 3, "Latin": 2, "Sanskrit": 2, "Tagalog": 2},
}


def omniglot_ink(alphabet: str, character: str, drawer: int, size: int = 28, variant: int = 0) -> np.ndarray:
    """bool [size, size], True where a fixture image has ink: the first 64 pixels (row-major) are
    the bits of a hash of (alphabet, character, drawer, variant), so each image names itself and
    has no rotational symmetry; a 2 x 2 block near the lower right corner keeps some ink in the lower half."""
    bits = np.unpackbits(
        np.frombuffer(hashlib.sha256(f"{alphabet}/{character}/{drawer}/{variant}".encode()).digest()[:8], np.uint8)
    )
    ink = np.zeros(size * size, dtype=bool)
    ink[:64] = bits.astype(bool)
    ink = ink.reshape(size, size)
    ink[-3:-1, -3:-1] = True
    return ink


def omniglot_png(ink: np.ndarray) -> bytes:
    """A 1-bit PNG like the official ones: black (0) ink on white (1)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(~ink).save(buffer, format="PNG")  # a bool array is PIL mode "1"
    return buffer.getvalue()


def omniglot_file_id(alphabet: str, character: str) -> str:
    """The 4-digit image-id prefix of a character's files (the same in every set holding it)."""
    return f"{int(hashlib.sha256(f'{alphabet}/{character}'.encode()).hexdigest()[:6], 16) % 10000:04d}"


def write_omniglot_set(
    root: Path,
    folder: str,
    alphabets: dict[str, int],
    drawers: int = 4,
    size: int = 28,
    zipped: bool = True,
    variant: int = 0,
) -> Path:
    """`root/<folder>.zip` (with directory entries, as the official zips) or the extracted folder
    `root/<folder>/`: `alphabets[name]` characters `character01..` of `drawers` images
    `<id>_<drawer>.png` each (see `omniglot_ink`; `variant` changes every image's pixels)."""
    root.mkdir(parents=True, exist_ok=True)
    entries: dict[str, bytes | None] = {f"{folder}/": None}  # name -> bytes (None: a directory)
    for alphabet, n_characters in alphabets.items():
        entries[f"{folder}/{alphabet}/"] = None
        for c in range(1, n_characters + 1):
            character = f"character{c:02d}"
            entries[f"{folder}/{alphabet}/{character}/"] = None
            for d in range(1, drawers + 1):
                name = f"{folder}/{alphabet}/{character}/{omniglot_file_id(alphabet, character)}_{d:02d}.png"
                entries[name] = omniglot_png(omniglot_ink(alphabet, character, d, size, variant))
    if zipped:
        path = root / f"{folder}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries.items():
                zf.writestr(name, b"" if data is None else data)
        return path
    for name, data in entries.items():
        target = root / name
        target.mkdir(parents=True, exist_ok=True) if data is None else target.write_bytes(data)
    return root / folder


def write_omniglot(root: Path, zipped: bool = True, drawers: int = 4, size: int = 28) -> Path:
    """Both fixture minimal sets (OMNIGLOT_SETS) in `root`; returns `root`."""
    for folder, alphabets in OMNIGLOT_SETS.items():
        write_omniglot_set(root, folder, alphabets, drawers=drawers, size=size, zipped=zipped)
    return root


def lake_answers(run: int, n_classes: int) -> list[int]:
    """The class index (0-based, class01 -> 0) of each test item itemNN, in item order, of fixture run `run`."""
    return np.random.default_rng(run).permutation(n_classes).tolist()


def write_lake_runs(
    root: Path, n_runs: int = 2, n_classes: int = 4, size: int = 28, layout: str = "zip", prefix: str = ""
) -> Path:
    """One-shot runs in the layout of the official all_runs.zip: runNN/training/classNN.png (drawer 0 of
    character "runNN/classNN"), runNN/test/itemNN.png (drawer 1 of the character of its class, see
    `lake_answers`) and runNN/class_labels.txt (lines in reverse item order). layout: "zip" writes
    `root/all_runs.zip` (entries under `prefix`, e.g. "all_runs/"), "all_runs" the folder
    `root/all_runs/`, "flat" the run folders directly in `root`."""
    files: dict[str, bytes] = {}
    for r in range(1, n_runs + 1):
        run = f"run{r:02d}"
        answers = lake_answers(r, n_classes)
        lines = []
        for c in range(1, n_classes + 1):
            files[f"{run}/training/class{c:02d}.png"] = omniglot_png(
                omniglot_ink("lake", f"{run}/class{c:02d}", 0, size)
            )
        for j, answer in enumerate(answers, start=1):
            cls = f"class{answer + 1:02d}"
            files[f"{run}/test/item{j:02d}.png"] = omniglot_png(omniglot_ink("lake", f"{run}/{cls}", 1, size))
            lines.append(f"{run}/test/item{j:02d}.png {run}/training/{cls}.png")
        files[f"{run}/class_labels.txt"] = ("\n".join(reversed(lines)) + "\n").encode()
    root.mkdir(parents=True, exist_ok=True)
    if layout == "zip":
        with zipfile.ZipFile(root / "all_runs.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(prefix + name, data)
        return root / "all_runs.zip"
    base = root / "all_runs" if layout == "all_runs" else root
    for name, data in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(data)
    return base


@pytest.fixture
def omniglot_root(tmp_path: Path) -> Path:
    """A directory holding tiny images_background_small{1,2}.zip (OMNIGLOT_SETS, 4 drawers, 28 x 28)."""
    return write_omniglot(tmp_path / "omniglot")


@pytest.fixture
def lake_root(tmp_path: Path) -> Path:
    """A directory holding a tiny all_runs.zip: 2 runs of 4 classes."""
    root = tmp_path / "omniglot_lake"
    write_lake_runs(root)
    return root


# ----------------------------------------------------------------------------- CIFAR-100 fixtures
# The official python version: cifar-100-python/{train,test,meta}, protocol 2 pickles with byte keys.

CIFAR100_TAXONOMY = {  # official superclass -> its 5 classes; `meta` lists both kinds of names sorted
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}


def write_cifar100(root: Path, per_class: int = 1, archive: bool = False, shuffle: int | None = None) -> dict:
    """A tiny CIFAR-100 in `root`: the folder cifar-100-python/ or, with `archive`, only
    cifar-100-python.tar.gz. train and test hold `per_class` images of every class, rows in reverse
    label order. Pixels: channel 0 = fine label, channel 1 = coarse label (+ 100 in test), channel 2 =
    (32 y + x) % 251. `shuffle` (a seed) permutes the name lists in meta; labels follow them.
    Returns {"fine_names", "coarse_names", "superclass": fine name -> superclass name}."""
    import shutil
    import tarfile

    superclass = {n: c for c, names in CIFAR100_TAXONOMY.items() for n in names.split()}
    fine, coarse = sorted(superclass), sorted(CIFAR100_TAXONOMY)
    if shuffle is not None:
        rng = np.random.default_rng(shuffle)
        fine, coarse = [fine[i] for i in rng.permutation(100)], [coarse[i] for i in rng.permutation(20)]
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for part, shift in (("train", 0), ("test", 100)):
        f_labels = [f for f in reversed(range(100)) for _ in range(per_class)]
        c_labels = [coarse.index(superclass[fine[f]]) for f in f_labels]
        data = np.empty((len(f_labels), 3, 1024), dtype=np.uint8)
        data[:, 0], data[:, 1] = np.array(f_labels)[:, None], np.array(c_labels)[:, None] + shift
        data[:, 2] = np.arange(1024) % 251
        obj = {b"data": data.reshape(-1, 3072), b"fine_labels": f_labels, b"coarse_labels": c_labels}
        (folder / part).write_bytes(pickle.dumps(obj, protocol=2))
    meta = {b"fine_label_names": [n.encode() for n in fine], b"coarse_label_names": [n.encode() for n in coarse]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    if archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-100-python")
        shutil.rmtree(folder)
    return {"fine_names": fine, "coarse_names": coarse, "superclass": superclass}


def write_cifar10(root: Path, per_class_batch: int = 2) -> Path:
    """A small CIFAR-10 in the official python layout (cifar-10-batches-py/: data_batch_1..5,
    test_batch, batches.meta; protocol-2 pickles with bytes keys), every class in every batch."""
    import pickle

    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [c for c in range(10) for _ in range(per_class_batch)]
        rows = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        batch = {b"batch_label": member.encode(), b"labels": labels, b"data": rows,
                 b"filenames": [f"{member}_{k}.png".encode() for k in range(len(labels))]}  # fmt: skip
        (folder / member).write_bytes(pickle.dumps(batch, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": 10 * per_class_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return Path(root)


@pytest.fixture(scope="session")
def make_cifar10():
    """`write_cifar10`, for tests and fixtures of any scope."""
    return write_cifar10


@pytest.fixture(scope="session")
def make_cifar100():
    """`write_cifar100`, for tests and fixtures of any scope."""
    return write_cifar100


@pytest.fixture(scope="session")
def make_omniglot():
    """`write_omniglot` (both fixture minimal sets), for fixtures of any scope."""
    return write_omniglot


@pytest.fixture(scope="session")
def make_lake_runs():
    """`write_lake_runs` (one-shot runs in the all_runs.zip layout), for fixtures of any scope."""
    return write_lake_runs


# ----------------------------------------------------------------------------- Fashion-MNIST fixtures


def write_fashion_mnist_split(
    root: Path, prefix: str, n: int, gz: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`{prefix}-images-idx3-ubyte` and `{prefix}-labels-idx1-ubyte` (gzipped or not) with n random
    28x28 images and labels in 0..9; returns (images, labels)."""
    import gzip
    import struct

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
        (root / (f"{name}.gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return images, labels


@pytest.fixture(scope="session")
def make_fashion_mnist_split():
    """`write_fashion_mnist_split`, for fixtures of any scope."""
    return write_fashion_mnist_split


def write_folder_domains(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """The folder-per-domain layout of PACS / VLCS / OfficeHome: root/<domain>/<class>/<i>.jpg|png, with
    layout[domain][class] images (20x16 RGB, alternately JPEG and PNG; 0 makes an empty class folder)."""
    from PIL import Image

    for domain, classes in layout.items():
        for cls, n in classes.items():
            (root / domain / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                value = 40 * i + 10
                name = f"{i}.jpg" if i % 2 else f"{i}.png"
                Image.new("RGB", (20, 16), (value, 0, 255 - value)).save(root / domain / cls / name)
    return root


@pytest.fixture(scope="session")
def make_folder_domains():
    """`write_folder_domains`, for fixtures of any scope."""
    return write_folder_domains

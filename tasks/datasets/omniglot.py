"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015, "Human-level concept learning through
probabilistic program induction", Science 350(6266)) from the official zips of
github.com/brendenlake/omniglot, folder python/, or from those zips extracted in place.

Sets (name -> file `<root>/<folder>.zip` or folder `<root>/<folder>/`; the zip wins if both exist):

    background         images_background          30 alphabets, 964 characters
    evaluation         images_evaluation          20 alphabets, 659 characters
    background_small1  images_background_small1    5 alphabets, 136 characters
    background_small2  images_background_small2    5 alphabets, 156 characters

Layout inside each: `<folder>/<Alphabet>/<characterNN>/<id>_<drawer>.png`, 105 x 105 black ink on
white, 20 drawers per character.

Decoding convention (shared with the one-shot runs reader, `omniglot_lake`): PNG -> greyscale ->
resized to image_size x image_size with PIL's LANCZOS filter (the filter of MAML's Omniglot
preprocessing, Finn et al. 2017; it anti-aliases strokes instead of dropping them) -> inverted, so
the background is 0 and ink is 255. Arrays are uint8 [N, 1, S, S]; FewShotSampler scales them to
[0, 1]. A character is one class; labels index `OmniglotData.characters`, sorted by (alphabet,
character) name, and images of one character are ordered by file name.

Characters present in several requested sets (Greek and Latin are in both minimal sets) are kept
once when they hold the same file names with byte-identical contents (compared by sha256); the same
(alphabet, character) with different files or bytes is a ConfigError, since the official sets never
differ and two classes of one name would leak one character across splits.

Decoded arrays are cached as one `.npz` per (sets, image size, decoder, source contents) in
`cache_dir` (default `$XDG_CACHE_HOME/metaloss/omniglot`, i.e. `~/.cache/metaloss/omniglot`; the data
directory may be read-only), so a second load skips decoding; the cache is written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.augment import RandomAffine
from tasks.base import TaskSplits
from tasks.datasets.common import cache_file, cached_arrays, download, file_digest, user_cache_dir
from tasks.few_shot import FewShotSampler

SETS = {
    "background": "images_background",
    "evaluation": "images_evaluation",
    "background_small1": "images_background_small1",
    "background_small2": "images_background_small2",
}
OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
# sha256 of the minimal sets as published in the official repository; md5 of the full sets as
# listed by torchvision's Omniglot dataset (the official repository publishes no checksums)
CHECKSUMS: dict[str, str | None] = {
    "background": "md5:68d2efa1b9178cc56df9314c21c6e718",
    "evaluation": "md5:6b91aef0f799c5bb55b94e3f2daec811",
    "background_small1": "sha256:f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "background_small2": "sha256:3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}
MINIMAL_SETS = ("background_small1", "background_small2")
# Characters per alphabet in the minimal sets (Greek and Latin are in both): Balinese 24,
# Early_Aramaic 22, Greek 24, Japanese_(katakana) 47, Korean 40, Latin 26, Sanskrit 42, Tagalog 17.
DEFAULT_VAL = ("Balinese",)  # 24 characters
DEFAULT_TEST = ("Early_Aramaic", "Tagalog")  # 22 + 17 = 39 characters
RESAMPLE = "LANCZOS"
CACHE_VERSION = 1

Decoder = Callable[[bytes, int], np.ndarray]


def decode_png(data: bytes, image_size: int = 28) -> np.ndarray:
    """PNG bytes -> uint8 [image_size, image_size], background 0 and ink 255 (the Omniglot
    convention of this library: greyscale, LANCZOS resize, then inverted)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is in the `data` and `test` extras
        raise ConfigError("reading Omniglot needs pillow: pip install 'metaloss[data]'") from None
    with Image.open(io.BytesIO(data)) as im:
        grey = im.convert("L")
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(grey, dtype=np.uint8)  # [S, S], ink bright


def check_image_size(image_size: int) -> int:
    if int(image_size) != image_size or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def read_decoded(data: bytes, image_size: int, where: str, decoder: Decoder = decode_png) -> np.ndarray:
    """`decoder(data, image_size)`, with an unreadable image reported as a ConfigError naming `where`."""
    try:
        image = decoder(data, image_size)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where} is not a readable PNG image: {err}") from None
    if image.shape != (image_size, image_size) or image.dtype != np.uint8:
        expected = f"uint8 ({image_size}, {image_size})"
        raise ConfigError(f"decoding {where} gave {image.dtype} {image.shape}, expected {expected}")
    return image


@dataclass
class OmniglotData:
    """Decoded Omniglot images: one class per character.

    images: uint8 [N, 1, S, S], background 0, ink 255; labels: int64 [N], index into `characters`;
    characters: (alphabet, character) folder names, sorted; sets: the set each character was read
    from (of several holding it, the first in the order of SETS).
    """

    images: Tensor
    labels: Tensor
    characters: list[tuple[str, str]]
    sets: list[str]

    @property
    def alphabet(self) -> list[str]:
        """The alphabet of each character (parallel to `characters`)."""
        return [a for a, _ in self.characters]

    @property
    def alphabets(self) -> list[str]:
        """The distinct alphabets, sorted."""
        return sorted(set(self.alphabet))


# ----------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """One set as found on disk: a zip file or an extracted folder."""

    name: str  # a key of SETS
    path: Path

    @property
    def folder(self) -> str:
        return SETS[self.name]

    @property
    def is_zip(self) -> bool:
        return self.path.suffix == ".zip"

    def fingerprint(self) -> str:
        """sha256 of the zip, or of the folder's listing (path, size, mtime) of PNG files."""
        if self.is_zip:
            return "zip:" + file_digest(self.path)
        digest = hashlib.sha256()
        for p in sorted(self.path.rglob("*.png")):
            st = p.stat()
            digest.update(f"{p.relative_to(self.path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "dir:" + digest.hexdigest()

    def read(self) -> dict[tuple[str, str], dict[str, bytes]]:
        """(alphabet, character) -> {file name: PNG bytes}, checking the official layout."""
        found: dict[tuple[str, str], dict[str, bytes]] = {}
        misplaced: list[str] = []
        if self.is_zip:
            try:
                with zipfile.ZipFile(self.path) as zf:
                    for info in zf.infolist():
                        parts = info.filename.split("/")
                        if info.is_dir() or not _is_png(parts):
                            continue
                        if len(parts) != 4 or parts[0] != self.folder:
                            misplaced.append(info.filename)
                            continue
                        found.setdefault((parts[1], parts[2]), {})[parts[3]] = zf.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as err:
                raise ConfigError(f"{self.path} is not a readable zip file: {err}") from None
            where = f"zip {self.path}"
        else:
            for p in self.path.rglob("*.png"):
                parts = p.relative_to(self.path).parts
                if not _is_png(parts):
                    continue
                if len(parts) != 3:
                    misplaced.append(p.relative_to(self.path.parent).as_posix())
                    continue
                found.setdefault((parts[0], parts[1]), {})[parts[2]] = p.read_bytes()
            where = f"folder {self.path}"
        layout = f"{self.folder}/<Alphabet>/<character>/<image>.png"
        if misplaced:
            raise ConfigError(f"{where} does not have the Omniglot layout {layout}: found {misplaced[0]!r}")
        if not found:
            raise ConfigError(f"{where} holds no images in the Omniglot layout {layout}")
        return found


def _is_png(parts: Sequence[str]) -> bool:
    """A PNG that is not macOS metadata (__MACOSX/, ._name) or another hidden file."""
    return parts[-1].lower().endswith(".png") and not any(p.startswith((".", "__MACOSX")) for p in parts)


def _check_sets(sets: str | Iterable[str]) -> list[str]:
    names = [sets] if isinstance(sets, str) else list(sets)
    unknown = [s for s in names if s not in SETS]
    if unknown or not names:
        raise ConfigError(f"unknown Omniglot set(s) {unknown or names}; available: {', '.join(SETS)}")
    return list(dict.fromkeys(names))  # unique, in order


def find_sources(
    root: str | Path,
    sets: str | Iterable[str] = MINIMAL_SETS,
    download_missing: bool = False,
    base_url: str = OFFICIAL_URL,
    checksums: Mapping[str, str | None] | None = None,
    root_key: str = "task.root",
) -> list[_Source]:
    """Where each set is (zip preferred over folder); with `download_missing`, fetch missing zips from
    `base_url`/<folder>.zip (verified against `checksums`, default CHECKSUMS). Raises
    DataNotFoundError naming every missing set's zip and folder, the directory and `root_key`."""
    root = Path(root).expanduser()
    checksums = CHECKSUMS if checksums is None else checksums
    sources, missing = [], []
    for name in _check_sets(sets):
        folder = SETS[name]
        zip_path, dir_path = root / f"{folder}.zip", root / folder
        if not zip_path.is_file() and not dir_path.is_dir() and download_missing:
            download(f"{base_url.rstrip('/')}/{folder}.zip", zip_path, checksum=checksums.get(name))
        if zip_path.is_file():
            sources.append(_Source(name, zip_path))
        elif dir_path.is_dir():
            sources.append(_Source(name, dir_path))
        else:
            missing.append(f"{folder}.zip (or folder {folder}/)")
    if missing:
        download_key = root_key.rpartition(".")[0] + ".download" if "." in root_key else "download"
        hint = "" if download_missing else f" (or {download_key}=true to fetch them)"
        raise DataNotFoundError(
            f"Omniglot not found in {root.resolve()}: missing {', '.join(missing)}; "
            f"set {root_key}=DIR to the directory that holds them{hint}"
        )
    return sources


# ----------------------------------------------------------------------------- reading


def _merge(sources: Sequence[_Source]) -> dict[tuple[str, str], tuple[str, dict[str, bytes]]]:
    """(alphabet, character) -> (set, {file: bytes}) over all sources, a character found in several
    sets kept once if its files are identical."""
    merged: dict[tuple[str, str], tuple[str, dict[str, bytes]]] = {}
    origin: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    for source in sources:
        for key, files in source.read().items():
            digests = {f: hashlib.sha256(b).hexdigest() for f, b in files.items()}
            if key in origin:
                first, first_digests = origin[key]
                if digests != first_digests:
                    differ = sorted(set(digests.items()) ^ set(first_digests.items()))
                    raise ConfigError(
                        f"Omniglot character {key[0]}/{key[1]} is in sets {first} and {source.name} with different"
                        f" images (e.g. {differ[0][0]}); the official sets never differ: request one of them only"
                        " or replace the modified file"
                    )
                continue  # an identical copy (Greek and Latin in both minimal sets)
            origin[key] = (source.name, digests)
            merged[key] = (source.name, files)
    return merged


def load_omniglot(
    root: str | Path,
    sets: str | Iterable[str] = MINIMAL_SETS,
    image_size: int = 28,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    download: bool = False,
    base_url: str = OFFICIAL_URL,
    checksums: Mapping[str, str | None] | None = None,
    decoder: Decoder = decode_png,
) -> OmniglotData:
    """Decoded images of the requested Omniglot sets (see the module docstring for the conventions).

    cache_dir: where decoded arrays are cached (None: `user_cache_dir("omniglot")`, i.e.
    `~/.cache/metaloss/omniglot`; an unwritable one turns caching off with a warning); cache=False
    skips the cache.
    download: fetch missing zips from `base_url` (the official python/ folder), checked against
    `checksums` (default CHECKSUMS). decoder: PNG bytes, size -> uint8 [S, S] (part of the cache key).
    """
    image_size = check_image_size(image_size)
    sources = find_sources(root, sets, download, base_url, checksums)
    sources.sort(key=lambda s: list(SETS).index(s.name))  # the result does not depend on the order asked
    decoder_name = f"{getattr(decoder, '__module__', '?')}.{getattr(decoder, '__qualname__', repr(decoder))}"

    def build() -> dict[str, np.ndarray]:
        merged = _merge(sources)
        keys = sorted(merged)
        images, labels = [], []
        for label, key in enumerate(keys):
            files = merged[key][1]
            for name in sorted(files):
                where = f"{SETS[merged[key][0]]}/{key[0]}/{key[1]}/{name}"
                images.append(read_decoded(files[name], image_size, where, decoder))
                labels.append(label)
        return {
            "images": np.stack(images)[:, None],  # [N, 1, S, S]
            "labels": np.asarray(labels, dtype=np.int64),  # [N]
            "alphabets": np.asarray([a for a, _ in keys], dtype=str),  # [n_characters]
            "characters": np.asarray([c for _, c in keys], dtype=str),  # [n_characters]
            "sets": np.asarray([merged[k][0] for k in keys], dtype=str),  # [n_characters]
        }

    path = None
    if cache:
        key = {
            "version": CACHE_VERSION,
            "sets": sorted(s.name for s in sources),
            "image_size": image_size,
            "resample": RESAMPLE,
            "decoder": decoder_name,
            "sources": sorted((s.name, s.fingerprint()) for s in sources),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        folder = user_cache_dir("omniglot") if cache_dir is None else cache_dir
        path = cache_file(folder, f"omniglot_{'+'.join(key['sets'])}_{image_size}px_{digest}.npz")
    arrays = cached_arrays(path, build)
    characters = list(zip(arrays["alphabets"].tolist(), arrays["characters"].tolist()))
    images, labels = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])
    return OmniglotData(images, labels, characters, arrays["sets"].tolist())


# ----------------------------------------------------------------------------- the task


def rotate_classes(images: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Rotation augmentation (Santoro et al. 2016, Vinyals et al. 2016): each class c gains three new
    classes c + k * n_classes holding its images turned by k quarter turns (torch.rot90, k = 1, 2, 3).

    images: [N, C, H, W] with H == W; labels: [N] in 0..n_classes-1 -> [4N, C, H, W], [4N].
    """
    turned = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    return torch.cat(turned), torch.cat([labels + k * n_classes for k in range(4)])


def _alphabet_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


def split_alphabets(
    available: Sequence[str],
    train: str | Iterable[str] | None = None,
    val: str | Iterable[str] | None = None,
    test: str | Iterable[str] | None = None,
    default_val: Sequence[str] = DEFAULT_VAL,
    default_test: Sequence[str] = DEFAULT_TEST,
) -> dict[str, list[str]]:
    """Disjoint train / val / test alphabet lists. A split left None takes its default restricted to
    the available alphabets and minus the alphabets given explicitly to another split; train left
    None takes every remaining alphabet. An empty list means no sampler for that split: test=[] (and
    val=[]) is a final run on every alphabet, to be tested elsewhere (e.g. Lake's official runs)."""
    given = {"train": _alphabet_list(train), "val": _alphabet_list(val), "test": _alphabet_list(test)}
    for split, names in given.items():
        unknown = sorted(set(names or ()) - set(available))
        if unknown:
            listed = ", ".join(sorted(available))
            raise ConfigError(f"unknown Omniglot alphabet(s) {unknown} in {split}_alphabets; available: {listed}")
    explicit = {a for names in given.values() if names is not None for a in names}
    out: dict[str, list[str]] = {}
    for split, default in (("val", default_val), ("test", default_test)):
        names = given[split]
        out[split] = list(names) if names is not None else [a for a in default if a in available and a not in explicit]
    taken = set(out["val"]) | set(out["test"])
    out["train"] = given["train"] if given["train"] is not None else [a for a in available if a not in taken]
    out = {split: sorted(set(out[split])) for split in ("train", "val", "test")}
    for i, a in enumerate(("train", "val", "test")):
        for b in ("train", "val", "test")[i + 1 :]:
            if both := sorted(set(out[a]) & set(out[b])):
                raise ConfigError(f"Omniglot alphabet(s) {both} are in both {a}_alphabets and {b}_alphabets")
    if not out["test"] and given["test"] is None:
        raise ConfigError("no Omniglot test alphabets among these sets: set test_alphabets, or test_alphabets=[] "
                          "to train on every alphabet without a meta-test")  # fmt: skip
    return out


def omniglot_task(
    root: str,
    sets: str | Sequence[str] = MINIMAL_SETS,
    train_alphabets: Sequence[str] | None = None,
    val_alphabets: Sequence[str] | None = None,
    test_alphabets: Sequence[str] | None = None,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    rotations: bool = True,
    image_size: int = 28,
    seed: int = 0,
    cache_dir: str | None = None,
    download: bool = False,
    base_url: str = OFFICIAL_URL,
    within_alphabet: bool = False,
    train_within_alphabet: bool = False,
    val_characters: float = 0.0,
    affine: Mapping[str, float] | None = None,
) -> TaskSplits:
    """N-way K-shot Omniglot episodes with train / val / test split by alphabet (Lake et al. 2015
    data; Vinyals et al. 2016 / Finn et al. 2017 episodes).

    Default split of the minimal sets (characters per alphabet):
      train: Greek 24, Japanese_(katakana) 47, Korean 40, Latin 26, Sanskrit 42  (179; 716 with rotations)
      val:   Balinese 24
      test:  Early_Aramaic 22, Tagalog 17                                        (39)
    With the full sets, test is every alphabet of `evaluation` (20 alphabets, 659 characters) when it
    is requested, val is Balinese, Early_Aramaic and Tagalog (63 characters) and train the other 27
    background alphabets (901 characters). A split given explicitly wins; see `split_alphabets`.
    rotations: the train split's characters also appear turned by 90, 180 and 270 degrees as new
    classes (Santoro et al. 2016); val and test are never rotated. An alphabet-free split is None.
    within_alphabet: val and test episodes draw their N classes from one alphabet, as the official
    one-shot runs of Lake et al. (2015) do (training episodes still mix alphabets).
    train_within_alphabet: training episodes too draw their N classes from one alphabet; with
    rotations, each quarter turn of an alphabet is an alphabet of its own (all N characters of an
    episode share one orientation, as in the official runs).
    val_characters: a fraction of every training alphabet's characters (drawn with the seed) held out
    of training and added to the validation split, e.g. for a final run on every alphabet
    (`val_alphabets=[] test_alphabets=[] val_characters=0.2`).
    affine: small random affine transforms of the training images, fresh in every episode (the
    arguments of `tasks.augment.RandomAffine`, e.g. {degrees: 10, shear: 10, scale: 0.1, translate: 0.1});
    None: none.
    """
    if not 0.0 <= val_characters < 1.0:
        raise ConfigError(f"val_characters must be a fraction in [0, 1), got {val_characters}")
    names = _check_sets(sets)
    data = load_omniglot(root, names, image_size=image_size, cache_dir=cache_dir, download=download, base_url=base_url)
    if "evaluation" in names:
        test_default = sorted({a for (a, _), s in zip(data.characters, data.sets) if s == "evaluation"})
        val_default = [*DEFAULT_VAL, *DEFAULT_TEST]
    else:
        test_default, val_default = list(DEFAULT_TEST), list(DEFAULT_VAL)
    split = split_alphabets(data.alphabets, train_alphabets, val_alphabets, test_alphabets, val_default, test_default)
    alphabet = np.asarray(data.alphabet)
    members = {name: np.flatnonzero(np.isin(alphabet, alphabets)).tolist() for name, alphabets in split.items()}
    if val_characters > 0:
        rng = np.random.default_rng(seed)
        for name in split["train"]:
            own = np.flatnonzero(alphabet == name)
            held = set(rng.choice(own, size=int(round(len(own) * val_characters)), replace=False).tolist())
            members["train"] = [c for c in members["train"] if c not in held]
            members["val"] = sorted(members["val"] + list(held))
    samplers: dict[str, FewShotSampler | None] = {}
    for name in split:
        classes = members[name]
        if not classes:
            samplers[name] = None
            continue
        images, labels = data.images, data.labels  # [N, 1, S, S], [N]
        if name == "train" and rotations:
            keep = torch.from_numpy(np.isin(labels.numpy(), classes))
            images, labels = rotate_classes(images[keep], labels[keep], len(data.characters))
            classes = sorted(set(labels.tolist()))
        groups = None
        if (within_alphabet and name != "train") or (train_within_alphabet and name == "train"):
            n = len(data.characters)  # rotated class c is character c % n turned (c // n) quarter turns
            groups = {c: f"{data.alphabet[c % n]}@{c // n * 90}" for c in classes}
        augment = RandomAffine(**affine) if affine is not None and name == "train" else None
        samplers[name] = FewShotSampler(images, labels, classes, n_way, k_shot, q_query, seed, name, groups, augment)
    return TaskSplits(samplers["train"], samplers["val"], samplers["test"], loss="cross_entropy", metric="accuracy")


__all__ = [
    "CHECKSUMS",
    "OFFICIAL_URL",
    "SETS",
    "OmniglotData",
    "decode_png",
    "find_sources",
    "load_omniglot",
    "omniglot_task",
    "rotate_classes",
    "split_alphabets",
]

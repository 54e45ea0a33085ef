"""The Omniglot one-shot classification benchmark of Lake, Salakhutdinov & Tenenbaum (2015, Science
350(6266)): 20 runs of 20-way within-alphabet one-shot classification, from the official
`python/one-shot-classification/all_runs.zip` of github.com/brendenlake/omniglot.

Layout (in `<root>/all_runs.zip`, whose entries may sit under one top folder, or extracted to
`<root>/all_runs/` or directly in `<root>`; the zip wins):

    runNN/training/classNN.png   one image per class (the support set)
    runNN/test/itemNN.png        the queries
    runNN/class_labels.txt       lines `runNN/test/itemNN.png runNN/training/classNN.png`: a query
                                 and the training image of its class (paths relative to the runs)

Images are decoded exactly as by the Omniglot reader (`tasks.datasets.omniglot.decode_png`:
greyscale, LANCZOS resize to image_size, background 0 and ink 255). The runs are read and checked
once, when the sampler is built (800 small images, so no cache).
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metaloss.errors import ConfigError, DataNotFoundError
from metaloss.types import Episode
from tasks.base import TaskSplits
from tasks.datasets.omniglot import check_image_size, decode_png, read_decoded

RUNS_ZIP = "all_runs.zip"
RUNS_DIR = "all_runs"
LABELS_FILE = "class_labels.txt"
N_RUNS, N_WAY = 20, 20  # the official benchmark
_RUN = re.compile(r"run\d+")


def read_run_files(root: str | Path, root_key: str = "task.root") -> tuple[dict[str, bytes], str]:
    """Every file of every `runNN/` folder: (path relative to the runs, e.g. "run01/test/item01.png"
    -> bytes, where they were read from). DataNotFoundError naming all_runs.zip, the directory and
    `root_key` when neither the zip nor run folders are there; ConfigError for an unreadable zip
    or one without run folders."""
    root = Path(root).expanduser()
    zip_path = root / RUNS_ZIP
    files: dict[str, bytes] = {}
    if zip_path.is_file():
        try:
            with zipfile.ZipFile(zip_path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/") and not n.startswith("__MACOSX")]
                prefixes = {m.group(1) for n in names if (m := re.match(r"((?:[^/]+/)*?)run\d+/", n))}
                if len(prefixes) != 1:
                    found = f"top folders {sorted(prefixes)}" if prefixes else "no runNN/ folder"
                    raise ConfigError(f"{zip_path} should hold runNN/{LABELS_FILE}, training/ and test/; found {found}")
                prefix = prefixes.pop()
                for name in names:
                    rel = name[len(prefix) :] if name.startswith(prefix) else ""
                    if _RUN.fullmatch(rel.split("/")[0]):
                        files[rel] = zf.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as err:
            raise ConfigError(f"{zip_path} is not a readable zip file: {err}") from None
        return files, str(zip_path)
    for base in (root / RUNS_DIR, root):
        runs = sorted(p for p in base.glob("run*") if p.is_dir() and _RUN.fullmatch(p.name)) if base.is_dir() else []
        if runs:
            for run in runs:
                for p in run.rglob("*"):
                    if p.is_file():
                        files[p.relative_to(base).as_posix()] = p.read_bytes()
            return files, str(base)
    raise DataNotFoundError(
        f"Omniglot one-shot runs (Lake et al. 2015) not found in {root.resolve()}: missing {RUNS_ZIP} "
        f"(or its run01/ .. run20/ folders, in {RUNS_DIR}/ or in the directory itself); "
        f"set {root_key}=DIR to the directory that holds them"
    )


def parse_run(files: dict[str, bytes], run: str, where: str) -> tuple[list[str], list[str], list[int]]:
    """One run: (training image paths sorted = class order, query paths sorted, query labels).
    ConfigError for a missing or malformed class_labels.txt or one naming a missing image."""
    labels_path = f"{run}/{LABELS_FILE}"
    if labels_path not in files:
        raise ConfigError(f"{where}: {run}/ has no {LABELS_FILE}")
    training = sorted(p for p in files if re.fullmatch(rf"{run}/training/[^/]+\.png", p, re.IGNORECASE))
    if not training:
        raise ConfigError(f"{where}: {run}/training/ holds no PNG images")
    pairs = {}
    text = files[labels_path].decode("utf-8", errors="replace")
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ConfigError(f"{where}: {labels_path}, line {line_no}: expected 'test_image training_image'")
        query, answer = (f.removeprefix("./") for f in fields)
        for path in (query, answer):
            if path not in files:
                raise ConfigError(f"{where}: {labels_path}, line {line_no} names {path}, which is missing")
        if answer not in training:
            raise ConfigError(f"{where}: {labels_path}, line {line_no}: {answer} is not an image of {run}/training/")
        pairs[query] = training.index(answer)
    if not pairs:
        raise ConfigError(f"{where}: {labels_path} lists no test images")
    queries = sorted(pairs)
    return training, queries, [pairs[q] for q in queries]


class LakeRunsSampler:
    """The one-shot runs as episodes: `episode(i)` is run i + 1 (i in 0 .. len - 1), support = its
    training images labelled by class index (class01 -> 0, ...), query = its test images in file
    order labelled per class_labels.txt. Inputs are float [n, 1, S, S] in [0, 1], ink 1."""

    def __init__(self, root: str | Path, image_size: int = 28, root_key: str = "task.root") -> None:
        image_size = check_image_size(image_size)
        files, where = read_run_files(root, root_key)
        self.runs = sorted({p.split("/")[0] for p in files})
        self.support: list[Tensor] = []  # uint8 [n_classes, 1, S, S] per run
        self.query: list[Tensor] = []  # uint8 [n_query, 1, S, S] per run
        self.query_labels: list[Tensor] = []  # int64 [n_query] per run
        self.files: list[tuple[list[str], list[str]]] = []

        def decode(paths: list[str]) -> Tensor:
            images = [read_decoded(files[p], image_size, f"{where}: {p}", decode_png) for p in paths]
            return torch.from_numpy(np.stack(images)[:, None])  # [n, 1, S, S]

        for run in self.runs:
            training, queries, labels = parse_run(files, run, where)
            self.support.append(decode(training))
            self.query.append(decode(queries))
            self.query_labels.append(torch.tensor(labels, dtype=torch.int64))
            self.files.append((training, queries))

    def __len__(self) -> int:
        return len(self.runs)

    def n_classes(self, index: int) -> int:
        return len(self.support[index])

    def episode(self, index: int) -> Episode:
        if not 0 <= index < len(self.runs):
            raise IndexError(f"the Omniglot one-shot benchmark has {len(self.runs)} runs (episodes 0..{len(self) - 1})")
        support = self.support[index]
        training, queries = self.files[index]
        return Episode(
            support_x=support.float() / 255.0,  # [n_classes, 1, S, S]
            support_y=torch.arange(len(support)),  # [n_classes]
            query_x=self.query[index].float() / 255.0,  # [n_query, 1, S, S]
            query_y=self.query_labels[index].clone(),  # [n_query]
            meta={"run": self.runs[index], "classes": list(training), "queries": list(queries)},
        )


def omniglot_lake_task(root: str, image_size: int = 28, n_way: int = N_WAY) -> TaskSplits:
    """Evaluation only: the 20 one-shot runs of Lake et al. (2015) as the test sampler (train and
    val are None). n_way must match the runs' number of classes (20); it is there for models that
    read `task.n_way`."""
    sampler = LakeRunsSampler(root, image_size)
    sizes = sorted({sampler.n_classes(i) for i in range(len(sampler))})
    if sizes != [n_way]:
        raise ConfigError(f"the one-shot runs are {'/'.join(map(str, sizes))}-way, but n_way={n_way}")
    return TaskSplits(train=None, val=None, test=sampler, loss="cross_entropy", metric="accuracy")

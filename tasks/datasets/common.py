"""What every reader shares: clear errors for missing files, verified downloads, and caches of
decoded arrays that are written atomically (a crash never leaves half a cache behind)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from metaloss.errors import ConfigError, DataNotFoundError


def missing_files(root: str | Path, names: Iterable[str]) -> list[str]:
    """The entries of `names` absent from `root`: a name ending in "/" must be a directory, any
    other name a file."""
    root = Path(root).expanduser()
    return [n for n in names if not ((root / n).is_dir() if n.endswith("/") else (root / n).is_file())]


def require_files(root: str | Path, names: Iterable[str], dataset: str, root_key: str = "task.root") -> Path:
    """`root` if every file in `names` is there; else one DataNotFoundError naming the missing
    files, the directory looked in and the config key that sets it. A name ending in "/" must be
    a directory, any other name a file."""
    root = Path(root).expanduser()
    missing = missing_files(root, names)
    if missing:
        raise DataNotFoundError(
            f"{dataset} not found in {root.resolve()}: missing {', '.join(missing)}; "
            f"set {root_key}=DIR to the directory that holds them"
        )
    return root


def require_layout(
    root: str | Path,
    layouts: dict[str, Iterable[str]],
    dataset: str,
    root_key: str = "task.root",
    hint: str = "",
) -> str:
    """The first of `layouts` (description -> file names, in order of preference) whose files are
    all in `root`; else one DataNotFoundError naming, for every layout, the files it misses, the
    directory looked in and the config key that sets it (then `hint`, e.g. how to download)."""
    root = Path(root).expanduser()
    missing = {}
    for layout, names in layouts.items():
        missing[layout] = missing_files(root, names)
        if not missing[layout]:
            return layout
    expected = " or ".join(f"{layout} (missing {', '.join(names)})" for layout, names in missing.items())
    raise DataNotFoundError(
        f"{dataset} not found in {root.resolve()}: expected {expected}; "
        f"set {root_key}=DIR to the directory that holds them{hint}"
    )


def user_cache_dir(dataset: str) -> Path:
    """`$XDG_CACHE_HOME/metaloss/<dataset>`, or `~/.cache/metaloss/<dataset>`: the default home of
    decoded-array caches (a data directory may be read-only)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "metaloss" / dataset


def cache_file(cache_dir: str | Path, name: str) -> Path | None:
    """`cache_dir/name`, creating `cache_dir`; None (caching off, with a warning) when that
    directory cannot be written, so a read-only place never stops a run."""
    folder = Path(cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        warnings.warn(f"cannot write the cache directory {folder}: decoded arrays are not cached", stacklevel=3)
        return None
    return folder / name


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256sum(path: str | Path) -> str:
    return file_digest(path, "sha256")


def download(url: str, dest: str | Path, checksum: str | None = None) -> Path:
    """Fetch `url` (any scheme urllib knows, file:// included) to `dest` through a temporary file,
    verify `checksum` ("sha256:<hex>" or "md5:<hex>") when given, then rename into place.
    On any failure nothing is left at `dest`."""
    algorithm, expected = None, None
    if checksum is not None:
        algorithm, _, expected = checksum.partition(":")
        if algorithm not in ("sha256", "md5") or not expected:
            raise ConfigError(f"checksum must look like 'sha256:<hex>' or 'md5:<hex>', got {checksum!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            shutil.copyfileobj(response, out)
        if algorithm is not None and (actual := file_digest(tmp, algorithm)) != expected.lower():
            raise ConfigError(f"checksum mismatch for {url}: expected {algorithm} {expected}, got {actual}")
        os.replace(tmp, dest)
    except OSError as err:
        raise ConfigError(f"could not download {url}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def cached_arrays(cache: str | Path | None, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Decoded arrays from the `.npz` file `cache` if it exists, else `build()` them and save the
    cache atomically (temporary file + rename). `cache=None` disables caching."""
    if cache is not None and Path(cache).is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            Path(cache).unlink()  # unreadable (e.g. from an older version): rebuild it
    arrays = build()
    if cache is not None:
        cache = Path(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=cache.parent, prefix=cache.name + ".", suffix=".part.npz")
        os.close(fd)
        try:
            np.savez(tmp_name, **arrays)
            os.replace(tmp_name, cache)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    return arrays

"""Shared reader utilities: missing-file errors, verified downloads (file:// URLs), atomic caches."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.datasets.common import cached_arrays, download, require_files, sha256sum


def test_require_files_names_what_is_missing_and_where(tmp_path) -> None:
    (tmp_path / "a.zip").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    assert require_files(tmp_path, ["a.zip", "folder/"], "Thing") == tmp_path
    with pytest.raises(DataNotFoundError) as err:
        require_files(tmp_path, ["a.zip", "b.zip", "folder"], "Thing", root_key="task.data_dir")
    message = str(err.value)
    assert "b.zip" in message and "folder" in message and "a.zip" not in message
    assert str(tmp_path.resolve()) in message and "task.data_dir" in message


def test_download_from_a_file_url_checks_the_checksum(tmp_path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"omniglot" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = download(source.as_uri(), tmp_path / "out" / "data.bin", checksum=f"sha256:{digest}")
    assert dest.read_bytes() == source.read_bytes() and sha256sum(dest) == digest
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    assert download(source.as_uri(), tmp_path / "out" / "md5.bin", checksum=f"md5:{md5}").is_file()
    with pytest.raises(ConfigError, match="checksum mismatch"):
        download(source.as_uri(), tmp_path / "out" / "bad.bin", checksum="sha256:" + "0" * 64)
    with pytest.raises(ConfigError, match="checksum must look like"):
        download(source.as_uri(), tmp_path / "out" / "bad.bin", checksum="crc32:1234")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.bin", "md5.bin"]  # no partial file


def test_download_of_a_missing_url_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="could not download"):
        download((tmp_path / "nope.zip").as_uri(), tmp_path / "dest.zip")
    assert list(tmp_path.iterdir()) == []


def test_cache_is_built_once_then_read(tmp_path) -> None:
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(6, dtype=np.uint8).reshape(2, 3), "y": np.array([1, 2])}

    first = cached_arrays(tmp_path / "c.npz", build)
    second = cached_arrays(tmp_path / "c.npz", build)
    assert len(calls) == 1
    assert np.array_equal(first["x"], second["x"]) and second["x"].dtype == np.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


def test_a_failed_build_leaves_no_cache_and_a_corrupt_cache_is_rebuilt(tmp_path) -> None:
    def broken():
        raise ConfigError("bad archive")

    with pytest.raises(ConfigError):
        cached_arrays(tmp_path / "c.npz", broken)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "c.npz").write_bytes(b"truncated")
    out = cached_arrays(tmp_path / "c.npz", lambda: {"x": np.ones(3)})
    assert np.array_equal(out["x"], np.ones(3))
    whole = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "c.npz").write_bytes(whole[: len(whole) // 2])  # a zip cut in half
    out = cached_arrays(tmp_path / "c.npz", lambda: {"x": np.zeros(3)})
    assert np.array_equal(out["x"], np.zeros(3))
    assert np.array_equal(cached_arrays(tmp_path / "c.npz", broken)["x"], np.zeros(3))  # read, not rebuilt

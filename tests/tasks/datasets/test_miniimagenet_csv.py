"""mini-ImageNet's Ravi & Larochelle layout (images/*.jpg + train/val/test.csv) on tiny fixtures
written here in that exact format, and the choice between it and the pickled caches."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.base import SPLITS
from tasks.datasets.miniimagenet import (
    CSV_FILES,
    FILES,
    decode_image,
    find_format,
    load_csv_split,
    miniimagenet_task,
    read_csv,
)

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
N_CLASSES, PER_CLASS = 3, 2
TOLERANCE = 8  # JPEG (quality 95, no chroma subsampling) on flat colours


def wnid(split: str, k: int) -> str:
    """WordNet-like id of class k of a split; ids sort in the reverse of k."""
    return f"n0{N_CLASSES - k}{SPLIT_CODE[split]}00000"


def colour(split: str, k: int, j: int) -> tuple[int, int, int]:
    """The flat colour of image j of class k of a split: every channel encodes one of them."""
    return 20 + 100 * SPLIT_CODE[split], 20 + 70 * k, 40 + 120 * j


def write_csv_layout(root: Path, size: tuple[int, int] = (100, 90)) -> dict[str, list[tuple[str, str]]]:
    """images/<wnid><8 digits>.jpg (size = (width, height)) and the three CSV files; rows interleave
    the classes, which are listed in the reverse of their sorted order. Returns split -> rows."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        rows = []
        for j in range(PER_CLASS):
            for k in range(N_CLASSES):
                name = f"{wnid(split, k)}{j + 1:08d}.jpg"
                Image.new("RGB", size, colour(split, k, j)).save(root / "images" / name, quality=95, subsampling=0)
                rows.append((name, wnid(split, k)))
        (root / CSV_FILES[split]).write_text("filename,label\n" + "".join(f"{n},{label}\n" for n, label in rows))
        written[split] = rows
    return written


@pytest.fixture
def csv_root(tmp_path: Path) -> Path:
    root = tmp_path / "mini-csv"
    write_csv_layout(root)
    return root


def test_load_csv_split_shapes_labels_and_pixels(csv_root, tmp_path):
    images, labels, names = load_csv_split(csv_root, "val", cache_dir=tmp_path / "cache")
    assert images.shape == (N_CLASSES * PER_CLASS, 3, 84, 84) and images.dtype == torch.uint8
    assert names == sorted(wnid("val", k) for k in range(N_CLASSES))  # sorted WordNet ids
    assert labels.dtype == torch.int64
    rows = [(k, j) for j in range(PER_CLASS) for k in range(N_CLASSES)]  # CSV order
    assert labels.tolist() == [names.index(wnid("val", k)) for k, _ in rows]
    for image, (k, j) in zip(images, rows):
        expected = torch.tensor(colour("val", k, j), dtype=torch.int16).view(3, 1, 1)
        assert (image.to(torch.int16) - expected).abs().max() <= TOLERANCE


def test_decode_image_is_a_lanczos_squash_to_84_without_crop(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(90, 100, 3), dtype=np.uint8)  # height 90, width 100
    pixels[:, :6] = 255  # a white band on the left: a centre crop would cut it off
    Image.fromarray(pixels).save(tmp_path / "x.png")  # lossless: the result can be compared exactly
    decoded = decode_image(tmp_path / "x.png")
    expected = np.asarray(Image.fromarray(pixels).resize((84, 84), Image.Resampling.LANCZOS))
    assert decoded.shape == (84, 84, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, expected)
    assert decoded[:, 1].min() > 200
    Image.new("L", (50, 60), 77).save(tmp_path / "grey.jpg", quality=95)  # greyscale JPEGs become RGB
    grey = decode_image(tmp_path / "grey.jpg")
    assert grey.shape == (84, 84, 3) and np.abs(grey.astype(int) - 77).max() <= 2


def test_miniimagenet_task_reads_the_csv_layout(csv_root, tmp_path):
    splits = miniimagenet_task(str(csv_root), n_way=3, k_shot=1, q_query=1, cache_dir=str(tmp_path / "cache"))
    assert splits.loss == "cross_entropy" and splits.metric == "accuracy"
    for split in SPLITS:
        sampler = getattr(splits, split)
        assert sampler.classes == [0, 1, 2]
        e = sampler.episode(0)
        assert e.support_x.shape == (3, 3, 84, 84) and e.query_x.shape == (3, 3, 84, 84)
        names = sorted(wnid(split, k) for k in range(N_CLASSES))
        for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
            centre = (x[:, :, 42, 42] * 255).round()  # [n, 3]
            for pixel, label in zip(centre.tolist(), y.tolist()):
                k = N_CLASSES - int(names[e.meta["classes"][label]][2])  # invert wnid()
                assert abs(pixel[0] - colour(split, k, 0)[0]) <= TOLERANCE  # the split's own file is read
                assert abs(pixel[1] - colour(split, k, 0)[1]) <= TOLERANCE  # and the class matches the label


def test_auto_prefers_the_pickled_caches_and_format_forces_a_layout(csv_root, make_miniimagenet, tmp_path):
    make_miniimagenet(csv_root, n_classes=6, per_class=3)  # both layouts now: 6 vs 3 classes per split
    cache = str(tmp_path / "cache")
    assert find_format(csv_root) == "pickle"
    assert len(miniimagenet_task(str(csv_root), q_query=1, cache_dir=cache).train.classes) == 6
    assert len(miniimagenet_task(str(csv_root), n_way=3, q_query=1, format="csv", cache_dir=cache).val.classes) == 3
    (csv_root / FILES["test"]).unlink()  # incomplete pickles: auto falls back to the CSV layout
    assert find_format(csv_root) == "csv"
    with pytest.raises(ConfigError, match="format must be one of auto, pickle, csv"):
        miniimagenet_task(str(csv_root), format="jpg")


def test_the_cache_makes_the_images_unnecessary_and_follows_the_csv(csv_root, tmp_path):
    cache = tmp_path / "cache"
    first = load_csv_split(csv_root, "train", cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir())[0].startswith("miniimagenet-train-84px-")
    miniimagenet_task(str(csv_root), n_way=3, q_query=1, cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 3 and not list(cache.glob("*.part*"))
    for image in (csv_root / "images").iterdir():
        image.unlink()
    second = load_csv_split(csv_root, "train", cache_dir=cache)  # no JPEG left: read from the cache
    assert all(torch.equal(a, b) for a, b in zip(first[:2], second[:2])) and first[2] == second[2]
    assert miniimagenet_task(str(csv_root), n_way=3, q_query=1, cache_dir=str(cache)).test.classes == [0, 1, 2]
    with pytest.raises(ConfigError, match="images that are not in"):  # another image size, another key
        load_csv_split(csv_root, "train", image_size=32, cache_dir=cache)
    lines = (csv_root / "train.csv").read_text().splitlines()
    (csv_root / "train.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ConfigError, match="images that are not in"):  # another CSV, another key
        load_csv_split(csv_root, "train", cache_dir=cache)


def test_the_default_cache_is_the_user_cache_and_an_unwritable_one_is_skipped(csv_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_csv_split(csv_root, "test")
    assert len(list((tmp_path / "xdg" / "metaloss" / "miniimagenet").glob("miniimagenet-test-84px-*.npz"))) == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="not cached"):
        images, _, _ = load_csv_split(csv_root, "test", cache_dir=blocker / "cache")
    assert images.shape[0] == N_CLASSES * PER_CLASS


def test_no_layout_names_both_layouts_the_directory_and_the_key(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        miniimagenet_task(str(tmp_path))
    message = str(info.value)
    for name in [*FILES.values(), "images/", *CSV_FILES.values()]:
        assert name in message
    assert str(tmp_path.resolve()) in message and "task.root" in message


def test_an_incomplete_csv_layout_names_what_it_lacks(csv_root):
    (csv_root / "val.csv").unlink()
    with pytest.raises(DataNotFoundError) as info:
        miniimagenet_task(str(csv_root))
    message = str(info.value)
    assert "CSV layout (missing val.csv)" in message and FILES["train"] in message  # both layouts reported
    with pytest.raises(DataNotFoundError) as info:
        miniimagenet_task(str(csv_root), format="csv")
    assert "val.csv" in str(info.value) and FILES["train"] not in str(info.value)
    with pytest.raises(DataNotFoundError) as info:
        miniimagenet_task(str(csv_root), format="pickle")
    assert FILES["train"] in str(info.value) and "val.csv" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["file,label\na.jpg,n01\n", "label,filename\nn01,a.jpg\n", "filename,label,split\na.jpg,n01,x\n", "", "\n"],
    ids=["file", "swapped", "extra-column", "empty", "blank"],
)
def test_a_wrong_header_is_a_config_error_naming_the_file(tmp_path, text):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expected the header 'filename,label'") as info:
        read_csv(path)
    assert str(path) in str(info.value)


def test_malformed_rows_and_no_rows_are_config_errors(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text("filename,label\na.jpg,n01\nb.jpg\n")
    with pytest.raises(ConfigError, match="line 3"):
        read_csv(path)
    path.write_text("filename,label\n")
    with pytest.raises(ConfigError, match="lists no images"):
        read_csv(path)
    path.write_bytes(b"\xef\xbb\xbffilename, label\r\na.jpg , n01\r\n\r\n")  # BOM, CRLF, spaces: accepted
    assert read_csv(path) == [("a.jpg", "n01")]
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not a readable CSV"):
        read_csv(path)


def test_missing_images_are_counted_and_a_few_named(csv_root, tmp_path):
    rows = [(f"n0990000{i:08d}.jpg", "n09900000") for i in range(7)]
    with open(csv_root / "train.csv", "a") as f:
        f.writelines(f"{name},{label}\n" for name, label in rows)
    with pytest.raises(ConfigError) as info:
        load_csv_split(csv_root, "train", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "train.csv" in message and "names 7 of its 13 images" in message
    assert str((csv_root / "images").resolve()) in message
    assert sum(name in message for name, _ in rows) == 5 and message.endswith(", ...")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("damage", ["truncated", "text", "empty"])
def test_a_corrupt_jpeg_is_named_and_leaves_no_cache(csv_root, tmp_path, damage):
    victim = csv_root / "images" / f"{wnid('test', 1)}00000002.jpg"
    data = victim.read_bytes()
    victim.write_bytes({"truncated": data[: len(data) // 2], "text": b"not a jpeg\n", "empty": b""}[damage])
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL may warn about the truncated stream before failing
        with pytest.raises(ConfigError, match="not a readable image") as info:
            miniimagenet_task(str(csv_root), n_way=3, q_query=1, cache_dir=str(cache))
    assert str(victim) in str(info.value)
    names = sorted(p.name for p in cache.iterdir())  # train and val were cached before test failed
    assert len(names) == 2 and names[0].startswith("miniimagenet-train-") and names[1].startswith("miniimagenet-val-")

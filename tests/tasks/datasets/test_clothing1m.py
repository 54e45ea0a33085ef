"""The Clothing1M reader on a tiny tree in the distributed layout, written here: the annotation text
files under annotations/ and real JPEG files (written by Pillow) under images/."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.classification import LabelledData
from tasks.datasets.clothing1m import (
    KEY_LISTS,
    LABEL_FILES,
    clothing1m_data,
    decode_image,
    load_clothing1m_images,
    read_clothing1m,
)

Image = pytest.importorskip("PIL.Image")

CLASSES = [
    "T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
    "Jacket", "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear",
]  # fmt: skip
SHARED = "images/1/22/3001.jpg"  # labelled in both files, differently: noisy 2, clean 7
IMAGES = {  # relative path -> (width, height, RGB colour)
    "images/0/12/1001.jpg": (48, 36, (230, 120, 20)),
    "images/0/12/1002.jpg": (30, 60, (20, 200, 90)),
    "images/3/45/2001.jpg": (40, 40, (60, 40, 210)),
    SHARED: (50, 20, (250, 250, 250)),
    "images/5/10/4001.jpg": (36, 48, (128, 0, 128)),
    "images/9/99/5001.jpg": (64, 32, (10, 10, 10)),
    "images/9/99/5002.jpg": (33, 77, (200, 160, 60)),
    "images/2/7/6001.jpg": (20, 20, (0, 90, 180)),  # in noisy_label_kv only, listed in no split
}
NOISY = {"images/0/12/1001.jpg": 0, "images/0/12/1002.jpg": 13, "images/3/45/2001.jpg": 5, SHARED: 2,
         "images/2/7/6001.jpg": 4}  # fmt: skip
CLEAN = {SHARED: 7, "images/5/10/4001.jpg": 11, "images/9/99/5001.jpg": 9, "images/9/99/5002.jpg": 1}
SPLITS = {
    "noisy_train": ["images/3/45/2001.jpg", "images/0/12/1001.jpg", SHARED, "images/0/12/1002.jpg"],
    "clean_train": [SHARED],
    "clean_val": ["images/5/10/4001.jpg"],
    "clean_test": ["images/9/99/5002.jpg", "images/9/99/5001.jpg"],
}


def write_clothing1m(root: Path) -> Path:
    """The Clothing1M layout in `root`: annotations/*.txt as distributed (labels "path label", key
    lists one path a line, class names one a line) and a solid-colour JPEG for every path of IMAGES."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    (ann / LABEL_FILES["noisy"]).write_text("".join(f"{k} {v}\n" for k, v in NOISY.items()))
    (ann / LABEL_FILES["clean"]).write_text("".join(f"{k} {v}\n" for k, v in CLEAN.items()))
    for split, keys in SPLITS.items():
        (ann / KEY_LISTS[split]).write_text("".join(f"{k}\n" for k in keys))
    (ann / "category_names_eng.txt").write_text("\n".join(CLASSES) + "\n")
    for rel, (w, h, colour) in IMAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), colour).save(root / rel, format="JPEG", quality=95)
    return root


@pytest.fixture
def root(tmp_path) -> Path:
    return write_clothing1m(tmp_path / "clothing1m")


def test_splits_take_labels_from_the_right_file(root):
    index = read_clothing1m(root)
    assert index.classes == CLASSES
    assert set(index.splits) == {"noisy_train", "clean_train", "clean_val", "clean_test"}
    assert index.splits["noisy_train"] == [(k, NOISY[k]) for k in SPLITS["noisy_train"]]  # key-list order
    for split in ("clean_train", "clean_val", "clean_test"):
        assert index.splits[split] == [(k, CLEAN[k]) for k in SPLITS[split]]
    assert dict(index.splits["noisy_train"])[SHARED] == 2 and dict(index.splits["clean_train"])[SHARED] == 7


def test_images_decode_to_the_right_shape_and_colour(root):
    items = read_clothing1m(root).splits["noisy_train"]
    for size in (16, 24):
        images = load_clothing1m_images(root, items, image_size=size)
        assert images.shape == (4, 3, size, size) and images.dtype == np.uint8
        for image, (rel, _) in zip(images, items):
            colour = np.array(IMAGES[rel][2]).reshape(3, 1, 1)
            assert np.abs(image.astype(int) - colour).max() <= 8, rel  # JPEG: a few levels off at most
    first = load_clothing1m_images(root, items, image_size=8, limit=2)
    assert first.shape == (2, 3, 8, 8) and np.array_equal(first, load_clothing1m_images(root, items[:2], 8))
    assert load_clothing1m_images(root, [k for k, _ in items], 8).shape == (4, 3, 8, 8)  # plain paths too
    assert load_clothing1m_images(root, [], 8).shape == (0, 3, 8, 8)


def test_the_shorter_side_is_resized_then_the_centre_cropped(tmp_path):
    stripes = np.zeros((40, 120, 3), np.uint8)  # left third green, middle red, right blue
    stripes[:, :40] = (0, 255, 0)
    stripes[:, 40:80] = (255, 0, 0)
    stripes[:, 80:] = (0, 0, 255)
    Image.fromarray(stripes).save(tmp_path / "wide.jpg", quality=95)
    Image.fromarray(stripes.transpose(1, 0, 2).copy()).save(tmp_path / "tall.jpg", quality=95)
    for name in ("wide.jpg", "tall.jpg"):
        image = decode_image(tmp_path / name, 12).astype(int)
        assert image.shape == (3, 12, 12)
        inner = image[:, 2:-2, 2:-2]  # the middle third of the long side only: red
        assert inner[0].min() >= 200 and inner[1].max() <= 50 and inner[2].max() <= 50, name
    grey = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (30, 1))  # a greyscale JPEG ("L") comes out RGB
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=95)
    image = decode_image(tmp_path / "grey.jpg", 10)
    assert image.shape == (3, 10, 10) and np.array_equal(image[0], image[1]) and np.array_equal(image[1], image[2])
    assert image[0, 5, 0] < image[0, 5, 9]  # left to right brightening survives


def test_clothing1m_data_is_noisy_train_and_clean_test(root):
    data = clothing1m_data(str(root), image_size=8)
    assert isinstance(data, LabelledData) and data.name == "clothing1m" and data.n_classes == 14
    assert data.x_train.shape == (4, 3, 8, 8) and data.x_test.shape == (2, 3, 8, 8)
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    assert data.y_train.tolist() == [5, 0, 2, 13] and data.y_test.tolist() == [1, 9]
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert abs(data.x_train[2].mean().item() - 250 / 255) < 0.03  # the shared, near-white image
    assert abs(data.x_test[1].mean().item() - 10 / 255) < 0.03
    small = clothing1m_data(str(root), image_size=8, train_limit=2, test_limit=1)
    assert small.x_train.shape == (2, 3, 8, 8) and small.y_train.tolist() == [5, 0] and small.y_test.tolist() == [1]
    assert torch.equal(small.x_train, data.x_train[:2])
    with pytest.raises(ConfigError, match="data.test_limit"):
        clothing1m_data(str(root), test_limit=0)


def test_missing_annotations_name_the_files_the_directory_and_the_key(tmp_path, root):
    with pytest.raises(DataNotFoundError) as info:
        read_clothing1m(tmp_path / "empty")
    message = str(info.value)
    assert all(f"annotations/{name}" in message for name in (*LABEL_FILES.values(), *KEY_LISTS.values()))
    assert "annotations/category_names_eng.txt" in message
    assert str((tmp_path / "empty").resolve()) in message and "data.root" in message
    (root / "annotations" / KEY_LISTS["clean_val"]).unlink()
    with pytest.raises(DataNotFoundError) as info:
        read_clothing1m(root)
    assert "annotations/clean_val_key_list.txt" in str(info.value) and "noisy_label_kv" not in str(info.value)


def test_a_key_without_a_label_names_the_file_and_the_key(root):
    ann = root / "annotations"
    # a noisy_train key missing from noisy_label_kv (it is in clean_label_kv: the wrong file must not be used)
    (ann / KEY_LISTS["noisy_train"]).write_text("images/0/12/1001.jpg\nimages/9/99/5001.jpg\n")
    with pytest.raises(ConfigError, match="images/9/99/5001.jpg") as info:
        read_clothing1m(root)
    assert str(ann / "noisy_label_kv.txt") in str(info.value) and "1001" not in str(info.value)
    (ann / KEY_LISTS["noisy_train"]).write_text(f"{SPLITS['noisy_train'][0]}\n")
    (ann / KEY_LISTS["clean_test"]).write_text("images/0/12/1002.jpg\n")  # noisy label only
    with pytest.raises(ConfigError, match="images/0/12/1002.jpg") as info:
        read_clothing1m(root)
    assert str(ann / "clean_label_kv.txt") in str(info.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("images/a.jpg 3\nimages/b.jpg\n", "line 2: expected 'image_path label'"),
        ("images/a.jpg x\n", "line 1: expected 'image_path label'"),
        ("images/a.jpg 14\n", "line 1: label 14 outside 0..13"),
        ("images/a.jpg -1\n", "line 1: label -1 outside 0..13"),
        ("images/a.jpg 3\n\nimages/a.jpg 4\n", "line 3: images/a.jpg is labelled both 3 and 4"),
        (b"\xff\xfe\x00garbage", "not a readable text file"),
    ],
    ids=["no-label", "text-label", "14", "-1", "two-labels", "binary"],
)
def test_bad_label_lines_are_config_errors_naming_the_file(root, content, match):
    path = root / "annotations" / LABEL_FILES["clean"]
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=match) as info:
        read_clothing1m(root)
    assert str(path) in str(info.value) and not isinstance(info.value, DataNotFoundError)


def test_thirteen_class_names_are_refused(root):
    (root / "annotations" / "category_names_eng.txt").write_text("\n".join(CLASSES[:13]))
    with pytest.raises(ConfigError, match="category_names_eng.txt should list 14 class names, found 13"):
        read_clothing1m(root)


def test_missing_or_damaged_images_are_named(root):
    items = read_clothing1m(root).splits["noisy_train"]
    (root / "images/0/12/1002.jpg").unlink()
    with pytest.raises(ConfigError, match="1 of 4 Clothing1M images are missing") as info:
        load_clothing1m_images(root, items, 8)
    assert str(root / "images/0/12/1002.jpg") in str(info.value) and "1001" not in str(info.value)
    assert "extract" not in str(info.value)
    (root / "images" / "0.tar").write_bytes(b"")  # the images as shipped, not extracted yet
    with pytest.raises(ConfigError, match=r"images/0.tar .. 9.tar: extract them"):
        load_clothing1m_images(root, items, 8)
    load_clothing1m_images(root, items, 8, limit=3)  # the missing image is not among the first 3
    (root / "images/0/12/1001.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(ConfigError, match="is not a readable image") as info:
        load_clothing1m_images(root, items, 8, limit=3)
    assert str(root / "images/0/12/1001.jpg") in str(info.value)


def test_no_images_folder_is_data_not_found(root):
    import shutil

    items = read_clothing1m(root).splits["clean_test"]
    shutil.rmtree(root / "images")
    with pytest.raises(DataNotFoundError) as info:
        load_clothing1m_images(root, items, 8)
    assert "missing images/" in str(info.value) and "data.root" in str(info.value)


def test_bad_sizes_and_limits_are_refused(root):
    items = read_clothing1m(root).splits["clean_test"]
    for size in (0, 2.5, True):
        with pytest.raises(ConfigError, match="image_size must be a positive integer"):
            load_clothing1m_images(root, items, size)
    with pytest.raises(ConfigError, match="limit must be null or a non-negative integer"):
        load_clothing1m_images(root, items, 8, limit=-1)


def test_without_pillow_the_message_says_how_to_install_it(root, monkeypatch):
    items = read_clothing1m(root).splits["clean_test"]  # the annotations need no Pillow
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(DataNotFoundError, match=r"needs Pillow: pip install 'metaloss\[data\]'"):
        load_clothing1m_images(root, items, 8)

"""mini-ImageNet reader on tiny fixtures in the official pickled-cache format (see tests/conftest.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.base import SPLITS
from tasks.datasets.miniimagenet import FILES, check_files, load_split, miniimagenet_task
from tasks.few_shot import FewShotSampler


def dump(path: Path, obj) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def test_file_names_are_the_official_ones():
    assert FILES == {
        "train": "mini-imagenet-cache-train.pkl",
        "val": "mini-imagenet-cache-validation.pkl",
        "test": "mini-imagenet-cache-test.pkl",
    }


def test_load_split_converts_to_nchw_and_follows_class_dict(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(7, 84, 84, 3), dtype=np.uint8)
    class_dict = {"n02": [4, 0, 6], "n01": [1, 5], "n03": [2, 3]}
    images, labels, names = load_split(dump(tmp_path / "split.pkl", {"image_data": raw, "class_dict": class_dict}))
    assert images.shape == (7, 3, 84, 84) and images.dtype == torch.uint8
    assert images.is_contiguous()
    assert np.array_equal(images.numpy(), raw.transpose(0, 3, 1, 2))
    assert names == ["n01", "n02", "n03"]
    assert labels.dtype == torch.int64
    assert labels.tolist() == [1, 0, 2, 2, 1, 0, 1]
    for label, name in enumerate(names):
        assert sorted(torch.nonzero(labels == label).flatten().tolist()) == sorted(class_dict[name])


def test_load_split_on_the_fixture(mini_root, make_miniimagenet):
    written = make_miniimagenet(mini_root, n_classes=4, per_class=2)
    images, labels, names = load_split(mini_root / FILES["val"])
    data = written["val"]
    assert images.shape == (8, 3, 84, 84)
    assert names == sorted(data["class_dict"])
    for name, rows in data["class_dict"].items():
        assert (labels[rows] == names.index(name)).all()
        expected = torch.from_numpy(data["image_data"][rows]).permute(0, 3, 1, 2)
        assert torch.equal(images[rows], expected)


def test_miniimagenet_task_builds_few_shot_samplers_per_split(mini_root, make_miniimagenet):
    written = make_miniimagenet(mini_root, n_classes=6, per_class=3)
    splits = miniimagenet_task(str(mini_root), n_way=5, k_shot=1, q_query=2, seed=0)
    assert splits.loss == "cross_entropy" and splits.metric == "accuracy"
    for split in SPLITS:
        sampler = getattr(splits, split)
        assert isinstance(sampler, FewShotSampler)
        assert sampler.classes == list(range(6))
        e = sampler.episode(0)
        assert e.support_x.shape == (5, 3, 84, 84) and e.query_x.shape == (10, 3, 84, 84)
        assert e.support_x.dtype == torch.float32 and 0.0 <= e.support_x.min() and e.support_x.max() <= 1.0
        assert e.support_y.tolist() == [0, 1, 2, 3, 4]
        # pixels identify the split and the class the image came from: the split's own file is read
        data = written[split]
        names = sorted(data["class_dict"])
        for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
            pixels = torch.round(x[:, :, 0, 0] * 255).to(torch.uint8)  # [n, 3]
            for pixel, label in zip(pixels, y.tolist()):
                row = data["class_dict"][names[e.meta["classes"][label]]][0]
                assert pixel.tolist() == data["image_data"][row, 0, 0].tolist()


def test_miniimagenet_task_is_deterministic_given_seed(mini_root):
    a, b = miniimagenet_task(str(mini_root), seed=3, q_query=2), miniimagenet_task(str(mini_root), seed=3, q_query=2)
    assert torch.equal(a.train.episode(4).query_x, b.train.episode(4).query_x)
    assert a.train.episode(4).meta == b.train.episode(4).meta


def test_miniimagenet_task_checks_episode_sizes_against_the_data(mini_root):
    with pytest.raises(ConfigError, match="n_way=7"):
        miniimagenet_task(str(mini_root), n_way=7, k_shot=1, q_query=1)
    with pytest.raises(ConfigError, match="k_shot \\+ q_query = 5"):
        miniimagenet_task(str(mini_root), n_way=5, k_shot=1, q_query=4)  # 3 images per class


def test_all_files_missing_names_files_directory_and_key(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        miniimagenet_task(str(tmp_path))
    message = str(info.value)
    assert isinstance(info.value, ConfigError)  # so scripts report it in one line
    for name in FILES.values():
        assert name in message
    assert str(tmp_path.resolve()) in message
    assert "task.root" in message


def test_one_missing_file_is_named_alone(mini_root):
    (mini_root / FILES["val"]).unlink()
    with pytest.raises(DataNotFoundError) as info:
        miniimagenet_task(str(mini_root))
    message = str(info.value)
    assert FILES["val"] in message
    assert FILES["train"] not in message and FILES["test"] not in message


def test_check_files_names_a_custom_key(tmp_path, mini_root):
    assert check_files(mini_root) == mini_root
    with pytest.raises(DataNotFoundError, match="data.mini=DIR"):
        check_files(tmp_path / "absent", root_key="data.mini")


def test_a_directory_in_place_of_a_file_is_missing(tmp_path):
    for name in FILES.values():
        (tmp_path / name).mkdir()
    with pytest.raises(DataNotFoundError):
        check_files(tmp_path)


GOOD_IMAGES = np.zeros((2, 84, 84, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"images": GOOD_IMAGES, "class_dict": {"a": [0, 1]}}, "image_data"),
        ({"image_data": GOOD_IMAGES, "labels": [0, 1]}, "class_dict"),
        ([GOOD_IMAGES, {"a": [0, 1]}], "list"),
        ({"image_data": GOOD_IMAGES.astype(np.float32), "class_dict": {"a": [0, 1]}}, "uint8"),
        ({"image_data": GOOD_IMAGES[..., 0], "class_dict": {"a": [0, 1]}}, "uint8"),
        ({"image_data": GOOD_IMAGES, "class_dict": {"a": [0]}}, "no class"),
        ({"image_data": GOOD_IMAGES, "class_dict": {"a": [0, 1, 2]}}, "outside"),
        ({"image_data": GOOD_IMAGES, "class_dict": {"a": [0], "b": [-1]}}, "outside"),
    ],
    ids=[
        "no-image_data",
        "no-class_dict",
        "not-a-dict",
        "float-images",
        "no-channels",
        "unlabelled",
        "row>=N",
        "row<0",
    ],
)
def test_wrong_content_raises_config_error(tmp_path, obj, match):
    path = dump(tmp_path / "split.pkl", obj)
    with pytest.raises(ConfigError, match=match) as info:
        load_split(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 0.999])
def test_truncated_or_garbage_file_raises_config_error(tmp_path, fraction):
    data = pickle.dumps({"image_data": GOOD_IMAGES, "class_dict": {"a": [0, 1]}})
    path = tmp_path / "split.pkl"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ConfigError, match="not a readable mini-ImageNet pickle"):
        load_split(path)


def test_text_file_raises_config_error(tmp_path):
    path = tmp_path / "split.pkl"
    path.write_text("this is not a pickle\n")
    with pytest.raises(ConfigError, match="not a readable"):
        load_split(path)


def test_a_corrupt_split_stops_miniimagenet_task(mini_root):
    dump(mini_root / FILES["test"], {"image_data": GOOD_IMAGES})
    with pytest.raises(ConfigError, match="mini-imagenet-cache-test.pkl"):
        miniimagenet_task(str(mini_root), q_query=1)

import numpy as np
import pytest
import torch
from PIL import Image

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.datasets.domains import (
    folder_domains,
    mnist1d_domains,
    omniglot_alphabet_domains,
    rotated_digits,
    rotated_fashion_mnist,
)
from tasks.domain_shift import rotate_images


def test_rotated_fashion_mnist_reads_train_and_test_into_six_domains(tmp_path, make_fashion_mnist_split):
    train, _ = make_fashion_mnist_split(tmp_path, "train", 48, gz=True, seed=1)
    test, _ = make_fashion_mnist_split(tmp_path, "t10k", 12, gz=False, seed=2)
    data = rotated_fashion_mnist(str(tmp_path), seed=0)
    assert data.domains == ["0", "15", "30", "45", "60", "75"] and [len(y) for y in data.y] == [10] * 6
    rows = {tuple(r.flatten().tolist()) for r in torch.from_numpy(np.concatenate([train, test]) / 255.0).float()}
    assert all(tuple(r.flatten().tolist()) in rows for r in data.x[0])
    with pytest.raises(DataNotFoundError, match="task.data.root"):
        rotated_fashion_mnist(str(tmp_path / "missing"))


def test_rotated_digits_has_every_digit_once():
    data = rotated_digits(angles=(0, 45), seed=0)
    assert sum(len(y) for y in data.y) == 1797 and data.x[0].shape[1:] == (8, 8)
    assert float(data.x[1].max()) <= 1.0 and float(data.x[1].min()) >= 0.0


def test_mnist1d_domains_differ_by_their_generation_parameters_and_repeat():
    a = mnist1d_domains({"base": {}, "noisy": {"iid_noise_scale": 0.3}}, samples=100, seed=1)
    b = mnist1d_domains({"base": {}, "noisy": {"iid_noise_scale": 0.3}}, samples=100, seed=1)
    assert a.domains == ["base", "noisy"] and a.x[0].shape == (100, 40)
    assert torch.equal(a.x[1], b.x[1]) and not torch.equal(a.x[0], a.x[1])
    state = np.random.get_state()[1].copy()
    mnist1d_domains({"base": {}}, samples=20)
    assert np.array_equal(state, np.random.get_state()[1])  # the caller's generator is untouched
    with pytest.raises(ConfigError, match="unknown parameters"):
        mnist1d_domains({"odd": {"colour": 1.0}}, samples=20)


def test_folder_domains_read_the_pacs_layout(tmp_path, make_folder_domains):
    make_folder_domains(tmp_path, {"photo": {"dog": 2, "horse": 3}, "sketch": {"dog": 1, "guitar": 2}})
    data = folder_domains(tmp_path, image_size=8)
    assert data.domains == ["photo", "sketch"] and data.n_classes == 3  # dog, guitar, horse
    assert data.x[0].shape == (5, 3, 8, 8) and data.y[0].tolist() == [0, 0, 2, 2, 2]
    assert data.y[1].tolist() == [0, 1, 1]
    assert abs(float(data.x[0][0, 0].mean()) - 10 / 255) < 0.02  # the first dog: red 10
    only = folder_domains(tmp_path, image_size=8, domains=["sketch"])
    assert only.domains == ["sketch"] and only.n_classes == 2


def test_folder_layout_errors_are_one_line(tmp_path):
    (tmp_path / "art" / "loose.jpg").parent.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "art" / "loose.jpg")
    with pytest.raises(ConfigError, match="has no class folders"):
        folder_domains(tmp_path)
    with pytest.raises(DataNotFoundError, match="not in"):
        folder_domains(tmp_path, domains=["cartoon"])
    with pytest.raises(DataNotFoundError, match="no domain folders"):
        folder_domains(tmp_path / "nowhere")


def test_rotation_keeps_the_reader_images_in_range():
    images = torch.rand(3, 28, 28)
    out = rotate_images(images, 15)
    assert out.shape == images.shape and float(out.max()) <= 1.0 + 1e-6 and float(out.min()) >= 0.0


def test_omniglot_alphabets_are_domains_with_their_own_characters(omniglot_root, tmp_path):
    data = omniglot_alphabet_domains(omniglot_root, cache_dir=str(tmp_path / "cache"))
    assert len(data.domains) >= 2 and sum(len(y) for y in data.y) > 0
    classes = [set(y.tolist()) for y in data.y]
    assert all(not (a & b) for i, a in enumerate(classes) for b in classes[i + 1 :])  # no character in two alphabets
    assert data.x[0].shape[1:] == (1, 28, 28) and float(data.x[0].max()) == 1.0

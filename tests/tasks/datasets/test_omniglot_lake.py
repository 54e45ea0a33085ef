"""The one-shot runs of Lake et al. (2015) on tiny fixtures in the layout of the official all_runs.zip
(see `write_lake_runs` in tests/conftest.py)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from conftest import lake_answers, omniglot_ink, omniglot_png, write_lake_runs

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.base import TaskSampler
from tasks.datasets.omniglot import decode_png
from tasks.datasets.omniglot_lake import LakeRunsSampler, omniglot_lake_task


def ink_image(run: int, cls: int, drawer: int, size: int = 28) -> torch.Tensor:
    """float [1, size, size]: a fixture image as the reader returns it (ink 1, background 0)."""
    ink = omniglot_ink("lake", f"run{run:02d}/class{cls + 1:02d}", drawer, size)  # [size, size]
    return torch.from_numpy(ink[None].astype(np.float32))


@pytest.mark.parametrize(
    ("layout", "prefix"),
    [("zip", ""), ("zip", "all_runs/"), ("all_runs", ""), ("flat", "")],
    ids=["zip", "zip-with-top-folder", "extracted-all_runs", "extracted-flat"],
)
def test_episodes_follow_class_labels(tmp_path, layout, prefix):
    write_lake_runs(tmp_path, n_runs=3, n_classes=5, layout=layout, prefix=prefix)
    sampler = LakeRunsSampler(tmp_path)
    assert isinstance(sampler, TaskSampler) and len(sampler) == 3
    for i in range(3):
        e = sampler.episode(i)
        assert e.support_x.shape == (5, 1, 28, 28) and e.query_x.shape == (5, 1, 28, 28)
        assert e.support_x.dtype == torch.float32 and e.support_y.tolist() == [0, 1, 2, 3, 4]
        answers = lake_answers(i + 1, 5)
        assert e.query_y.tolist() == answers  # item order; class_labels.txt lists them in reverse
        for c in range(5):
            assert torch.equal(e.support_x[c], ink_image(i + 1, c, 0))  # class01 -> label 0, ...
        for j, answer in enumerate(answers):
            assert torch.equal(e.query_x[j], ink_image(i + 1, answer, 1))  # another drawing of its class
        assert e.meta["run"] == f"run{i + 1:02d}"
        assert e.meta["classes"][0] == f"run{i + 1:02d}/training/class01.png"
        assert e.meta["queries"][-1] == f"run{i + 1:02d}/test/item05.png"


def test_images_are_decoded_as_by_the_omniglot_reader(tmp_path):
    write_lake_runs(tmp_path, n_runs=1, n_classes=3, size=105, layout="all_runs")
    e = LakeRunsSampler(tmp_path, image_size=28).episode(0)
    raw = (tmp_path / "all_runs" / "run01" / "training" / "class02.png").read_bytes()
    assert e.support_x.shape == (3, 1, 28, 28)
    assert torch.equal(e.support_x[1, 0], torch.from_numpy(decode_png(raw, 28)).float() / 255)


def test_omniglot_lake_task_is_evaluation_only(lake_root):
    splits = omniglot_lake_task(str(lake_root), n_way=4)
    assert splits.train is None and splits.val is None and isinstance(splits.test, LakeRunsSampler)
    assert splits.loss == "cross_entropy" and splits.metric == "accuracy"
    assert len(splits.test) == 2 and splits.test.episode(1).query_y.tolist() == lake_answers(2, 4)
    with pytest.raises(ConfigError, match="4-way, but n_way=20"):
        omniglot_lake_task(str(lake_root))  # the official runs are 20-way, the fixture 4-way


def test_episode_index_out_of_range(lake_root):
    sampler = LakeRunsSampler(lake_root)
    for index in (2, -1):
        with pytest.raises(IndexError, match="2 runs"):
            sampler.episode(index)


def test_missing_runs_name_the_file_the_directory_and_the_key(tmp_path):
    (tmp_path / "all_runs").mkdir()  # an empty folder is no runs either
    with pytest.raises(DataNotFoundError) as info:
        omniglot_lake_task(str(tmp_path))
    message = str(info.value)
    assert "all_runs.zip" in message and "run01/" in message
    assert str(tmp_path.resolve()) in message and "task.root" in message


def rewrite(path, replace: dict[str, bytes | None]) -> None:
    """Rewrite the zip at `path` with some entries replaced (None: removed)."""
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    entries.update(replace)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            if data is not None:
                zf.writestr(name, data)


@pytest.mark.parametrize(
    ("replace", "match"),
    [
        ({"run02/test/item03.png": None}, "names run02/test/item03.png, which is missing"),
        ({"run01/training/class04.png": None}, "names run01/training/class04.png, which is missing"),
        ({"run01/class_labels.txt": b"run01/test/item01.png\n"}, "line 1: expected"),
        ({"run01/class_labels.txt": b"run01/test/item01.png run01/test/item02.png\n"}, "not an image of run01/"),
        ({"run01/class_labels.txt": b"\n"}, "lists no test images"),
        ({"run02/class_labels.txt": None}, "run02/ has no class_labels.txt"),
        ({"run01/test/item01.png": b"not a png"}, "run01/test/item01.png is not a readable PNG"),
    ],
    ids=["missing-query", "missing-class", "one-field", "answer-not-training", "empty", "no-labels", "bad-png"],
)
def test_broken_runs_are_config_errors(lake_root, replace, match):
    rewrite(lake_root / "all_runs.zip", replace)
    with pytest.raises(ConfigError, match=match) as info:
        LakeRunsSampler(lake_root)
    assert str(lake_root / "all_runs.zip") in str(info.value)


def test_a_bad_or_foreign_zip_is_a_config_error(lake_root):
    path = lake_root / "all_runs.zip"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="not a readable zip"):
        LakeRunsSampler(lake_root)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/a.png", omniglot_png(np.zeros((28, 28), dtype=bool)))
    with pytest.raises(ConfigError, match="no runNN/ folder"):
        LakeRunsSampler(lake_root)

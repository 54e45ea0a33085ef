"""Omniglot reader and task on tiny fixtures in the official layouts (see tests/conftest.py), and once
on the real minimal background sets in ../shared/data/omniglot when that directory exists."""

from __future__ import annotations

import hashlib
import io
import shutil
import time
import zipfile

import numpy as np
import pytest
import torch
from conftest import (
    OMNIGLOT_SETS,
    REPO_ROOT,
    omniglot_file_id,
    omniglot_ink,
    write_omniglot,
    write_omniglot_set,
)
from PIL import Image

from metaloss.errors import ConfigError, DataNotFoundError
from tasks.datasets.omniglot import (
    CHECKSUMS,
    SETS,
    decode_png,
    load_omniglot,
    omniglot_task,
    rotate_classes,
    split_alphabets,
)
from tasks.few_shot import FewShotSampler

SMALL1, SMALL2 = "images_background_small1", "images_background_small2"
FIXTURE_CHARACTERS = sorted(
    {(a, f"character{c:02d}") for s in OMNIGLOT_SETS.values() for a, n in s.items() for c in range(1, n + 1)}
)
REAL_ROOT = (REPO_ROOT / ".." / "shared" / "data" / "omniglot").resolve()


@pytest.fixture(autouse=True)
def private_user_cache(tmp_path, monkeypatch):
    """The default cache directory (cache_dir=None) lands in tmp_path, never in the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


def png(array: np.ndarray) -> bytes:
    """A PNG of `array`: bool -> 1-bit, uint8 [H, W] -> greyscale, uint8 [H, W, 3] -> RGB."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def expected_images(character: tuple[str, str], drawers: int = 4, size: int = 28, variant: int = 0) -> torch.Tensor:
    """uint8 [drawers, 1, size, size]: the decoded fixture images of a character, ink 255."""
    inks = [omniglot_ink(*character, d, size, variant) for d in range(1, drawers + 1)]
    return torch.from_numpy(np.stack(inks)[:, None].astype(np.uint8) * 255)


def counting_decoder(calls: list[int]):
    def counted(data: bytes, image_size: int) -> np.ndarray:
        calls.append(1)
        return decode_png(data, image_size)

    return counted


# ----------------------------------------------------------------------------- decoding


def test_decode_png_inverts_so_ink_is_bright_and_keeps_size():
    ink = np.zeros((28, 28), dtype=bool)
    ink[5:9, 10:20] = True
    out = decode_png(png(~ink), 28)  # 1-bit PNG, black ink on white, as the official files
    assert out.dtype == np.uint8 and out.shape == (28, 28)
    assert np.array_equal(out, ink.astype(np.uint8) * 255)
    grey = np.full((28, 28), 100, dtype=np.uint8)
    assert np.array_equal(decode_png(png(grey), 28), np.full((28, 28), 155, dtype=np.uint8))
    rgb = np.full((28, 28, 3), 255, dtype=np.uint8)
    assert np.array_equal(decode_png(png(rgb), 28), np.zeros((28, 28), dtype=np.uint8))


def test_decode_png_resizes_105_to_28_with_lanczos():
    ink = np.zeros((105, 105), dtype=bool)
    ink[:, :52] = True  # left half ink
    out = decode_png(png(~ink), 28)
    expected = 255 - np.asarray(Image.fromarray(~ink).convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    assert out.shape == (28, 28) and np.array_equal(out, expected)
    assert (out[:, :10] == 255).all() and (out[:, 18:] == 0).all()  # flat regions away from the edge stay exact
    assert np.array_equal(decode_png(png(np.ones((105, 105), dtype=bool)), 28), np.zeros((28, 28), dtype=np.uint8))
    assert decode_png(png(~ink), 20).shape == (20, 20)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "extracted"])
def test_labels_characters_and_pixels_agree(tmp_path, zipped):
    root = write_omniglot(tmp_path / "o", zipped=zipped)
    data = load_omniglot(root, cache=False)
    assert data.characters == FIXTURE_CHARACTERS  # Greek and Latin once, sorted by name
    assert data.images.dtype == torch.uint8 and data.images.shape == (4 * len(FIXTURE_CHARACTERS), 1, 28, 28)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [i for i in range(18) for _ in range(4)]
    for label, character in enumerate(data.characters):
        assert torch.equal(data.images[data.labels == label], expected_images(character))  # drawer order
    assert data.alphabet == [a for a, _ in FIXTURE_CHARACTERS]
    assert data.alphabets == sorted({a for s in OMNIGLOT_SETS.values() for a in s})
    owner = dict(zip(data.characters, data.sets))
    assert owner[("Greek", "character01")] == owner[("Korean", "character01")] == "background_small1"
    assert owner[("Tagalog", "character02")] == "background_small2"


def test_the_default_cache_directory_is_the_user_cache(tmp_path, omniglot_root):
    load_omniglot(omniglot_root)
    assert len(list((tmp_path / "xdg_cache" / "metaloss" / "omniglot").glob("omniglot_*.npz"))) == 1


def test_one_set_alone_and_the_order_of_sets_does_not_matter(omniglot_root):
    alone = load_omniglot(omniglot_root, ["background_small2"], cache=False)
    assert len(alone.characters) == 11 and set(alone.sets) == {"background_small2"}
    a = load_omniglot(omniglot_root, ["background_small2", "background_small1"], cache=False)
    b = load_omniglot(omniglot_root, "background_small1 background_small2".split(), cache=False)
    assert a.characters == b.characters and a.sets == b.sets and torch.equal(a.images, b.images)


def test_zip_is_preferred_over_the_extracted_folder(omniglot_root):
    write_omniglot_set(omniglot_root, SMALL1, OMNIGLOT_SETS[SMALL1], zipped=False, variant=1)
    data = load_omniglot(omniglot_root, ["background_small1"], cache=False)
    label = data.characters.index(("Korean", "character02"))
    assert torch.equal(data.images[data.labels == label], expected_images(("Korean", "character02")))


def test_resized_images(omniglot_root):
    data = load_omniglot(omniglot_root, image_size=14, cache=False)
    assert data.images.shape == (72, 1, 14, 14)
    with pytest.raises(ConfigError, match="image_size"):
        load_omniglot(omniglot_root, image_size=0, cache=False)


def test_a_character_with_different_content_in_two_sets_is_an_error(omniglot_root):
    write_omniglot_set(omniglot_root, SMALL2, {"Greek": 1}, variant=1)  # Greek/character01 drawn differently
    with pytest.raises(ConfigError) as info:
        load_omniglot(omniglot_root, cache=False)
    message = str(info.value)
    assert "Greek/character01" in message and "background_small1" in message and "background_small2" in message
    # the same files, one drawer fewer: also a different character
    write_omniglot_set(omniglot_root, SMALL2, {"Greek": 2, "Latin": 2}, drawers=3)
    with pytest.raises(ConfigError, match="Greek/character01"):
        load_omniglot(omniglot_root, cache=False)


# ----------------------------------------------------------------------------- the cache


def test_second_load_reads_the_cache(tmp_path, omniglot_root):
    calls: list[int] = []
    decoder = counting_decoder(calls)
    first = load_omniglot(omniglot_root, cache_dir=tmp_path / "cache", decoder=decoder)
    assert len(calls) == 72  # every kept image once: duplicated Greek / Latin are not decoded twice
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz" and "28px" in cached[0].name
    second = load_omniglot(omniglot_root, cache_dir=tmp_path / "cache", decoder=decoder)
    assert len(calls) == 72
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.characters == second.characters and first.sets == second.sets
    # another image size is another cache file
    load_omniglot(omniglot_root, image_size=14, cache_dir=tmp_path / "cache", decoder=decoder)
    assert len(calls) == 144 and len(list((tmp_path / "cache").iterdir())) == 2


def test_changed_source_files_rebuild_the_cache(tmp_path, omniglot_root):
    calls: list[int] = []
    decoder = counting_decoder(calls)
    load_omniglot(omniglot_root, ["background_small1"], cache_dir=tmp_path / "cache", decoder=decoder)
    write_omniglot_set(omniglot_root, SMALL1, OMNIGLOT_SETS[SMALL1], variant=1)
    data = load_omniglot(omniglot_root, ["background_small1"], cache_dir=tmp_path / "cache", decoder=decoder)
    assert len(calls) == 2 * 44
    label = data.characters.index(("Latin", "character01"))
    assert torch.equal(data.images[data.labels == label], expected_images(("Latin", "character01"), variant=1))


def test_cache_of_an_extracted_folder_follows_its_files(tmp_path):
    root = write_omniglot(tmp_path / "o", zipped=False)
    calls: list[int] = []
    decoder = counting_decoder(calls)
    load_omniglot(root, cache_dir=tmp_path / "cache", decoder=decoder)
    load_omniglot(root, cache_dir=tmp_path / "cache", decoder=decoder)
    assert len(calls) == 72
    next((root / SMALL2 / "Tagalog" / "character01").glob("*.png")).unlink()
    data = load_omniglot(root, cache_dir=tmp_path / "cache", decoder=decoder)
    assert len(calls) == 72 + 71 and len(data.images) == 71


def test_a_failed_build_leaves_no_cache(tmp_path, omniglot_root):
    path = omniglot_root / f"{SMALL2}.zip"
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(f"{SMALL2}/Tagalog/character01/broken_21.png", b"not a png")
    with pytest.raises(ConfigError, match="Tagalog/character01/broken_21.png"):
        load_omniglot(omniglot_root, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# ----------------------------------------------------------------------------- errors


def test_missing_sets_name_the_files_the_directory_and_the_key(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_omniglot(tmp_path / "nowhere", cache=False)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    for folder in (SMALL1, SMALL2):
        assert f"{folder}.zip" in message and f"folder {folder}/" in message
    assert str((tmp_path / "nowhere").resolve()) in message and "task.root" in message
    assert "task.download=true" in message


def test_one_missing_set_is_named_alone(omniglot_root):
    (omniglot_root / f"{SMALL2}.zip").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_omniglot(omniglot_root, cache=False)
    assert SMALL2 in str(info.value) and f"{SMALL1}.zip" not in str(info.value)
    with pytest.raises(DataNotFoundError, match="images_evaluation.zip"):
        load_omniglot(omniglot_root, ["background", "evaluation"], cache=False)


def test_unknown_set_lists_the_known_ones(omniglot_root):
    with pytest.raises(ConfigError, match="background_small1") as info:
        load_omniglot(omniglot_root, ["background_small3"], cache=False)
    assert "background_small3" in str(info.value) and "evaluation" in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_bad_zip_is_a_config_error_naming_it(omniglot_root, damage):
    path = omniglot_root / f"{SMALL1}.zip"
    content = path.read_bytes()
    damaged = {"garbage": b"this is not a zip file", "truncated": content[: len(content) // 2], "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(ConfigError, match="not a readable zip") as info:
        load_omniglot(omniglot_root, cache=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "entry",
    [f"{SMALL1}/Greek/0001_01.png", f"{SMALL1}/Greek/character01/extra/0001_01.png", "Greek/character01/0001_01.png"],
    ids=["too-shallow", "too-deep", "no-top-folder"],
)
def test_a_zip_with_the_wrong_layout_is_a_config_error(omniglot_root, entry):
    path = omniglot_root / f"{SMALL1}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{SMALL1}/Korean/character01/0001_01.png", png(np.ones((28, 28), dtype=bool)))
        zf.writestr(entry, png(np.ones((28, 28), dtype=bool)))
    with pytest.raises(ConfigError, match="layout") as info:
        load_omniglot(omniglot_root, cache=False)
    assert str(path) in str(info.value) and entry in str(info.value)


def test_a_zip_without_images_is_a_config_error(omniglot_root):
    path = omniglot_root / f"{SMALL1}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("README.txt", "nothing here")
        zf.writestr("__MACOSX/._x.png", b"metadata")  # ignored, like other hidden files
    with pytest.raises(ConfigError, match="holds no images"):
        load_omniglot(omniglot_root, cache=False)


# ----------------------------------------------------------------------------- download


def test_download_from_a_file_url_with_checksums(tmp_path):
    server = write_omniglot(tmp_path / "server")
    checksums = {
        name: "sha256:" + hashlib.sha256((server / f"{SETS[name]}.zip").read_bytes()).hexdigest()
        for name in ("background_small1", "background_small2")
    }
    root = tmp_path / "root"
    with pytest.raises(DataNotFoundError):  # off by default
        load_omniglot(root, cache=False)
    data = load_omniglot(root, cache=False, download=True, base_url=server.as_uri(), checksums=checksums)
    assert data.characters == FIXTURE_CHARACTERS
    assert (root / f"{SMALL1}.zip").read_bytes() == (server / f"{SMALL1}.zip").read_bytes()
    # with the official checksums the fixture zips are rejected and nothing is left behind
    other = tmp_path / "other"
    with pytest.raises(ConfigError, match="checksum mismatch"):
        load_omniglot(other, cache=False, download=True, base_url=server.as_uri())
    assert not list(other.glob("*.zip"))


def test_official_checksums_are_well_formed():
    assert set(CHECKSUMS) == set(SETS)
    for checksum in CHECKSUMS.values():
        algorithm, _, digest = checksum.partition(":")
        assert len(digest) == {"md5": 32, "sha256": 64}[algorithm] and int(digest, 16) >= 0


# ----------------------------------------------------------------------------- the task


def test_default_split_by_alphabet_and_rotations_in_train_only(tmp_path, omniglot_root):
    splits = omniglot_task(str(omniglot_root), n_way=3, k_shot=1, q_query=2, cache_dir=str(tmp_path / "c"))
    assert splits.loss == "cross_entropy" and splits.metric == "accuracy"
    data = load_omniglot(omniglot_root, cache=False)
    n = len(data.characters)
    by_alphabet = {a: {i for i, (b, _) in enumerate(data.characters) if b == a} for a in data.alphabets}
    val = by_alphabet["Balinese"]
    test = by_alphabet["Early_Aramaic"] | by_alphabet["Tagalog"]
    train = set(range(n)) - val - test
    assert set(splits.val.classes) == val and set(splits.test.classes) == test
    assert set(splits.train.classes) == {c + k * n for c in train for k in range(4)}  # 4x classes
    sampler = splits.train
    for c in sorted(train):
        original = data.images[data.labels == c]  # [4, 1, 28, 28]
        for k in range(1, 4):
            rotated = sampler.inputs[sampler.by_class[c + k * n]]
            assert torch.equal(rotated, torch.rot90(original, k, dims=(-2, -1)))
            assert not torch.equal(rotated, original)
        assert torch.equal(sampler.inputs[sampler.by_class[c]], original)
    for split in (splits.val, splits.test):  # never rotated: the images of each class are the originals
        for c in split.classes:
            assert torch.equal(split.inputs[split.by_class[c]], data.images[data.labels == c])


def test_episodes_hold_the_images_of_their_classes(omniglot_root, tmp_path):
    splits = omniglot_task(str(omniglot_root), n_way=3, k_shot=2, q_query=2, seed=1, cache_dir=str(tmp_path / "c"))
    data = load_omniglot(omniglot_root, cache=False)
    for split, sampler in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        assert isinstance(sampler, FewShotSampler) and sampler.stream == ("train", "val", "test").index(split)
        e = sampler.episode(3)
        assert e.support_x.shape == (6, 1, 28, 28) and e.query_x.shape == (6, 1, 28, 28)
        assert e.support_x.dtype == torch.float32 and e.support_x.min() >= 0 and e.support_x.max() <= 1
        for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
            for image, label in zip(x, y.tolist()):
                pool = sampler.inputs[sampler.by_class[e.meta["classes"][label]]].float() / 255
                assert any(torch.equal(image, candidate) for candidate in pool)
        if split != "train":
            assert all(c < len(data.characters) for c in e.meta["classes"])


def test_rotations_off_and_explicit_splits(omniglot_root, tmp_path):
    splits = omniglot_task(
        str(omniglot_root),
        train_alphabets=["Greek", "Latin"],
        test_alphabets="Korean",
        n_way=2,
        q_query=1,
        rotations=False,
        cache_dir=str(tmp_path / "c"),
    )
    data = load_omniglot(omniglot_root, cache=False)
    ids = {a: [i for i, (b, _) in enumerate(data.characters) if b == a] for a in data.alphabets}
    assert splits.train.classes == sorted(ids["Greek"] + ids["Latin"])
    assert splits.val.classes == ids["Balinese"] and splits.test.classes == ids["Korean"]
    no_val = omniglot_task(str(omniglot_root), val_alphabets=[], n_way=2, q_query=1, cache_dir=str(tmp_path / "c"))
    assert no_val.val is None and no_val.train is not None


def test_split_alphabets_defaults_and_explicit_lists():
    available = ["A", "B", "C", "D", "E"]
    assert split_alphabets(available, default_val=["B"], default_test=["C", "E"]) == {
        "train": ["A", "D"],
        "val": ["B"],
        "test": ["C", "E"],
    }
    # a default loses the alphabets given explicitly elsewhere; train takes what is left
    out = split_alphabets(available, test=["B", "C"], default_val=["B"], default_test=["E"])
    assert out == {"train": ["A", "D", "E"], "val": [], "test": ["B", "C"]}
    # defaults naming absent alphabets are ignored
    out = split_alphabets(["A", "B"], default_val=["X"], default_test=["B"])
    assert out == {"train": ["A"], "val": [], "test": ["B"]}


def test_unknown_and_overlapping_alphabets_are_config_errors(omniglot_root, tmp_path):
    with pytest.raises(ConfigError, match="Klingon") as info:
        omniglot_task(str(omniglot_root), test_alphabets=["Klingon"], cache_dir=str(tmp_path / "c"))
    assert "Balinese" in str(info.value) and "Tagalog" in str(info.value)  # the available ones are listed
    with pytest.raises(ConfigError, match="Korean.*train_alphabets and test_alphabets"):
        omniglot_task(str(omniglot_root), train_alphabets=["Korean", "Greek"], test_alphabets=["Korean"])
    with pytest.raises(ConfigError, match="no Omniglot test alphabets among these sets: set test_alphabets, or"):
        split_alphabets(["A", "B"], default_val=["B"], default_test=["X"])
    assert split_alphabets(["A", "B"], val=[], test=[]) == {"train": ["A", "B"], "val": [], "test": []}


def test_within_alphabet_episodes_never_mix_alphabets_and_are_deterministic(omniglot_root, tmp_path):
    # val: Balinese (3 characters) + Japanese_(katakana) (3) + Early_Aramaic (2): 2-way episodes come
    # from one of them alone, never mixed
    splits = omniglot_task(str(omniglot_root), val_alphabets=["Balinese", "Japanese_(katakana)", "Early_Aramaic"],
                           test_alphabets=["Tagalog", "Sanskrit"], n_way=2, k_shot=1, q_query=1, seed=2,
                           within_alphabet=True, cache_dir=str(tmp_path / "c"))  # fmt: skip
    data = load_omniglot(str(omniglot_root), cache_dir=str(tmp_path / "c"))
    seen = set()
    for i in range(40):
        episode = splits.val.episode(i)
        alphabets = {data.characters[c][0] for c in episode.meta["classes"]}
        assert len(alphabets) == 1 and len(episode.meta["classes"]) == 2
        seen |= alphabets
        assert episode.meta["classes"] == splits.val.episode(i).meta["classes"]
        test = {data.characters[c][0] for c in splits.test.episode(i).meta["classes"]}
        assert len(test) == 1
    assert seen == {"Balinese", "Japanese_(katakana)", "Early_Aramaic"}  # every alphabet is drawn
    across = omniglot_task(str(omniglot_root), val_alphabets=["Balinese", "Japanese_(katakana)", "Early_Aramaic"],
                           test_alphabets=["Tagalog", "Sanskrit"], n_way=2, k_shot=1, q_query=1, seed=2,
                           cache_dir=str(tmp_path / "c"))  # fmt: skip
    mixed = [{data.characters[c][0] for c in across.val.episode(i).meta["classes"]} for i in range(40)]
    assert any(len(a) > 1 for a in mixed)  # without the option, episodes mix alphabets
    n = len(data.characters)  # rotated training classes are c + k n
    train = [{data.characters[c % n][0] for c in splits.train.episode(i).meta["classes"]} for i in range(20)]
    assert any(len(a) > 1 for a in train)  # training episodes still mix
    with pytest.raises(ConfigError, match="a group \\(alphabet\\) with 3 classes; the largest in the test split has 2"):
        omniglot_task(str(omniglot_root), test_alphabets=["Tagalog", "Sanskrit"], n_way=3, q_query=1,
                      within_alphabet=True, cache_dir=str(tmp_path / "c"))  # fmt: skip


def test_within_alphabet_training_episodes_share_one_alphabet_and_one_orientation(omniglot_root, tmp_path):
    data = load_omniglot(str(omniglot_root), cache_dir=str(tmp_path / "c"))
    n = len(data.characters)  # rotated training class c is character c % n turned c // n quarter turns
    splits = omniglot_task(str(omniglot_root), train_alphabets=["Korean", "Greek"], val_alphabets=[],
                           test_alphabets=["Tagalog"], n_way=2, k_shot=1, q_query=1, seed=4,
                           train_within_alphabet=True, cache_dir=str(tmp_path / "c"))  # fmt: skip
    seen = set()
    for i in range(80):
        classes = splits.train.episode(i).meta["classes"]
        groups = {(data.characters[c % n][0], c // n) for c in classes}
        assert len(groups) == 1 and len(classes) == 2
        assert classes == splits.train.episode(i).meta["classes"]  # deterministic for the seed
        seen |= groups
    assert seen == {(a, k) for a in ("Korean", "Greek") for k in range(4)}  # every alphabet at every turn
    mixed = omniglot_task(str(omniglot_root), train_alphabets=["Korean", "Greek"], val_alphabets=[],
                          test_alphabets=["Tagalog"], n_way=2, k_shot=1, q_query=1, seed=4,
                          cache_dir=str(tmp_path / "c"))  # fmt: skip
    pooled = [{(data.characters[c % n][0], c // n) for c in mixed.train.episode(i).meta["classes"]} for i in range(40)]
    assert any(len(g) > 1 for g in pooled)  # by default training episodes mix


def test_a_final_run_trains_on_every_background_character(omniglot_root, tmp_path):
    data = load_omniglot(str(omniglot_root), cache_dir=str(tmp_path / "c"))
    every = omniglot_task(str(omniglot_root), val_alphabets=[], test_alphabets=[], n_way=2, q_query=1,
                          rotations=False, cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert every.val is None and every.test is None
    assert every.train.classes == list(range(len(data.characters)))  # every character of every alphabet
    held = omniglot_task(str(omniglot_root), val_alphabets=[], test_alphabets=[], val_characters=0.5, n_way=2,
                         q_query=1, rotations=False, seed=3, cache_dir=str(tmp_path / "c"))  # fmt: skip
    train, val = set(held.train.classes), set(held.val.classes)
    assert not train & val and train | val == set(range(len(data.characters)))
    for alphabet in data.alphabets:  # half of every alphabet's characters held out for validation
        own = {c for c, (a, _) in enumerate(data.characters) if a == alphabet}
        assert len(own & val) == round(len(own) * 0.5)
    with pytest.raises(ConfigError, match="val_characters must be a fraction"):
        omniglot_task(str(omniglot_root), val_characters=1.0, cache_dir=str(tmp_path / "c"))


def test_task_checks_episode_sizes(omniglot_root, tmp_path):
    with pytest.raises(ConfigError, match="n_way=5 but this split has only 3 classes"):
        omniglot_task(str(omniglot_root), n_way=5, q_query=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="k_shot \\+ q_query = 5"):
        omniglot_task(str(omniglot_root), n_way=3, k_shot=1, q_query=4, cache_dir=str(tmp_path / "c"))


def test_rotate_classes():
    images = torch.arange(2 * 9, dtype=torch.uint8).reshape(2, 1, 3, 3)
    labels = torch.tensor([1, 0])
    out, new = rotate_classes(images, labels, n_classes=5)
    assert out.shape == (8, 1, 3, 3) and new.tolist() == [1, 0, 6, 5, 11, 10, 16, 15]
    assert torch.equal(out[2], torch.rot90(images[0], 1, dims=(-2, -1)))
    assert torch.equal(out[7], torch.rot90(images[1], 3, dims=(-2, -1)))


# ----------------------------------------------------------------------------- the real minimal sets


@pytest.mark.skipif(
    not (REAL_ROOT / f"{SMALL1}.zip").is_file(), reason=f"the Omniglot minimal sets are not in {REAL_ROOT}"
)
def test_real_minimal_sets(tmp_path):
    start = time.perf_counter()
    data = load_omniglot(REAL_ROOT, cache_dir=tmp_path / "cache")
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = load_omniglot(REAL_ROOT, cache_dir=tmp_path / "cache")
    cached = time.perf_counter() - start
    print(f"\nOmniglot minimal sets: first load {first:.2f} s, cached load {cached:.3f} s")
    assert len(data.alphabets) == 8 and len(data.characters) == 242 and data.images.shape == (4840, 1, 28, 28)
    counts = {a: data.alphabet.count(a) for a in data.alphabets}
    assert counts == {
        "Balinese": 24,
        "Early_Aramaic": 22,
        "Greek": 24,
        "Japanese_(katakana)": 47,
        "Korean": 40,
        "Latin": 26,
        "Sanskrit": 42,
        "Tagalog": 17,
    }
    assert torch.bincount(data.labels).tolist() == [20] * 242
    assert data.images[:, :, :2].float().mean() < 5 and data.images.float().mean() < 40  # ink bright, little of it
    assert torch.equal(again.images, data.images) and cached < max(1.0, first)
    splits = omniglot_task(str(REAL_ROOT), n_way=20, k_shot=5, q_query=15, cache_dir=str(tmp_path / "cache"))
    assert (len(splits.train.classes), len(splits.val.classes), len(splits.test.classes)) == (4 * 179, 24, 39)
    # the official sha256 values: a download from the shared copies (file://) verifies them
    server = tmp_path / "server"
    server.mkdir()
    for folder in (SMALL1, SMALL2):
        shutil.copy(REAL_ROOT / f"{folder}.zip", server / f"{folder}.zip")
    root = tmp_path / "downloaded"
    loaded = load_omniglot(root, cache_dir=tmp_path / "cache", download=True, base_url=server.as_uri())
    assert torch.equal(loaded.images, data.images)


def test_fixture_file_ids_are_shared_by_identical_characters(omniglot_root):
    with zipfile.ZipFile(omniglot_root / f"{SMALL1}.zip") as a, zipfile.ZipFile(omniglot_root / f"{SMALL2}.zip") as b:
        greek = sorted(n.split("/", 1)[1] for n in a.namelist() if "/Greek/" in n)
        assert greek == sorted(n.split("/", 1)[1] for n in b.namelist() if "/Greek/" in n)
    assert f"Greek/character01/{omniglot_file_id('Greek', 'character01')}_01.png" in greek


def test_affine_augmentation_changes_the_training_images_only(omniglot_root, tmp_path):
    common = {"n_way": 2, "k_shot": 1, "q_query": 1, "seed": 4, "cache_dir": str(tmp_path / "c")}
    plain = omniglot_task(str(omniglot_root), **common)
    moved = omniglot_task(str(omniglot_root), affine={"degrees": 15, "shear": 10, "scale": 0.1, "translate": 0.1},
                          **common)  # fmt: skip
    a, b = plain.train.episode(3), moved.train.episode(3)
    assert a.meta == b.meta and torch.equal(a.support_y, b.support_y)  # the same characters and draws
    assert not torch.equal(a.support_x, b.support_x) and torch.equal(b.support_x, moved.train.episode(3).support_x)
    assert torch.equal(plain.test.episode(0).query_x, moved.test.episode(0).query_x)  # evaluation untouched

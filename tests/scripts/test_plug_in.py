"""A loss meta-learned by scripts/meta_train.py, plugged into scripts/train.py: the file the run
writes gives the same values as the module rebuilt from the run's checkpoint, and train.py trains
with it; files train.py cannot use (an optimizer, a loss that needs episodes, a truncated file, a
truncated idx file) are one line and exit 2."""

from __future__ import annotations

import gzip

import pytest
import torch
from script_runner import TINY, TRAIN, run_script

from metaloss.io import load_loss, save_meta_object
from metaloss.meta import ML3Loss, NPBMLLoss, WarpPreconditioner

BASE = ["progress=false", "threads=1"]


@pytest.fixture(scope="module")
def ml3_run(tmp_path_factory):
    run = run_script(tmp_path_factory.mktemp("meta") / "run", [*TINY, "task=blobs", "algorithm=ml3", "logger=none"])
    assert run.returncode == 0, run.explain()
    return run


def test_a_loss_saved_by_meta_train_is_the_checkpoints_loss_and_trains_in_train_py(ml3_run, tmp_path):
    file = ml3_run.dir / "inner_loss.safetensors"
    assert ml3_run.metrics()["saved_meta_objects"][0] == file.name
    in_memory = ML3Loss(hidden=(50, 50))  # configs/inner_loss/ml3.yaml
    in_memory.load_state_dict(torch.load(ml3_run.dir / "checkpoint.pt", weights_only=True)["meta"]["inner_loss"])
    loaded = load_loss(file)
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    assert torch.equal(loaded(logits, targets), in_memory(logits, targets))
    assert not torch.equal(in_memory(logits, targets), ML3Loss(hidden=(50, 50))(logits, targets))  # phi was read

    run = run_script(tmp_path / "train", [*BASE, "train.steps=30", "loss=learned", f"loss.path={file}"], script=TRAIN)
    assert run.returncode == 0, run.explain()
    metrics = run.metrics()
    assert (metrics["loss"], metrics["steps"]) == ("learned", 30) and 0 <= metrics["test_accuracy"] <= 1


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, make_fashion_mnist_split) -> dict:
    base = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    good = save_meta_object(ML3Loss(hidden=(4,)), base / "ml3.safetensors")
    truncated = base / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    fashion = base / "fashion"
    fashion.mkdir()
    make_fashion_mnist_split(fashion, "train", 40, gz=True, seed=1)
    make_fashion_mnist_split(fashion, "t10k", 20, gz=True, seed=2)
    images = fashion / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))  # 100 pixels short
    return {
        "optimizer": save_meta_object(WarpPreconditioner(lr=0.1, shapes={"w": (3, 2)}), base / "warp.safetensors"),
        "npbml": save_meta_object(NPBMLLoss(3, hidden=(4,)), base / "npbml.safetensors"),
        "truncated": truncated,
        "fashion": fashion,
    }


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss=learned", "loss.path={optimizer}"], "holds a optimizer (warp), not a loss"),
    (["loss=learned", "loss.path={npbml}"], "NPBMLLoss needs a meta-learning context"),
    (["loss=learned", "loss.path={truncated}"], "is not a readable meta-object file"),
    (["data=fashion_mnist", "data.root={fashion}"], "t10k-images-idx3-ubyte.gz"),
], ids=["optimizer_file", "npbml_loss", "truncated_loss_file", "truncated_idx"])  # fmt: skip
def test_files_train_py_cannot_use_are_one_line(bad_files, tmp_path, overrides, message):
    run = run_script(tmp_path / "run", [*BASE, *(o.format(**bad_files) for o in overrides)], script=TRAIN)
    assert run.returncode == 2, run.explain()
    assert run.stderr.strip().splitlines()[-1].startswith("error:") and message in run.stderr, run.explain()
    assert "Traceback" not in run.stderr and not run.metrics_file.exists()

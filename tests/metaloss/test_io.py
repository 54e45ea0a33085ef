"""Saved meta-objects: one safetensors file, weights bit-exact, rebuilt without code; files that
are truncated, foreign, of another family, kind or version are one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from metaloss.io import MetaObjectError, load_loss, load_meta_object, save_meta_object
from metaloss.meta import ML3Loss, ML3RegressionLoss, TaylorGLOLoss
from metaloss.types import Episode, LossContext


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", [lambda: ML3Loss(hidden=(7, 5)), lambda: ML3RegressionLoss(2, 1, hidden=(4,)),
                                  lambda: TaylorGLOLoss((0.2, -0.1), (0.5, 0.1, -0.3, 1.2, 0.0, 0.4))],
                         ids=["ml3", "ml3_regression", "taylorglo"])  # fmt: skip
def test_round_trip_is_bit_exact(tmp_path, make, dtype):
    torch.manual_seed(0)
    module = make().to(dtype)
    path = save_meta_object(module, tmp_path / "loss.safetensors")
    loaded = load_loss(path)
    assert type(loaded) is type(module)
    original, restored = module.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) and restored[k].dtype == dtype for k in original)
    if isinstance(module, ML3RegressionLoss):
        x, pred, y = (torch.randn(6, 2, dtype=dtype), torch.randn(6, 1, dtype=dtype), torch.randn(6, 1, dtype=dtype))
        context = LossContext(x, {}, 0, Episode(x, y, x, y))
        assert torch.equal(module(pred, y, context), loaded(pred, y, context))
    else:
        logits, target = torch.randn(6, 4, dtype=dtype), torch.tensor([0, 1, 2, 3, 1, 0])
        assert torch.equal(module(logits, target), loaded(logits, target))
    assert [p.name for p in tmp_path.iterdir()] == ["loss.safetensors"]


def test_bad_files_are_one_line_errors(tmp_path):
    good = save_meta_object(ML3Loss(hidden=(3,)), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:50])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign), metadata={"format": "something-else"})
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.ones(2)}, str(newer), metadata={"format": "metaloss-meta-object", "version": "9",
                                                          "family": "ml3"})  # fmt: skip
    unknown = tmp_path / "unknown.safetensors"
    save_file({"w": torch.ones(2)}, str(unknown), metadata={"format": "metaloss-meta-object", "version": "1",
                                                            "family": "os.system", "kind": "loss"})  # fmt: skip
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"net.head.weight": torch.ones(1, 3)}, str(mismatched), metadata={
        "format": "metaloss-meta-object", "version": "1", "family": "ml3", "kind": "loss",
        "config": json.dumps({"hidden": [3]})})  # fmt: skip
    pickle_file = tmp_path / "pickle.pt"
    torch.save({"a": 1}, pickle_file)
    cases = {
        tmp_path / "missing.safetensors": "meta-object file not found",
        truncated: "is not a readable meta-object file",
        pickle_file: "is not a readable meta-object file",
        foreign: "is not a metaloss meta-object (format 'something-else')",
        newer: "has meta-object version '9'; this metaloss reads version 1",
        unknown: "holds a 'os.system', which this metaloss cannot rebuild",
        mismatched: "its ml3 cannot be rebuilt",
    }
    for path, message in cases.items():
        with pytest.raises(MetaObjectError, match=re.escape(message)) as err:
            load_loss(path)
        assert len(str(err.value).splitlines()) == 1
    with pytest.raises(MetaObjectError, match="holds a ml3, not a taylorglo"):
        load_meta_object(good, family="taylorglo")
    with pytest.raises(MetaObjectError, match="holds a loss"):
        load_meta_object(good, kind="optimizer")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_npbml_loss_round_trip_is_bit_exact(tmp_path, dtype):
    from metaloss.functional import forward
    from metaloss.meta import NPBMLLoss

    torch.manual_seed(0)
    module = NPBMLLoss(4, hidden=(5, 3), film=True).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # FiLM off its zero start
    loaded = load_loss(save_meta_object(module, tmp_path / "npbml.safetensors"))
    assert type(loaded) is NPBMLLoss and loaded.config() == module.config()
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), loaded.state_dict().values()))
    net = torch.nn.Linear(3, 4).to(dtype)
    params = dict(net.named_parameters())
    x, xq, y = torch.randn(8, 3, dtype=dtype), torch.randn(6, 3, dtype=dtype), torch.tensor([0, 1, 2, 3] * 2)
    context = LossContext(x, params, 0, Episode(x, y, xq, y[:6]), lambda inputs: forward(net, params, inputs))
    assert torch.equal(module(net(x), y, context), loaded(net(x), y, context))


@pytest.mark.parametrize("family", ["warp", "mlp_update_rule"])
def test_learned_optimizers_round_trip_bit_exact_and_take_the_same_step(tmp_path, family):
    from metaloss.io import load_optimizer
    from metaloss.meta import MLPUpdateRule, WarpPreconditioner

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    module = WarpPreconditioner(net, lr=0.1, max_block=4) if family == "warp" else MLPUpdateRule(hidden=6)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = save_meta_object(module, tmp_path / "opt.safetensors")
    loaded = load_optimizer(path)
    assert type(loaded) is type(module) and loaded.config() == module.config()
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), loaded.state_dict().values()))
    params = {n: p.detach() for n, p in net.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    a, b = module(), loaded()
    new_a, _ = a.update(grads, a.init(params), params)
    new_b, _ = b.update(grads, b.init(params), params)
    assert all(torch.equal(new_a[n], new_b[n]) for n in params)
    with pytest.raises(MetaObjectError, match="holds a optimizer"):
        load_loss(path)  # an optimizer is not a criterion

"""The BatchNorm policies of the inner loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaloss.errors import ConfigError
from metaloss.functional import apply_batchnorm_policy, forward
from metaloss.models import Conv4


def test_transductive_normalises_with_the_batch_and_keeps_no_statistics() -> None:
    model = apply_batchnorm_policy(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "transductive")
    bn = model[1]
    assert bn.running_mean is None and not bn.track_running_stats
    x = torch.randn(8, 3)
    params = {n: p.detach() * 2 for n, p in model.named_parameters()}
    out = forward(model, params, x)
    h = x @ params["0.weight"].T + params["0.bias"]
    expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * params["1.weight"] + params["1.bias"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the statistics of one batch never reach another: the same input gives the same output
    forward(model, params, torch.randn(8, 3) * 10)
    torch.testing.assert_close(forward(model, params, x), out)


def test_frozen_uses_running_statistics() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2))
    model[0].running_mean.fill_(1.0)
    apply_batchnorm_policy(model, "frozen")
    out = forward(model, dict(model.named_parameters()), torch.ones(3, 2))
    torch.testing.assert_close(out, torch.zeros(3, 2), atol=1e-6, rtol=0)


def test_unknown_or_impossible_policies_fail() -> None:
    with pytest.raises(ConfigError):
        apply_batchnorm_policy(nn.BatchNorm1d(2), "sideways")
    with pytest.raises(ConfigError):
        apply_batchnorm_policy(nn.BatchNorm1d(2, track_running_stats=False), "frozen")
    with pytest.raises(ConfigError, match="per-step"):
        apply_batchnorm_policy(Conv4(norm="batch_per_step"), "frozen")

"""Stateless models: parameter dicts and `torch.func.functional_call`.

BatchNorm policy inside inner loops (`apply_batchnorm_policy`):

- ``"transductive"`` (MAML's): every forward pass normalises with the statistics
  of the batch it is given -- the support batch in inner steps, the query batch
  in the outer loss. No running statistics are kept, so nothing leaks between
  tasks and the module stays a pure function of (params, x). This is what
  Finn et al. (2017) and `higher`-based MAML code do.
- ``"frozen"``: normalise with fixed running statistics (the module in eval
  mode); use it to adapt a pretrained network whose statistics must not move.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaloss.errors import ConfigError
from metaloss.types import Params

BATCHNORM_POLICIES = ("transductive", "frozen")


def forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """Run `model` on `x` with `params` in place of its own parameters (buffers kept)."""
    return functional_call(model, params, (x,), strict=False)


def named_params(module: nn.Module, names: Iterable[str] | None = None) -> Params:
    """The module's parameters as a dict, optionally restricted to `names` (no copies)."""
    params = dict(module.named_parameters())
    if names is None:
        return params
    return {name: params[name] for name in names}


def apply_batchnorm_policy(model: nn.Module, policy: str) -> nn.Module:
    """Put every BatchNorm layer of `model` under `policy` (see module docstring); in place."""
    if policy not in BATCHNORM_POLICIES:
        raise ConfigError(f"unknown batchnorm policy {policy!r}; expected one of {BATCHNORM_POLICIES}")
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if policy == "transductive":
                module.track_running_stats = False
                module.running_mean = None
                module.running_var = None
                module.num_batches_tracked = None
                module.train()
            else:
                if module.running_mean is None:
                    raise ConfigError("batchnorm policy 'frozen' needs a model with running statistics")
                module.eval()
    return model


def detach_params(params: Params, requires_grad: bool = False) -> Params:
    """Cut `params` from the graph (a stop-gradient); optionally make them leaves that track grad."""
    return {name: p.detach().requires_grad_(requires_grad) for name, p in params.items()}


def zeros_like_params(params: Params) -> Params:
    """A dict of zeros with the shapes, dtypes and devices of `params`."""
    return {name: torch.zeros_like(p) for name, p in params.items()}

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

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaloss.errors import ConfigError
from metaloss.models import PerStepBatchNorm2d
from metaloss.types import Params

BATCHNORM_POLICIES = ("transductive", "frozen")


def forward(model: nn.Module, params: Params, x: Tensor, step: int | None = None) -> Tensor:
    """Run `model` on `x` with `params` in place of its own parameters (buffers kept). A model whose
    `takes_step` is true (e.g. per-step BatchNorm) is given the inner step too (None: after
    adaptation); other models ignore it."""
    if step is not None and getattr(model, "takes_step", False):
        return functional_call(model, params, (x,), {"step": step}, strict=False)
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
        if policy == "frozen" and isinstance(module, PerStepBatchNorm2d):
            raise ConfigError("batchnorm policy 'frozen' needs running statistics; per-step BatchNorm has none")
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


# Parameter trees: nests of dicts, lists and tuples with tensors (and other leaves, e.g. Adam's step
# count) at the leaves. Inner parameters are flat dicts; inner-optimizer states nest.


def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """The same nest with `fn` applied to every tensor (other leaves kept)."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        mapped = [tree_map(fn, v) for v in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else type(tree)(mapped)
    return tree


def tree_tensors(tree: Any) -> list[Tensor]:
    """Every tensor of a nest, in a fixed order (dict keys sorted)."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in tree_tensors(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tree_tensors(v)]
    return []


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """(every leaf, tensors and others, in order; the nest's structure) for `tree_unflatten`."""
    leaves: list[Any] = []

    def structure(node: Any) -> Any:  # plain names, so a saved structure loads with weights_only=True
        if isinstance(node, dict):
            return ("dict", [(k, structure(v)) for k, v in node.items()])
        if isinstance(node, (list, tuple)):
            kind = type(node) if hasattr(node, "_fields") else type(node).__name__
            return (kind, [structure(v) for v in node])
        leaves.append(node)
        return None

    return leaves, structure(tree)


def tree_unflatten(leaves: Sequence[Any], spec: Any) -> Any:
    """The nest of `spec` (from `tree_flatten`) with `leaves` in its leaves' places."""
    remaining = iter(leaves)

    def build(node: Any) -> Any:
        if node is None:
            return next(remaining)
        kind, children = node
        if kind == "dict":
            return {k: build(c) for k, c in children}
        built = [build(c) for c in children]
        return {"list": list, "tuple": tuple}[kind](built) if isinstance(kind, str) else kind(*built)

    return build(spec)


def tree_detach(tree: Any) -> Any:
    """Detach every tensor of a nest (a stop-gradient, e.g. on an optimizer state)."""
    return tree_map(Tensor.detach, tree)


def detach_params(params: Params, requires_grad: bool = False) -> Params:
    """Cut `params` from the graph (a stop-gradient); optionally make them leaves that track grad."""
    return tree_map(lambda p: p.detach().requires_grad_(requires_grad), params)


def zeros_like_params(params: Params) -> Params:
    """A dict of zeros with the shapes, dtypes and devices of `params`."""
    return {name: torch.zeros_like(p) for name, p in params.items()}

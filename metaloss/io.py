"""Saving a meta-learned object (a learned loss, ...) as one file, and loading it back as a module.

The file is safetensors: the module's tensors, and in the metadata (JSON strings) the format, its
version, the family (a name from `FAMILIES`) and the constructor arguments that rebuild the module.
No code is pickled and nothing is imported by name from the file: only the families listed here
can be rebuilt.

    save_meta_object(loss, "loss.safetensors")
    criterion = load_loss("loss.safetensors")        # criterion(logits, targets) -> scalar
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaloss.checkpoint import atomic_write
from metaloss.errors import ConfigError
from metaloss.meta.loss import ML3Loss, ML3RegressionLoss, NPBMLLoss, TaylorGLOLoss
from metaloss.meta.optimizer import MLPUpdateRule, WarpPreconditioner

FORMAT, VERSION = "metaloss-meta-object", 1
FAMILIES: dict[str, type[nn.Module]] = {
    "ml3": ML3Loss,
    "ml3_regression": ML3RegressionLoss,
    "taylorglo": TaylorGLOLoss,
    "npbml": NPBMLLoss,
    "warp": WarpPreconditioner,
    "mlp_update_rule": MLPUpdateRule,
}
KINDS = {"ml3": "loss", "ml3_regression": "loss", "taylorglo": "loss", "npbml": "loss", "warp": "optimizer",
         "mlp_update_rule": "optimizer"}  # fmt: skip


class MetaObjectError(ConfigError):
    """A meta-object file that cannot be used: unreadable, of another family, kind or version."""


def family_of(module: nn.Module) -> str:
    for name, cls in FAMILIES.items():
        if type(module) is cls:
            return name
    raise ConfigError(f"{type(module).__name__} is not a savable meta-object; families: {sorted(FAMILIES)}")


def save_meta_object(module: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `module` (a family of `FAMILIES` with a `config()`) to `path` atomically."""
    from safetensors.torch import save

    family = family_of(module)
    metadata = {"format": FORMAT, "version": str(VERSION), "family": family, "kind": KINDS[family],
                "config": json.dumps(module.config()), "extra": json.dumps(extra or {})}  # fmt: skip
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    data = save(tensors, metadata=metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_meta_object(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a meta-object file; MetaObjectError (one line) when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MetaObjectError(f"meta-object file not found: {path.resolve()}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # truncated, not safetensors at all, ...: the library raises several types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MetaObjectError(f"{path} is not a readable meta-object file (safetensors): {first[:160]}") from None
    if metadata.get("format") != FORMAT:
        raise MetaObjectError(f"{path} is not a metaloss meta-object (format {metadata.get('format')!r})")
    if metadata.get("version") != str(VERSION):
        raise MetaObjectError(f"{path} has meta-object version {metadata.get('version')!r}; this metaloss reads "
                              f"version {VERSION}")  # fmt: skip
    if metadata.get("family") not in FAMILIES:
        raise MetaObjectError(f"{path} holds a {metadata.get('family')!r}, which this metaloss cannot rebuild; "
                              f"families: {sorted(FAMILIES)}")  # fmt: skip
    return metadata, tensors


def load_meta_object(path: str | Path, kind: str | None = None, family: str | None = None) -> nn.Module:
    """Rebuild the module saved in `path` (its weights bit-exact); `kind` / `family`: what the
    caller needs, refused in one line when the file holds something else."""
    metadata, tensors = read_meta_object(path)
    if kind is not None and metadata.get("kind") != kind:
        raise MetaObjectError(f"{path} holds a {metadata.get('kind')} ({metadata['family']}), not a {kind}")
    if family is not None and metadata["family"] != family:
        raise MetaObjectError(f"{path} holds a {metadata['family']}, not a {family}")
    try:
        module = FAMILIES[metadata["family"]](**json.loads(metadata["config"]))
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) == 1:
            module.to(dtypes.pop())  # before loading, so float64 weights stay float64
        module.load_state_dict(tensors)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise MetaObjectError(f"{path}: its {metadata['family']} cannot be rebuilt: {first[:160]}") from None
    return module


def load_optimizer(path: str | Path) -> nn.Module:
    """A saved learned inner optimizer: a module whose `forward()` returns the pure
    `(init, update)` pair (`metaloss.inner.optim.InnerOptimizer`)."""
    return load_meta_object(path, kind="optimizer")


def load_loss(path: str | Path) -> nn.Module:
    """A saved learned loss as a criterion: `criterion(prediction, target) -> scalar` (ML3's
    regression form and NPBML's task-adaptive loss also take a `LossContext`)."""
    return load_meta_object(path, kind="loss").eval()

"""Meta-training over several processes (ranks) with `torch.distributed`, launched by `torchrun`.

The episodic regime splits each meta-batch of B episodes over the W ranks: rank r runs the inner
loops and the estimator on episodes [r B / W, (r + 1) B / W) of the meta-batch, and the estimates
are combined before the one outer step into exactly the single-process mean over the B tasks,

    g = sum_r (B_r / B) g_r,      g_r: the mean estimate over rank r's B_r tasks,

(and the same for the outer loss and every metric), so that every rank applies the same update and
holds identical phi and outer-optimizer state. `DistributedDataParallel` is not used: it does not
support double backward (pytorch#63929), which second-order meta-gradients need; the estimates are
all-reduced here instead. An estimator whose noise is drawn per task (the episodic ES kinds) is told
the meta-batch position of its first episode (`HypergradEstimator.task_offset`), so its noise does
not depend on the number of ranks.

The online regime (one training run, `metaloss.lookahead.LookaheadTraining`) is data-parallel
instead (split "rows", `BilevelProblem.data_parallel`): each minibatch of B rows of the run and each
meta batch of m rows of a look-ahead are split over the ranks. Rank r's share of the inner loss is
(B_r / B) L_r, the inner gradient is the sum of the shares' gradients over the ranks (`sum_tensors`,
differentiable inside a look-ahead, so its graph spans the ranks), and rank r's meta loss is
W (m_r / m) L_meta,r, so that the plain mean over ranks of the phi-gradients (`reduce` with one
"task" per rank) is the single-process meta-gradient.

Launch: `torchrun --nproc_per_node=N scripts/meta_train.py ...` (several nodes through its rendezvous),
or SLURM through Hydra's submitit launcher (`-m hydra/launcher=slurm`, one SLURM task per rank: the
ranks are read from SLURM's environment with submitit's helper). Without either (no WORLD_SIZE in
the environment) everything here is the identity: one rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.types import HypergradOut

BACKENDS = ("auto", "gloo", "nccl")


_closed_cleanly = False  # set by Distributed.close: this process's job ended well


@dataclass
class Distributed:
    """This process's place in the job: `rank` of `world_size` (1: not distributed), the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, prints and writes checkpoints."""
        return self.rank == 0

    def shard(self, count: int) -> tuple[int, int]:
        """This rank's share [start, stop) of `count` items: contiguous, sizes differing by at most one."""
        return self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size

    def device(self, device: str) -> str:
        """The device of this rank: "cuda" becomes this rank's GPU (cuda:local_rank)."""
        return f"cuda:{self.local_rank}" if self.enabled and device == "cuda" else device

    def reduce(self, out: HypergradOut, count: int, reference: Sequence[Tensor]) -> HypergradOut:
        """The mean over all ranks' tasks of `out` (the mean over this rank's `count` tasks):
        sum_r count_r out_r / sum_r count_r, for the gradients, the outer loss and every metric.
        `reference`: the meta-parameters (shapes and devices of absent gradients). A gradient absent
        (None) on every rank stays None."""
        if not self.enabled:
            return out
        names = sorted(out.metrics)
        header = torch.tensor([float(count), float(count) * float(out.outer_loss)]
                              + [float(count) * float(out.metrics[k]) for k in names]
                              + [float(g is not None) for g in out.grads], dtype=torch.float64)  # fmt: skip
        flat = [torch.zeros_like(p) if g is None else g.detach() * count for g, p in zip(out.grads, reference)]
        packed = torch.cat([header.to(reference[0].device)] + [f.reshape(-1).to(torch.float64) for f in flat])
        dist.all_reduce(packed)  # [2 + metrics + grads + parameters]: one collective per update
        total = float(packed[0])
        values = packed[2 : 2 + len(names)] / total
        present = packed[2 + len(names) : 2 + len(names) + len(flat)]
        offset, grads = 2 + len(names) + len(flat), []
        for g, p, seen in zip(flat, reference, present.tolist()):
            piece = packed[offset : offset + g.numel()].view_as(g).to(p.dtype) / total
            offset += g.numel()
            grads.append(piece if seen > 0 else None)
        metrics = {k: float(v) for k, v in zip(names, values.tolist())}
        return HypergradOut(grads=grads, outer_loss=float(packed[1]) / total, metrics=metrics)

    def sum_tensors(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """sum_r tensors_r, elementwise over the ranks, as one collective (the data-parallel inner
        gradient, `BilevelProblem.data_parallel`). Differentiable where the tensors carry a graph:
        the backward of a sum over ranks is the sum over ranks of the incoming gradients
        (the functional collective's registered backward), so a look-ahead through a data-parallel
        step backpropagates into every rank's share of the step."""
        if not self.enabled or not tensors:
            return list(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])  # [sum of numels]
        if flat.requires_grad:
            from torch.distributed import _functional_collectives as collectives

            flat = collectives.wait_tensor(collectives.all_reduce(flat, "sum", dist.group.WORLD))  # a plain tensor
        else:
            flat = flat.clone()
            dist.all_reduce(flat)
        return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's `items` (picklable), concatenated in rank order, on every rank."""
        if not self.enabled:
            return items
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable), on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """The end of a run that went well: every rank waits for the others before the group is torn
        down (a rank that tore its connections down while another still finished its last collective
        was seen to abort at exit, SIGABRT from gloo's threads, under load in CI)."""
        global _closed_cleanly
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            _closed_cleanly = True


def exit_closed_job() -> None:
    """End a process whose process group was closed cleanly (`Distributed.close`) now, exit status 0,
    without the interpreter's finalisation: there gloo's threads were still seen to abort now and
    then under load (SIGABRT, "terminate called without an active exception"), failing a run that
    had finished and written everything. Call it last, once every output is written; stdio and
    `logging` are flushed first. A no-op in any other process."""
    if not _closed_cleanly:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def export_slurm_environment() -> bool:
    """In a SLURM job of several tasks started by submitit (Hydra's submitit launcher), set RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's variables, as torchrun would;
    returns whether it did. Every task keeps every GPU visible (the rank picks cuda:LOCAL_RANK)."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise ConfigError("a SLURM job of several tasks needs submitit: pip install hydra-submitit-launcher") from None
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def init_distributed(backend: str = "auto", device: str = "cpu", timeout_s: float = 300.0) -> Distributed:
    """Join the job `torchrun` started (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the environment)
    or a SLURM job of several tasks (`export_slurm_environment`), or a one-rank `Distributed` outside
    them. backend "auto": NCCL for device "cuda", else gloo.
    timeout_s: how long a collective waits for a missing rank before it fails (the job then exits
    with an error rather than hang)."""
    if backend not in BACKENDS:
        raise ConfigError(f"distributed.backend must be one of {BACKENDS}, got {backend!r}")
    if timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be > 0, got {timeout_s}")
    export_slurm_environment()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = ("nccl" if device.startswith("cuda") else "gloo") if backend == "auto" else backend
    if chosen == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("distributed.backend=nccl needs CUDA GPUs; on CPU use gloo (or auto)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed(rank, world, local, chosen)

"""The one outer loop (sample -> estimate -> outer step -> log -> checkpoint) and meta-test evaluation."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metaloss.checkpoint import CheckpointError, load_meta_state, rng_state, set_rng_state
from metaloss.distributed import Distributed
from metaloss.errors import ConfigError
from metaloss.hypergrad.base import (
    HypergradEstimator,
    batching_pays,
    check_batchable,
    model_batches_well,
    vmap_refusal,
)
from metaloss.hypergrad.es import AntitheticES
from metaloss.hypergrad.threads import local_copy, map_in_threads, resolve_threads
from metaloss.logging import NullLogger, TensorBoardLogger
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut, Params, TaskSampler, sample_episodes

SPLITS = ("auto", "tasks", "particles", "rows")  # what a distributed run splits over its ranks


class NonFiniteError(RuntimeError):
    """Too many consecutive meta-updates had a non-finite outer loss or meta-gradient."""


@dataclass
class RunState:
    """The outer loop's counters: meta-steps done (the sampler's position is step * meta_batch and
    the logger's step is `step`), updates applied and skipped, and the time spent."""

    step: int = 0
    outer_updates: int = 0
    skipped_updates: int = 0  # non-finite updates skipped, in all
    bad_streak: int = 0  # consecutive non-finite updates, now
    sample_seconds: float = 0.0
    step_seconds: float = 0.0


def finite(out: HypergradOut) -> bool:
    """Whether the outer loss and every meta-gradient are finite (one device sync)."""
    if not math.isfinite(float(out.outer_loss)):
        return False
    checks = [torch.isfinite(g).all() for g in out.grads if g is not None]
    return bool(torch.stack(checks).all()) if checks else True


class MetaTrainer:
    """The one outer loop, for the episodic and the online regime alike:

        sample meta-batch `step` -> estimator.updates -> (finite? outer step : skip) -> log -> checkpoint

    It owns the run state: phi and the outer optimizer (through `problem` and `outer_opt`), the
    estimator's state, the counters (`RunState`; the sampler's position is the step, since episode
    i is a pure function of the sampler's seed and i) and the global RNGs. `state_dict()` holds all
    of it, so a run restored with `load_state_dict()` continues bitwise as the uninterrupted one
    (on CPU, deterministic settings). A non-finite outer loss or meta-gradient skips that update
    (phi and the optimizer state stay as they were); `max_bad_steps` consecutive skips raise
    `NonFiniteError`. With `distributed` (several ranks, `metaloss.distributed`), each rank samples
    and estimates its share of every meta-batch and the estimates are averaged over all the tasks
    before the outer step, so every rank applies the single-process update; `split="particles"`
    (antithetic ES) gives every rank every task and a share of the perturbation pairs instead, and
    `split="rows"` (the online regime, no sampler; "auto" picks it there) makes the one training run
    data-parallel (`BilevelProblem.data_parallel`)."""

    def __init__(
        self,
        problem: BilevelProblem,
        estimator: HypergradEstimator,
        outer_opt: torch.optim.Optimizer,
        sampler: TaskSampler | None = None,
        *,
        meta_batch: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_bad_steps: int = 10,
        distributed: Distributed | None = None,
        split: str = "tasks",
    ) -> None:
        if meta_batch < 1 or max_bad_steps < 1:
            raise ConfigError(f"need meta_batch >= 1 and max_bad_steps >= 1, got {meta_batch} and {max_bad_steps}")
        self.distributed = distributed or Distributed()
        world = self.distributed.world_size
        if split not in SPLITS:
            raise ConfigError(f"distributed.split must be one of {SPLITS}, got {split!r}")
        if split == "auto":  # episodes over the ranks; the online regime (one training run): its rows
            split = "tasks" if sampler is not None else "rows"
        if self.distributed.enabled and (split == "rows") != (sampler is None):
            raise ConfigError("distributed.split=rows is for the online regime (one data-parallel training run, no "
                              "episodes); episodic meta-training splits tasks or particles")  # fmt: skip
        if split == "rows" and self.distributed.enabled:  # every rank a share of every batch's rows
            problem.data_parallel = self.distributed
        self.problem, self.estimator, self.outer_opt, self.sampler = problem, estimator, outer_opt, sampler
        self.split = split
        self.meta_batch, self.device, self.dtype, self.max_bad_steps = meta_batch, device, dtype, max_bad_steps
        self.shard, self.particles = (0, meta_batch), 0  # this rank's episodes [start, stop) of each meta-batch
        if split == "particles" and self.distributed.enabled:  # every rank runs every task, a share of the pairs
            if not isinstance(estimator, AntitheticES) or estimator.particles < world:
                raise ConfigError(f"distributed.split=particles is for hypergrad=es with at least {world} antithetic "
                                  f"pairs (one per rank)")  # fmt: skip
            estimator.particle_range = self.distributed.shard(estimator.particles)
            self.particles = estimator.particle_range[1] - estimator.particle_range[0]
        elif self.distributed.enabled and split == "tasks":
            if meta_batch < world:
                raise ConfigError(f"train.meta_batch ({meta_batch}) must be at least the number of ranks ({world}): "
                                  "every rank runs its share of the tasks")  # fmt: skip
            self.shard = self.distributed.shard(meta_batch)
            estimator.task_offset = self.shard[0]
        self.run = RunState()

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": self.problem.state_dict(),
            "outer_opt": self.outer_opt.state_dict(),
            "estimator": self.estimator.state_dict(),
            "run": dataclasses.asdict(self.run),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` (e.g. a checkpoint's)."""
        missing = [k for k in ("meta", "outer_opt", "estimator", "run", "rng") if k not in state]
        if missing:
            raise CheckpointError(f"the checkpoint cannot resume a run: it lacks {missing} (only phi was saved)")
        load_meta_state(state, self.problem)
        self.outer_opt.load_state_dict(state["outer_opt"])
        self.estimator.load_state_dict(state["estimator"])
        self.run = RunState(**state["run"])
        set_rng_state(state["rng"])

    def step(self, episodes: Sequence[Episode]) -> HypergradOut:
        """One meta-step: phi <- OuterOpt(phi, d L_outer / d phi) for each of the estimator's updates
        (one, unless it updates per truncation), each skipped when non-finite. Several updates
        report their mean metrics and their count as `outer_updates`."""
        outs = []
        for p in self.problem.meta_parameters():
            p.grad = None  # the last step's gradient, applied: not kept alive beside this step's graphs
        for out in self.estimator.updates(self.problem, episodes):
            # what this rank's estimate is the mean over (rows: 1, a share scaled so that the plain mean
            # over the ranks is the estimate, `metaloss.distributed`)
            count = 1 if self.split == "rows" else self.particles or len(episodes)
            out = self.distributed.reduce(out, count, self.problem.meta_parameters())
            first = self.run.outer_updates + self.run.skipped_updates == 0
            if first and out.grads and all(g is None for g in out.grads):
                raise ConfigError(
                    f"{type(self.estimator).__name__} gives no meta-parameter a gradient on this problem, so phi would "
                    "never change (an implicit gradient, or backpropagation truncated after the first inner step, "
                    "never reaches a learned initialisation: use iMAML's proximal term, a longer truncation, or "
                    "learned inner hyperparameters)"
                )
            if finite(out):
                for p, g in zip(self.problem.meta_parameters(), out.grads):
                    p.grad = None if g is None else g.detach()
                self.outer_opt.step()
                self.run.outer_updates += 1
                self.run.bad_streak = 0
            else:
                self.run.skipped_updates += 1
                self.run.bad_streak += 1
                if self.run.bad_streak >= self.max_bad_steps:
                    raise NonFiniteError(
                        f"{self.run.bad_streak} consecutive meta-updates had a non-finite outer loss or meta-gradient "
                        f"(outer loss {out.outer_loss}, meta-step {self.run.step})"
                    )
            outs.append(out)
        if len(outs) == 1:
            return outs[0]
        names = {k for out in outs for k in out.metrics}
        metrics = {k: sum(float(o.metrics[k]) for o in outs if k in o.metrics) / sum(k in o.metrics for o in outs)
                   for k in names}  # fmt: skip
        metrics["outer_updates"] = float(len(outs))
        return HypergradOut(outs[-1].grads, sum(o.outer_loss for o in outs) / len(outs), metrics)

    def train(
        self,
        meta_steps: int,
        *,
        logger: TensorBoardLogger | NullLogger | None = None,
        log_every: int = 10,
        validate: Callable[[int], dict[str, float]] | None = None,
        validate_every: int = 0,
        progress: bool = True,
        checkpoint: Callable[[MetaTrainer], None] | None = None,
        checkpoint_every: int = 0,
        after_step: Callable[[MetaTrainer], None] | None = None,
    ) -> list[dict[str, float]]:
        """Run meta-steps `run.step` .. meta_steps - 1: episodes step*B .. step*B+B-1 of the sampler
        form step `step`'s meta-batch (this rank's share of them, when distributed; no sampler: an online
        system's estimator needs no episodes).
        `after_step(self)` is called after every step; `checkpoint(self)` after every
        `checkpoint_every` steps (0: never) and after the last. Returns this call's metrics of every step, including
        the seconds spent sampling the meta-batch and in the meta-step proper."""
        if meta_steps < 0:
            raise ConfigError(f"need meta_steps >= 0, got {meta_steps}")
        logger = logger or NullLogger()
        history = []
        bar = tqdm(range(self.run.step, meta_steps), desc="meta-train", disable=not progress, dynamic_ncols=True,
                   initial=self.run.step, total=meta_steps)  # fmt: skip
        for step in bar:
            started = time.perf_counter()
            start, stop = self.shard
            sampled_episodes = [] if self.sampler is None else sample_episodes(self.sampler, step * self.meta_batch
                                                                               + start, stop - start)  # fmt: skip
            episodes = [e.to(self.device, self.dtype) for e in sampled_episodes]
            sampled = time.perf_counter()
            skipped = self.run.skipped_updates
            out = self.step(episodes)
            metrics = dict(out.metrics)
            metrics["seconds/sample"], metrics["seconds/step"] = sampled - started, time.perf_counter() - sampled
            metrics["skipped_updates"] = float(self.run.skipped_updates - skipped)
            self.run.step = step + 1
            self.run.sample_seconds += metrics["seconds/sample"]
            self.run.step_seconds += metrics["seconds/step"]
            history.append(metrics)
            if step % log_every == 0 or step == meta_steps - 1 or metrics["skipped_updates"]:
                logger.log(step, metrics, prefix="meta_train/")
                logger.log(step, learning_rates(self.problem, self.outer_opt), prefix="lr/")
                bar.set_postfix(loss=f"{out.outer_loss:.4f}", skipped=self.run.skipped_updates)
            if after_step is not None:
                after_step(self)
            if validate is not None and validate_every and (step + 1) % validate_every == 0:
                logger.log(step, validate(step), prefix="meta_val/")
            if checkpoint is not None and checkpoint_every and self.run.step % checkpoint_every == 0:
                checkpoint(self)
        if checkpoint is not None and not (checkpoint_every and self.run.step % checkpoint_every == 0 and history):
            checkpoint(self)  # the final state, unless the loop just wrote it
        return history


def meta_step(
    problem: BilevelProblem,
    estimator: HypergradEstimator,
    outer_opt: torch.optim.Optimizer,
    episodes: Sequence[Episode],
) -> HypergradOut:
    """One meta-step on `episodes` (see `MetaTrainer.step`)."""
    return MetaTrainer(problem, estimator, outer_opt).step(episodes)


def learning_rates(problem: BilevelProblem, outer_opt: torch.optim.Optimizer) -> dict[str, float]:
    """The outer learning rate(s) and the mean of every learned inner-optimizer hyperparameter."""
    rates = {f"outer_lr/{i}": group["lr"] for i, group in enumerate(outer_opt.param_groups)}
    if isinstance(problem.inner_opt, torch.nn.Module):
        for name, p in problem.inner_opt.named_parameters():
            rates[f"inner_opt/{name}"] = p.detach().float().mean().item()
    return rates


def meta_train(
    problem: BilevelProblem,
    estimator: HypergradEstimator,
    outer_opt: torch.optim.Optimizer,
    sampler: TaskSampler,
    *,
    meta_steps: int,
    meta_batch: int,
    logger: TensorBoardLogger | NullLogger | None = None,
    log_every: int = 10,
    validate: Callable[[int], dict[str, float]] | None = None,
    validate_every: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_bad_steps: int = 10,
) -> list[dict[str, float]]:
    """Meta-train for `meta_steps` outer steps on meta-batches of `meta_batch` episodes with a fresh
    `MetaTrainer` (which see); returns the metrics of every step."""
    trainer = MetaTrainer(problem, estimator, outer_opt, sampler, meta_batch=meta_batch, device=device, dtype=dtype,
                          max_bad_steps=max_bad_steps)  # fmt: skip
    return trainer.train(meta_steps, logger=logger, log_every=log_every, validate=validate,
                         validate_every=validate_every, progress=progress)  # fmt: skip


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval, 1.96 * sd / sqrt(n)."""
    t = torch.tensor(values, dtype=torch.float64)
    if len(t) < 2:
        return t.mean().item(), float("nan")
    return t.mean().item(), 1.96 * t.std(unbiased=True).item() / math.sqrt(len(t))


def evaluate(
    problem: BilevelProblem,
    sampler: TaskSampler,
    num_tasks: int,
    steps: Sequence[int] = (0, 1, 10),
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "meta-test",
    distributed: Distributed | None = None,
    batch_tasks: int | str = 1,
    threads: int | str = 1,
) -> dict[str, float]:
    """Meta-test: adapt on episodes 0..num_tasks-1 of `sampler` and measure the query loss (and
    the problem's metric) after each number of inner steps in `steps`. With `distributed`, each rank
    adapts on its share of the tasks and the results are gathered (the same numbers on every rank).
    batch_tasks: adapt this many tasks at once, as one `torch.func.vmap` batch (the same numbers as
    one at a time; needs episodes of one shape, see `check_batchable`); 1: one after another; "auto":
    `AUTO_BATCH_TASKS` at once where `batching_pays` for the first of them (an MLP: yes; a convnet: no),
    falling back to one at a time, with a warning, where vmap refuses an operation of the problem.
    threads: tasks adapted one at a time run side by side on this many CPU threads
    (`metaloss.hypergrad.threads`; the same numbers; "auto": one per core for a convnet on a CPU).

    Returns {"loss_step{t}": mean, "loss_step{t}_ci95": half-width, ...} over the tasks.
    """
    if batch_tasks != "auto" and (isinstance(batch_tasks, str) or batch_tasks < 1):
        raise ConfigError(f"batch_tasks must be >= 1 or 'auto', got {batch_tasks!r}")
    if num_tasks < 1 or not steps or min(steps) < 0:
        raise ConfigError(f"evaluation needs num_tasks >= 1 and steps >= 0, got {num_tasks} and {list(steps)}")
    distributed = distributed or Distributed()
    wanted = set(steps)
    rows: list[dict[str, float]] = []  # per task of this rank: {"<metric>_step<t>": value}

    def episodes_from(first: int, count: int) -> list[Episode]:
        return [sampler.episode(i).to(device, dtype) for i in range(first, min(first + count, stop))]

    start, stop = distributed.shard(num_tasks)
    size, probe = batch_tasks, []
    if batch_tasks == "auto" and model_batches_well(problem.model):  # (a convnet needs no probe episodes)
        probe = episodes_from(start, AUTO_BATCH_TASKS)  # the first batch, if batching pays
        size = AUTO_BATCH_TASKS if batching_pays(problem, probe) else 1
    elif batch_tasks == "auto":
        size = 1
    workers = resolve_threads(threads, problem.model, stop - start, torch.device(device)) if size == 1 else 1
    bar = tqdm(total=stop - start, desc=desc, disable=not progress, dynamic_ncols=True)
    first = start
    while first < stop:
        if size > 1:
            episodes, probe = probe or episodes_from(first, size), []  # the probe's episodes are the first batch
            try:
                rows += _evaluate_batch(problem, episodes, wanted)
                first += len(episodes)
                bar.update(len(episodes))
                continue
            except RuntimeError as err:
                if batch_tasks != "auto" or not vmap_refusal(err):
                    raise
                warnings.warn(f"test.batch_tasks=auto: the tasks are adapted one by one, vmap refused the problem: "
                              f"{str(err).splitlines()[0][:200]}", stacklevel=2)  # fmt: skip
                size = 1
        if workers > 1:  # a round of tasks side by side, each in a worker with its own copy of the model
            episodes = episodes_from(first, THREADED_ROUND * workers)
            rows += map_in_threads(lambda i, round_=episodes: _evaluate_one(problem, round_[i], wanted, threaded=True),
                                   len(episodes), workers)  # fmt: skip
            first += len(episodes)
            bar.update(len(episodes))
            continue
        rows.append(_evaluate_one(problem, sampler.episode(first).to(device, dtype), wanted))
        first += 1
        bar.update(1)
    bar.close()
    record: dict[str, list[float]] = {}
    for row in distributed.gather(rows):  # in task order
        for name, value in row.items():
            record.setdefault(name, []).append(value)
    result: dict[str, float] = {}
    for name, values in record.items():
        result[name], result[f"{name}_ci95"] = mean_ci95(values)
    return result


AUTO_BATCH_TASKS = 32  # evaluate(batch_tasks="auto"): tasks adapted at once where batching pays
THREADED_ROUND = 8  # evaluate(threads=N): episodes drawn per worker and round


def _evaluate_one(problem: BilevelProblem, episode: Episode, wanted: set[int],
                  threaded: bool = False) -> dict[str, float]:  # fmt: skip
    """`evaluate`'s row for one episode: its query metrics after each wanted number of inner steps.
    threaded: in a task thread, through this thread's copy of the model (`local_copy`)."""
    if threaded:
        problem = dataclasses.replace(problem, model=local_copy(problem.model))
    row: dict[str, float] = {}

    def on_step(t: int, params: Params) -> None:
        if t in wanted:
            with torch.no_grad():
                _, metrics = problem.query_loss(params, episode)
            row.update({f"{name}_step{t}": float(value) for name, value in metrics.items()})

    problem.adapt_to(episode, steps=max(wanted), second_order=False, differentiable_steps=0, on_step=on_step)
    return row


def _evaluate_batch(problem: BilevelProblem, episodes: list[Episode], wanted: set[int]) -> list[dict[str, float]]:
    """`evaluate`'s rows for `episodes`, adapted as one vmap batch (the functional inner loop)."""
    from torch.func import vmap

    check_batchable(problem, episodes)
    data = [torch.stack([getattr(e, f) for e in episodes]) for f in ("support_x", "support_y", "query_x", "query_y")]

    def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> dict[str, Tensor]:
        episode, out = Episode(sx, sy, qx, qy), {}

        def on_step(t: int, params: Params) -> None:
            if t in wanted:
                out.update({f"{name}_step{t}": value for name, value in problem.query_loss(params, episode)[1].items()})

        problem.adapt_to(episode, steps=max(wanted), second_order=False, differentiable_steps=0, on_step=on_step,
                         functional=True)  # fmt: skip
        return out

    with torch.no_grad():
        values = vmap(one_task, randomness="same")(*data)  # {name: [B]}
    return [{name: float(v[b]) for name, v in values.items()} for b in range(len(episodes))]

"""sample -> estimate -> outer step -> log, one line per stage; plus meta-test evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from metaloss.errors import ConfigError
from metaloss.hypergrad.base import HypergradEstimator
from metaloss.logging import NullLogger, TensorBoardLogger
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut, Params
from tasks.base import TaskSampler, sample_episodes


def meta_step(
    problem: BilevelProblem,
    estimator: HypergradEstimator,
    outer_opt: torch.optim.Optimizer,
    episodes: Sequence[Episode],
) -> HypergradOut:
    """One meta-step: phi <- OuterOpt(phi, d L_outer / d phi) for each of the estimator's updates
    (one, unless it updates per truncation). Several updates report their mean metrics and their
    count as `outer_updates`."""
    outs = []
    for out in estimator.updates(problem, episodes):
        for p, g in zip(problem.meta_parameters(), out.grads):
            p.grad = None if g is None else g.detach()
        outer_opt.step()
        outs.append(out)
    if len(outs) == 1:
        return outs[0]
    names = {k for out in outs for k in out.metrics}
    metrics = {k: sum(float(o.metrics[k]) for o in outs if k in o.metrics) / sum(k in o.metrics for o in outs)
               for k in names}  # fmt: skip
    metrics["outer_updates"] = float(len(outs))
    return HypergradOut(outs[-1].grads, sum(o.outer_loss for o in outs) / len(outs), metrics)


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
) -> list[dict[str, float]]:
    """Meta-train for `meta_steps` outer steps on meta-batches of `meta_batch` episodes.

    Episode indices step*B .. step*B+B-1 of `sampler` form step `step`'s meta-batch, so a run
    is reproducible from the sampler's seed. Returns the metrics of every step, including the
    seconds spent sampling the meta-batch and in the meta-step proper.
    """
    if meta_steps < 0 or meta_batch < 1:
        raise ConfigError(f"need meta_steps >= 0 and meta_batch >= 1, got {meta_steps} and {meta_batch}")
    logger = logger or NullLogger()
    history = []
    bar = tqdm(range(meta_steps), desc="meta-train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        started = time.perf_counter()
        episodes = [e.to(device, dtype) for e in sample_episodes(sampler, step * meta_batch, meta_batch)]
        sampled = time.perf_counter()
        out = meta_step(problem, estimator, outer_opt, episodes)
        metrics = dict(out.metrics)
        metrics["seconds/sample"], metrics["seconds/step"] = sampled - started, time.perf_counter() - sampled
        history.append(metrics)
        if step % log_every == 0 or step == meta_steps - 1:
            logger.log(step, metrics, prefix="meta_train/")
            logger.log(step, learning_rates(problem, outer_opt), prefix="lr/")
            bar.set_postfix(loss=f"{out.outer_loss:.4f}")
        if validate is not None and validate_every and (step + 1) % validate_every == 0:
            logger.log(step, validate(step), prefix="meta_val/")
    return history


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
) -> dict[str, float]:
    """Meta-test: adapt on episodes 0..num_tasks-1 of `sampler` and measure the query loss (and
    the problem's metric) after each number of inner steps in `steps`.

    Returns {"loss_step{t}": mean, "loss_step{t}_ci95": half-width, ...} over the tasks.
    """
    if num_tasks < 1 or not steps or min(steps) < 0:
        raise ConfigError(f"evaluation needs num_tasks >= 1 and steps >= 0, got {num_tasks} and {list(steps)}")
    record: dict[str, list[float]] = {}
    wanted = set(steps)

    def on_step(t: int, params: Params) -> None:
        if t in wanted:
            with torch.no_grad():
                _, metrics = problem.query_loss(params, episode)
            for name, value in metrics.items():
                record.setdefault(f"{name}_step{t}", []).append(float(value))

    for i in tqdm(range(num_tasks), desc=desc, disable=not progress, dynamic_ncols=True):
        episode = sampler.episode(i).to(device, dtype)
        problem.adapt_to(episode, steps=max(steps), second_order=False, differentiable_steps=0, on_step=on_step)
    result: dict[str, float] = {}
    for name, values in record.items():
        result[name], result[f"{name}_ci95"] = mean_ci95(values)
    return result

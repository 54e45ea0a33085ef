"""The bilevel problem: what the inner loop adapts, with what, and what the outer loss measures.

    min_phi  (1/B) sum_b L_outer(f(x^q_b; w_T,b), y^q_b),
    w_T,b = InnerOpt_phi^T( L_inner(f(x^s_b; .), y^s_b), w0(phi) )

Every algorithm is an instance: MAML is a `LearnedInit` with a fixed SGD;
ANIL adapts only the parameters under the `head` prefix; Meta-SGD swaps the
fixed SGD for `MetaSGD`. phi is the union of the meta-modules' parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from metaloss.errors import ConfigError
from metaloss.functional import forward
from metaloss.inner.loop import InnerResult, run_inner_loop
from metaloss.inner.optim import InnerOptimizer
from metaloss.types import Episode, LossContext, Params

if TYPE_CHECKING:
    from metaloss.distributed import Distributed

Loss = Callable[[Tensor, Tensor], Tensor]
META_OBJECTIVES = ("query", "inner_mean", "target_params")


@dataclass
class BilevelProblem:
    """model: the architecture, run statelessly; init: module, forward() -> w0 (Params);
    inner_opt: module, forward() -> InnerOptimizer; inner_loss / outer_loss: (prediction, target) -> scalar;
    inner_steps: T; adapt: name prefixes of the parameters the inner loop adapts (None: all);
    metric: optional extra outer metric, e.g. accuracy;
    inner_regularizer: optional (adapted w, adapted w0) -> scalar added to the inner loss, e.g. a
    learned L2 penalty or iMAML's proximal term; a module's parameters are part of phi;
    inner_batch_size: minibatch size of inner SGD over the support set (None: full batch);
    meta_objective: "query" (L_outer on the query set after adaptation) or "inner_mean" (the mean
    inner loss along the trajectory, (1/T) sum_t L_in(w_t), as in learned-optimizer and
    learning-rate meta-learning, e.g. the MNIST-1D paper), or "target_params" (the squared distance
    sum_i (w_T,i - w*_i)^2 of the adapted parameters to the task's true ones, which a sampler that
    knows them puts in `episode.meta["target_params"]`, as in ML3's shaped-sine experiment);
    reuse_features: when only the head adapts (ANIL), compute the body's support features once
    per inner loop instead of at every step (the model names its parts with `split()`; needs the
    full support batch, so not with `inner_batch_size`). Exact: the body does not change;
    shuffle_seed: with `inner_batch_size`, minibatches drawn epoch by epoch from permutations of the
    support rows fixed by (shuffle_seed, epoch), the last incomplete batch of an epoch dropped (a
    training run's data stream); None: rows in order, wrapping around;
    support_weight: lambda, to add lambda L_inner(w0) on the whole support set to the meta-objective:
    MLDG (Li et al. 2018) minimises F(theta) + beta G(theta - alpha F'(theta)), F on the meta-train
    domains (the support set) and G on the meta-test domains (the query set), which is beta times the
    objective G + F / beta, so lambda = 1 / beta (MLDG's and DomainBed's beta = 1: lambda = 1); 0: not
    added;
    data_parallel: a `Distributed` of several ranks, for a data-parallel training run (the online
    regime): each minibatch's rows are split over the ranks, this rank's inner loss is its share
    (B_r / B) L_inner on its rows, and the inner gradient is summed over the ranks at every step
    (`metaloss.distributed`); None: one process."""

    model: nn.Module
    init: nn.Module
    inner_opt: nn.Module
    inner_loss: Loss
    outer_loss: Loss
    inner_steps: int
    adapt: Sequence[str] | None = None
    metric: Loss | None = None
    metric_name: str = "accuracy"
    inner_regularizer: Callable[[Params, Params], Tensor] | None = None
    inner_batch_size: int | None = None
    meta_objective: str = "query"
    reuse_features: bool = True
    shuffle_seed: int | None = None
    support_weight: float = 0.0
    data_parallel: Distributed | None = None

    def __post_init__(self) -> None:
        self._permutation: tuple[tuple[int, int], Tensor] | None = None  # the current epoch's, cached
        self._follow_model_dtype()
        if self.meta_objective not in META_OBJECTIVES:
            raise ConfigError(f"unknown meta_objective {self.meta_objective!r}; expected one of {META_OBJECTIVES}")
        if self.inner_batch_size is not None and self.inner_batch_size < 1:
            raise ConfigError(f"inner_batch_size must be >= 1 or None, got {self.inner_batch_size}")
        if self.inner_steps < 1:
            raise ConfigError(f"inner_steps must be >= 1 for meta-training, got {self.inner_steps}")
        names = [name for name, _ in self.model.named_parameters()]
        if self.adapt is not None:
            self.adapt = tuple(self.adapt)
            if not self.adapt or not any(self._adapted(n) for n in names):
                raise ConfigError(f"adapt={list(self.adapt)} matches no parameter of the model; names are {names}")

    @property
    def trajectory_objective(self) -> bool:
        """Whether the meta-objective is the mean inner loss along the trajectory ("inner_mean"),
        rather than the query loss after adaptation ("query")."""
        return self.meta_objective == "inner_mean"

    def _follow_model_dtype(self) -> None:
        """Meta-modules hold their floating-point parameters in the model's dtype: a learned scalar made
        with `torch.tensor(0.1)` is float32, and in a float64 problem it would give float32
        hypergradients. Cast in place, so the Parameter objects (and any optimizer over them) stay."""
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if dtype is None:
            return
        for module in (self.init, self.inner_opt, self.inner_loss, self.inner_regularizer):
            if isinstance(module, nn.Module) and any(p.is_floating_point() and p.dtype != dtype
                                                     for p in module.parameters()):  # fmt: skip
                module.to(dtype)

    def _adapted(self, name: str) -> bool:
        return self.adapt is None or any(name == p or name.startswith(p + ".") for p in self.adapt)

    def meta_modules(self) -> dict[str, nn.Module]:
        """The modules whose parameters are phi (a module without parameters is left out)."""
        candidates = {
            "init": self.init,
            "inner_opt": self.inner_opt,
            "inner_loss": self.inner_loss,
            "inner_regularizer": self.inner_regularizer,
        }
        return {k: m for k, m in candidates.items() if isinstance(m, nn.Module) and any(True for _ in m.parameters())}

    def meta_parameters(self) -> list[nn.Parameter]:
        """phi as a flat list, without duplicates, in a fixed order; parameters with
        requires_grad=False are held fixed (not phi)."""
        seen: set[int] = set()
        out = []
        for module in self.meta_modules().values():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def with_meta_parameters(self, phi: Sequence[Tensor]) -> BilevelProblem:
        """This problem with phi (aligned with `meta_parameters()`) in place of the meta-modules'
        own parameters, through `torch.func.functional_call`: phi may be any tensors (an ES
        particle's perturbed phi, or a slice of a vmapped batch). Needs meta-parameters that are not
        shared between meta-modules, and meta-modules whose forward() reads its parameters when
        called: a returned closure that reads `self.x` later would see the module's own phi."""
        names = [(key, name) for key, m in self.meta_modules().items() for name, p in m.named_parameters()
                 if p.requires_grad]  # fmt: skip
        if len(names) != len(self.meta_parameters()):
            raise ConfigError("with_meta_parameters needs meta-parameters that are not shared between meta-modules")
        if len(phi) != len(names):
            raise ConfigError(f"expected {len(names)} meta-parameter tensors, got {len(phi)}")
        by_module: dict[str, dict[str, Tensor]] = {}
        for (key, name), value in zip(names, phi):
            by_module.setdefault(key, {})[name] = value
        modules = self.meta_modules()
        replaced = {key: WithParameters(modules[key], params) for key, params in by_module.items()}
        return dataclasses.replace(self, **replaced)

    def _saved_modules(self) -> dict[str, nn.Module]:
        """The meta-modules with parameters or buffers: what a checkpoint holds (a fixed
        initialisation's w0 is a buffer, not phi, but a saved run needs it)."""
        candidates = {"init": self.init, "inner_opt": self.inner_opt, "inner_loss": self.inner_loss,
                      "inner_regularizer": self.inner_regularizer}  # fmt: skip
        return {k: m for k, m in candidates.items() if isinstance(m, nn.Module) and m.state_dict()}

    def state_dict(self) -> dict[str, dict]:
        return {k: m.state_dict() for k, m in self._saved_modules().items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for k, m in self._saved_modules().items():
            m.load_state_dict(state[k])

    def initial_params(self, episode: Episode | None = None) -> tuple[Params, Params]:
        """w0(phi) split into (adapted, frozen) parameters. An init that sets `needs_episode = True`
        (a fresh random initialisation per episode) is called with the episode."""
        w0 = self.init(episode) if getattr(self.init, "needs_episode", False) else self.init()
        adapted = {n: p for n, p in w0.items() if self._adapted(n)}
        frozen = {n: p for n, p in w0.items() if not self._adapted(n)}
        return adapted, frozen

    def predict(self, params: Params, x: Tensor, step: int | None = None) -> Tensor:
        """f(x; params) at inner step `step` (None: after adaptation; only a model with `takes_step`,
        e.g. per-step BatchNorm, tells the steps apart)."""
        return forward(self.model, params, x, step)

    def adapt_to(
        self,
        episode: Episode,
        *,
        steps: int | None = None,
        second_order: bool = True,
        differentiable_steps: int | None = None,
        on_step: Callable[[int, Params], None] | None = None,
        functional: bool = False,
    ) -> tuple[Params, InnerResult]:
        """Run the inner loop on the support set; returns (all parameters after adaptation, loop result).
        functional: `torch.func` inner gradients and no graph (vmap-able; see `run_inner_loop`)."""
        adapted, frozen = self.initial_params(episode)

        def on_step_full(t: int, params: Params) -> None:
            assert on_step is not None
            on_step(t, {**frozen, **params})

        result = self.run_inner(
            episode,
            adapted,
            adapted,
            frozen,
            self.inner_steps if steps is None else steps,
            second_order=second_order,
            differentiable_steps=differentiable_steps,
            on_step=None if on_step is None else on_step_full,
            keep_loss_graph=self.trajectory_objective,
            functional=functional,
        )
        return {**frozen, **result.params}, result

    def run_inner(
        self,
        episode: Episode,
        params: Params,
        w0: Params,
        frozen: Params,
        steps: int,
        *,
        optimizer: InnerOptimizer | None = None,
        **loop: Any,
    ) -> InnerResult:
        """The one inner chain, which every estimator and evaluation calls: L_inner(., phi) on the
        episode's support set given (w0, frozen) -> the inner optimizer (`optimizer`, or a fresh
        `inner_opt()`) -> `run_inner_loop` for `steps` steps from `params` (w0 itself, or a state
        carried from an earlier segment with `opt_state` and `first_step` in `loop`)."""
        objective = self.inner_objective(episode, w0, frozen)  # fresh: a segment's backward frees its graph
        if self.data_parallel is not None and self.data_parallel.enabled:
            if self.inner_batch_size is None:
                raise ConfigError("a data-parallel inner loop splits minibatches over the ranks: set inner_batch_size")
            loop["reduce_grads"] = self.data_parallel.sum_tensors
        return run_inner_loop(params, objective, self.inner_opt() if optimizer is None else optimizer, steps, **loop)

    def inner_objective(self, episode: Episode, w0: Params, frozen: Params) -> Callable[[Params, int], Tensor]:
        """L_inner(w, phi) at inner step t on the support set, as a function of the adapted parameters
        w and t, given the adapted part of the initialisation `w0` and the `frozen` parameters (both
        may depend on phi). With `inner_batch_size` B, step t sees support rows [tB, (t+1)B)
        (wrapping around); otherwise, and for t=None (the full objective, as implicit
        differentiation needs it), the whole support set."""

        head_only = self._head_only()
        if head_only is not None:
            return self._head_objective(episode, w0, frozen, *head_only)

        def support_loss(params: Params, t: int | None = None) -> Tensor:
            x, y = episode.support_x, episode.support_y
            share = 1.0
            if self.inner_batch_size is not None and t is not None:
                rows = self.batch_rows(t, len(x))
                if self.data_parallel is not None and self.data_parallel.enabled:
                    start, stop = self.data_parallel.shard(len(rows))
                    rows, share = rows[start:stop], (stop - start) / len(rows)  # this rank's B_r of B rows
                x, y = x[rows], y[rows]  # [B, ...] ([B_r, ...])
            loss = self._inner_loss(self.predict({**frozen, **params}, x, t), y, x, params, frozen, t, episode)
            if self.inner_regularizer is not None:
                loss = loss + self.inner_regularizer(params, w0)
            return loss * share if share != 1.0 else loss

        return support_loss

    def batch_rows(self, t: int, n: int) -> Tensor:
        """The support rows [B] of inner step t's minibatch, out of n (see `inner_batch_size`)."""
        size = self.inner_batch_size
        assert size is not None
        if self.shuffle_seed is None:
            return torch.arange(t * size, (t + 1) * size) % n
        if size > n:
            raise ConfigError(f"inner_batch_size {size} is larger than the {n} support rows")
        epoch, k = divmod(t, n // size)
        if self._permutation is None or self._permutation[0] != (epoch, n):
            seeds = np.random.SeedSequence([self.shuffle_seed, epoch]).generate_state(2, dtype=np.uint32)
            g = torch.Generator().manual_seed(int(seeds[0]) << 32 | int(seeds[1]))
            self._permutation = ((epoch, n), torch.randperm(n, generator=g))
        return self._permutation[1][k * size : (k + 1) * size]

    def _inner_loss(self, prediction: Tensor, target: Tensor, inputs: Tensor, params: Params, frozen: Params,
                    t: int | None, episode: Episode) -> Tensor:  # fmt: skip
        """L_inner on a batch: (prediction, target), plus a `LossContext` for a loss that asks for one."""
        if getattr(self.inner_loss, "needs_context", False):
            def predict(x: Tensor) -> Tensor:
                return self.predict({**frozen, **params}, x, t)

            return self.inner_loss(prediction, target, LossContext(inputs, params, t, episode, predict))
        return self.inner_loss(prediction, target)

    def _head_only(self) -> tuple[str, str] | None:
        """(body, head) names when the features can be reused: only the head adapts, and every
        parameter belongs to one of the two parts."""
        if (not self.reuse_features or self.inner_batch_size is not None or not hasattr(self.model, "split")
                or getattr(self.model, "takes_step", False)):  # per-step layers: the features change with t
            return None
        body, head = self.model.split()
        names = [name for name, _ in self.model.named_parameters()]
        if self.adapt != (head,) or not all(n.startswith((body + ".", head + ".")) for n in names):
            return None
        return body, head

    def _head_objective(self, episode: Episode, w0: Params, frozen: Params, body: str, head: str):
        """The support loss as a function of the head's parameters, on features computed once."""
        from torch.func import functional_call

        def part(params: Params, prefix: str) -> Params:
            return {n[len(prefix) + 1 :]: p for n, p in params.items() if n.startswith(prefix + ".")}

        body_module = self.model.get_submodule(body)
        features = functional_call(body_module, part(frozen, body), (episode.support_x,), strict=False)
        head_module, y = self.model.get_submodule(head), episode.support_y

        def support_loss(params: Params, t: int | None = None) -> Tensor:
            prediction = functional_call(head_module, part(params, head), (features,), strict=False)
            loss = self._inner_loss(prediction, y, episode.support_x, params, frozen, t, episode)
            if self.inner_regularizer is not None:
                loss = loss + self.inner_regularizer(params, w0)
            return loss

        return support_loss

    def outer_objective(self, params: Params, inner: InnerResult, episode: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """The meta-objective of one episode (see `meta_objective`) and detached metrics; the query
        metrics are always reported (as `query_loss` and the metric) for monitoring."""
        loss, metrics = self.query_loss(params, episode)
        if self.support_weight:
            w0, frozen = self.initial_params(episode)
            support = self.inner_objective(episode, w0, frozen)(w0, None)
            metrics["support_loss"] = support.detach()
            loss = loss + self.support_weight * support
        if not self.trajectory_objective:
            return loss, metrics
        trajectory = torch.stack(inner.losses).mean()
        metrics["query_loss"], metrics["loss"] = metrics["loss"], trajectory.detach()
        return trajectory, metrics

    def query_loss(self, params: Params, episode: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        """L_outer on the query set with adapted `params`, and detached metrics; with
        meta_objective="target_params", the distance to the task's true parameters instead (the
        query loss is then a metric, `query_loss`)."""
        prediction = self.predict(params, episode.query_x)
        loss = self.outer_loss(prediction, episode.query_y)
        metrics = {"loss": loss.detach()}
        if self.metric is not None:
            metrics[self.metric_name] = self.metric(prediction.detach(), episode.query_y)
        if self.meta_objective == "target_params":
            metrics["query_loss"] = metrics["loss"]
            loss = self.target_distance(params, episode)
            metrics["loss"] = loss.detach()
        return loss, metrics

    def target_distance(self, params: Params, episode: Episode) -> Tensor:
        """sum_i (w_i - w*_i)^2 over the parameters named in `episode.meta["target_params"]`."""
        target = episode.meta.get("target_params")
        if not target:
            raise ConfigError('meta_objective="target_params" needs episodes whose meta holds "target_params" '
                              "(the task's true parameters); this task's do not")  # fmt: skip
        unknown = sorted(set(target) - set(params))
        if unknown:
            raise ConfigError(f"target_params names {unknown}, not parameters of the model ({sorted(params)})")
        return sum(((params[n] - w.to(params[n])) ** 2).sum() for n, w in target.items())  # type: ignore[return-value]


class WithParameters:
    """A meta-module called with other parameters (`torch.func.functional_call`: an ES particle's
    perturbed phi, a slice of a vmapped batch); its other attributes (e.g. `needs_context`) are the
    module's."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor]) -> None:
        self.module, self.params = module, params

    def __call__(self, *args: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self.module, self.params, args, strict=False)

    def call(self, method: str, *args: Any) -> Any:
        """The module's `method` (not its forward) with these parameters, e.g. a meta-module's extra
        outer loss that depends on phi."""
        from torch.func import functional_call

        params = {f"module.{name}": value for name, value in self.params.items()}
        return functional_call(_MethodCall(self.module, method), params, args, strict=False)

    def __getattr__(self, name: str) -> Any:
        if name in ("module", "params"):  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)


class _MethodCall(nn.Module):
    """A module whose forward is another module's `method` (so that `functional_call` can run it)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: Any) -> Any:
        return getattr(self.module, self.method)(*args)

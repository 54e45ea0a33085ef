"""metaloss against its peers, side by side at equal gradients: seconds per meta-step, peak memory,
and the largest difference of each peer's meta-gradient from ours.

    bash benchmarks/peers/install.sh       # benchmark-only installs: higher, TorchOpt, learn2learn
    python benchmarks/peers/run.py         # every case; --cases maml_1step sinusoid ... for some

Implementations (each builds the same model from the same seed and sees the same meta-batches):
metaloss task by task (`Unrolled`, `engine.meta_step`), metaloss batched (`Unrolled(batched=True)`,
one `torch.func.vmap` over the tasks), metaloss threads (`Unrolled(threads=N)`, the tasks side by
side on the run's N intra-op threads, one each; `Implicit(threads=N)` for iMAML), metaloss compiled
and threads compiled (the same with `Unrolled(compile=True)`: each task one `torch.compile`d
function; MAML, ANIL, Meta-SGD), higher 0.2.1
(`innerloop_ctx`), learn2learn 0.2.0 (`algorithms.MAML` / `MetaSGD`), TorchOpt 0.7.3 (`MetaSGD`
with `extract_state_dict` / `recover_state_dict`, its MAML example; first order through its
functional `sgd`), and a plain loop of `torch.func.functional_call` with `torch.autograd.grad` (the
textbook MAML). A meta-step is the meta-gradient of the meta-batch plus one outer Adam step.

Timing: one process; after `--warmup` untimed rounds, `--repeats` rounds in which every
implementation runs one meta-step, the order reversed every round (round-robin, so a drift of the
machine hits all alike); the median is reported. Memory: every implementation again in a fresh
process (this script with `--child`), the growth of the peak resident set (`VmHWM`, reset through
/proc/self/clear_refs after the setup) over the resident set before its first meta-step, over
warm-up + 1 meta-steps (with `--settled N`: after N meta-steps outside the measurement, a long
run's steady state without the first steps' one-time allocations); then, in the same child, the
tensor peak of one more meta-step (`tensor_peak_mb`: the peak of the bytes PyTorch's allocator
holds over those it held when the step began, from the profiler's allocation events; exact and
repeatable, where the resident set moves by tens of MB; not for tasks in worker threads, whose
allocations the profiler does not see). Gradients: every
implementation's meta-gradient on one meta-batch at the initial phi, against metaloss's (max
|difference| / max |ours|, float32), its error against our loop's meta-gradient computed in float64
(`grad_max_rel_error_vs_float64`: which float32 rounding is closer to exact), and the seconds of that
first call (`first_call_s`: a compiled
implementation compiles in it).

On a GPU (`--device cuda`): the same, every model and episode on the GPU, each timed meta-step
ended by `torch.cuda.synchronize()`, and memory from CUDA's allocator in this process instead of
fresh processes (`peak_growth_mb`: `max_memory_allocated` over warm-up + 1 meta-steps, minus what
was allocated before them; `tensor_peak_mb` is None). Tasks in CPU threads are left out there
(`hypergrad.threads` is for CPU tensors). `benchmarks/peers/gpu.sh` is the whole run on a lent GPU.

Cases: MAML on a Conv-4 (32 filters, max-pool, transductive BatchNorm, 28x28x1), 5-way 1-shot
15-query, meta-batch 32, inner SGD lr 0.4: 1 and 5 steps second order, 1 step first order; ANIL
(head-only adaptation) and Meta-SGD on the same; the default sinusoid job (MLP 1-40-40-1,
meta-batch 25, 10 + 10 points, one inner SGD step at lr 0.01); iMAML (`--cases imaml_10step`: meta-batch 8,
10 proximal SGD steps, 5 CG iterations) against TorchOpt's implicit differentiation (`custom_root`).
Writes benchmarks/results/peers.json; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metaloss.engine import meta_step
from metaloss.functional import apply_batchnorm_policy
from metaloss.hypergrad import Implicit, Unrolled
from metaloss.hypergrad.base import batching_pays
from metaloss.hypergrad.threads import resolve_threads
from metaloss.losses import cross_entropy, mse
from metaloss.memory import tensor_peak_growth
from metaloss.meta import HyperparameterOptimizer, LearnedInit, MetaSGD, Proximal
from metaloss.models import MLP, Conv4
from metaloss.problem import BilevelProblem
from metaloss.types import Episode


@dataclass(frozen=True)
class Case:
    """model: "conv4" or "sinusoid"; algorithm: "maml" (all parameters adapt), "anil" (the head only),
    "metasgd" (learned per-element inner learning rates), "imaml" (iMAML: the proximal inner objective
    L_s(w) + lambda/2 ||w - w0||^2 solved by `steps` SGD steps, the implicit meta-gradient by
    `CG_ITERATIONS` of conjugate gradient); steps: inner SGD steps."""

    model: str
    algorithm: str = "maml"
    steps: int = 1
    first_order: bool = False
    meta_batch: int = 32
    inner_lr: float = 0.4

    @property
    def loss(self) -> Callable[[Tensor, Tensor], Tensor]:
        return mse if self.model == "sinusoid" else cross_entropy


CASES = {
    "maml_1step": Case("conv4"),
    "maml_5step": Case("conv4", steps=5),
    "fomaml_1step": Case("conv4", first_order=True),
    "anil_1step": Case("conv4", algorithm="anil"),
    "metasgd_1step": Case("conv4", algorithm="metasgd"),
    "sinusoid": Case("sinusoid", meta_batch=25, inner_lr=0.01),
    "imaml_10step": Case("conv4", algorithm="imaml", steps=10, meta_batch=8, inner_lr=0.1),
}
# which implementations a case runs (a peer without the algorithm is left out, not approximated)
COMPILED = ("metaloss_compiled", "metaloss_threads_compiled")  # Unrolled(compile=True): opt-in, minutes to compile
IMPLEMENTATIONS = {
    "maml": ("metaloss", "metaloss_batched", "metaloss_threads", *COMPILED, "higher", "learn2learn", "torchopt",
             "loop"),
    "anil": ("metaloss", "metaloss_batched", "metaloss_threads", *COMPILED, "higher", "learn2learn", "torchopt",
             "loop"),
    "metasgd": ("metaloss", "metaloss_batched", "metaloss_threads", *COMPILED, "higher", "learn2learn", "loop"),
    "imaml": ("metaloss", "metaloss_threads", "torchopt"),
}
OUTER_LR = 1e-3
PROXIMAL, CG_ITERATIONS = 2.0, 5  # iMAML: lambda of the proximal term, conjugate-gradient iterations (no early stop)


# ---------------------------------------------------------------------------------------------
# data and models


def make_model(case: Case, seed: int, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)  # initialised on the CPU whatever the device: the same weights everywhere
    if case.model == "sinusoid":
        return MLP(1, [40, 40], 1).to(device)
    return apply_batchnorm_policy(Conv4(n_classes=5, in_channels=1, filters=32, image_size=28, pool="max"),
                                  "transductive").to(device)  # fmt: skip


def meta_batches(case: Case, count: int, seed: int, device: str = "cpu") -> list[list[Episode]]:
    """`count` meta-batches: random 28x28 'images' of 5 classes (1 support + 15 queries each), or
    sinusoid regression tasks (amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]); drawn on the
    CPU, then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        batch = []
        for _ in range(case.meta_batch):
            if case.model == "sinusoid":
                amplitude, phase = 0.1 + 4.9 * torch.rand((), generator=g), torch.pi * torch.rand((), generator=g)
                x, xq = torch.rand(10, 1, generator=g) * 10 - 5, torch.rand(10, 1, generator=g) * 10 - 5
                batch.append(Episode(x, amplitude * torch.sin(x - phase), xq, amplitude * torch.sin(xq - phase)))
            else:
                y, yq = torch.arange(5), torch.arange(5).repeat_interleave(15)
                batch.append(Episode(torch.rand(5, 1, 28, 28, generator=g), y,
                                     torch.rand(75, 1, 28, 28, generator=g), yq))  # fmt: skip
        out.append([episode.to(device) for episode in batch])
    return out


# ---------------------------------------------------------------------------------------------
# implementations: each holds its own copy of the model and its outer Adam; `grads` fills the .grad
# of its phi (model parameters, then Meta-SGD's learning rates) with the mean meta-gradient


class Implementation:
    def __init__(self, case: Case, seed: int, device: str = "cpu") -> None:
        self.case, self.model = case, make_model(case, seed, device)
        self.lrs = [torch.full_like(p, case.inner_lr, requires_grad=True) for p in self.model.parameters()] \
            if case.algorithm == "metasgd" else []  # fmt: skip

    def phi(self) -> list[Tensor]:
        return [*self.model.parameters(), *self.lrs]

    def setup(self) -> None:
        self.outer = torch.optim.Adam(self.phi(), lr=OUTER_LR)

    def grads(self, episodes: Sequence[Episode]) -> None:
        raise NotImplementedError

    def step(self, episodes: Sequence[Episode]) -> None:
        self.outer.zero_grad(set_to_none=True)
        self.grads(episodes)
        self.outer.step()

    def gradient(self, episodes: Sequence[Episode]) -> Tensor:
        for p in self.phi():
            p.grad = None
        self.grads(episodes)
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in self.phi()])

    def adapted(self, name: str) -> bool:
        return self.case.algorithm != "anil" or name.startswith("head.")


class Metaloss(Implementation):
    batched = False
    threads: int | str = 1
    compile = False

    def setup(self) -> None:
        case = self.case
        if case.algorithm == "metasgd":
            inner_opt = MetaSGD(self.model, lr=case.inner_lr)  # its rates keyed by name, dots as "__"
            self.lrs = [inner_opt.lrs[name.replace(".", "__")] for name, _ in self.model.named_parameters()]
        else:
            inner_opt = HyperparameterOptimizer("sgd", lr=case.inner_lr)
        imaml = case.algorithm == "imaml"
        self.problem = BilevelProblem(self.model, LearnedInit(self.model), inner_opt, case.loss, case.loss,
                                      case.steps, adapt=["head"] if case.algorithm == "anil" else None,
                                      inner_regularizer=Proximal(PROXIMAL) if imaml else None)  # fmt: skip
        mode = "first_order" if case.first_order else "full"
        self.estimator = Implicit("cg", iterations=CG_ITERATIONS, tol=0.0, threads=self.threads) if imaml else \
            Unrolled(mode, batched=self.batched, threads=self.threads, compile=self.compile)  # fmt: skip
        self.outer = torch.optim.Adam(self.problem.meta_parameters(), lr=OUTER_LR)

    def step(self, episodes: Sequence[Episode]) -> None:
        meta_step(self.problem, self.estimator, self.outer, episodes)

    def gradient(self, episodes: Sequence[Episode]) -> Tensor:
        grads = self.estimator.estimate(self.problem, episodes).grads
        by_id = {id(p): g for p, g in zip(self.problem.meta_parameters(), grads)}
        return torch.cat([(torch.zeros_like(p) if by_id.get(id(p)) is None else by_id[id(p)]).flatten()
                          for p in self.phi()])  # fmt: skip


class MetalossBatched(Metaloss):
    batched = True


class MetalossThreads(Metaloss):
    """The task loop with tasks side by side, one per intra-op thread of the run (`threads=N`)."""

    def setup(self) -> None:
        self.threads = torch.get_num_threads()
        super().setup()


class MetalossCompiled(Metaloss):
    """The task loop with each task's meta-gradient one compiled function (`Unrolled(compile=True)`)."""

    compile = True


class MetalossThreadsCompiled(MetalossThreads):
    """Compiled tasks side by side, one per intra-op thread of the run."""

    compile = True


class Loop(Implementation):
    """The textbook loop: fast weights as a dict, `functional_call`, `torch.autograd.grad`."""

    def grads(self, episodes: Sequence[Episode]) -> None:
        case, named = self.case, dict(self.model.named_parameters())
        lrs = dict(zip(named, self.lrs)) if self.lrs else {}
        for ep in episodes:
            params = dict(named)
            for _ in range(case.steps):
                loss = case.loss(functional_call(self.model, params, (ep.support_x,)), ep.support_y)
                names = [n for n in params if self.adapted(n)]
                grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not case.first_order)
                for n, g in zip(names, grads):
                    params[n] = params[n] - (lrs[n] if lrs else case.inner_lr) * g
            loss = case.loss(functional_call(self.model, params, (ep.query_x,)), ep.query_y)
            (loss / len(episodes)).backward()


class Higher(Implementation):
    """higher's `innerloop_ctx` around torch.optim.SGD (one parameter group per tensor for Meta-SGD,
    its rates passed through `override`); first order through `grad_callback` detaching the grads."""

    def setup(self) -> None:
        super().setup()
        params = [p for n, p in self.model.named_parameters() if self.adapted(n)]
        self.inner = torch.optim.SGD([{"params": [p]} for p in params], lr=self.case.inner_lr)

    def grads(self, episodes: Sequence[Episode]) -> None:
        import higher

        case = self.case
        override = {"lr": self.lrs} if self.lrs else None
        callback = (lambda gs: [g.detach() for g in gs]) if case.first_order else None
        for ep in episodes:
            with higher.innerloop_ctx(self.model, self.inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(case.steps):
                    diffopt.step(case.loss(fmodel(ep.support_x), ep.support_y), override=override,
                                 grad_callback=callback)  # fmt: skip
                (case.loss(fmodel(ep.query_x), ep.query_y) / len(episodes)).backward()


class Learn2Learn(Implementation):
    """learn2learn's `MAML` (ANIL: `MAML` of the head, the body in the outer graph) or `MetaSGD`:
    `clone()`, `adapt(loss)`, query loss backward."""

    def setup(self) -> None:
        import learn2learn as l2l

        case = self.case
        if case.algorithm == "metasgd":
            self.learner = l2l.algorithms.MetaSGD(self.model, lr=case.inner_lr, first_order=case.first_order)
            self.lrs = list(self.learner.lrs)
        elif case.algorithm == "anil":
            self.learner = l2l.algorithms.MAML(self.model.head, lr=case.inner_lr, first_order=case.first_order)
        else:
            self.learner = l2l.algorithms.MAML(self.model, lr=case.inner_lr, first_order=case.first_order)
        super().setup()

    def grads(self, episodes: Sequence[Episode]) -> None:
        case = self.case
        body = self.model.features if case.algorithm == "anil" else nn.Identity()
        for ep in episodes:
            learner = self.learner.clone()
            for _ in range(case.steps):
                learner.adapt(case.loss(learner(body(ep.support_x)), ep.support_y))
            (case.loss(learner(body(ep.query_x)), ep.query_y) / len(episodes)).backward()


class TorchOpt(Implementation):
    """TorchOpt's MAML example: `torchopt.MetaSGD` steps the module in place, `extract_state_dict` /
    `recover_state_dict` reset it between tasks; first order through the functional `torchopt.sgd`
    on detached gradients."""

    def setup(self) -> None:
        import torchopt

        super().setup()
        self.adapted_module = self.model.head if self.case.algorithm == "anil" else self.model
        self.inner = torchopt.MetaSGD(self.adapted_module, lr=self.case.inner_lr)
        self.functional_sgd = torchopt.sgd(lr=self.case.inner_lr)

    def grads(self, episodes: Sequence[Episode]) -> None:
        import torchopt

        case = self.case
        if case.algorithm == "imaml":
            return self.implicit_grads(episodes)
        if case.first_order:
            named = dict(self.model.named_parameters())
            names = [n for n in named if self.adapted(n)]
            for ep in episodes:
                params, state = dict(named), self.functional_sgd.init([named[n] for n in names])
                for _ in range(case.steps):
                    loss = case.loss(functional_call(self.model, params, (ep.support_x,)), ep.support_y)
                    grads = [g.detach() for g in torch.autograd.grad(loss, [params[n] for n in names])]
                    updates, state = self.functional_sgd.update(grads, state, inplace=False)
                    new = torchopt.apply_updates([params[n] for n in names], updates, inplace=False)
                    params.update(zip(names, new))
                loss = case.loss(functional_call(self.model, params, (ep.query_x,)), ep.query_y)
                (loss / len(episodes)).backward()
            return
        net_state = torchopt.extract_state_dict(self.adapted_module, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(self.inner, by="reference")
        for ep in episodes:
            for _ in range(case.steps):
                self.inner.step(case.loss(self.model(ep.support_x), ep.support_y))
            (case.loss(self.model(ep.query_x), ep.query_y) / len(episodes)).backward()
            torchopt.recover_state_dict(self.adapted_module, net_state)
            torchopt.recover_state_dict(self.inner, opt_state)

    def implicit_grads(self, episodes: Sequence[Episode]) -> None:
        """iMAML with TorchOpt's implicit differentiation (`custom_root` over the inner solver, its
        optimality condition grad_w [L_s(w) + lambda/2 ||w - w0||^2] = 0, `solve_cg` without early stop)."""
        import torchopt

        case, names = self.case, [n for n, _ in self.model.named_parameters()]

        def inner_objective(params, meta_params, x, y):
            loss = case.loss(functional_call(self.model, dict(zip(names, params)), (x,)), y)
            return loss + 0.5 * PROXIMAL * sum(((p - m) ** 2).sum() for p, m in zip(params, meta_params))

        optimality = torch.func.grad(inner_objective, argnums=0)  # as TorchOpt's iMAML example

        @torchopt.diff.implicit.custom_root(
            optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=CG_ITERATIONS, rtol=0.0)
        )
        def solve(params, meta_params, x, y):  # fmt: skip
            meta_params = [m.detach() for m in meta_params]
            with torch.enable_grad():
                for _ in range(case.steps):
                    params = [p.detach().requires_grad_() for p in params]
                    grads = torch.autograd.grad(inner_objective(params, meta_params, x, y), params)
                    params = [p - case.inner_lr * g for p, g in zip(params, grads)]
            return tuple(p.detach() for p in params)

        meta_params = tuple(self.model.parameters())
        for ep in episodes:
            solution = solve(meta_params, meta_params, ep.support_x, ep.support_y)
            loss = case.loss(functional_call(self.model, dict(zip(names, solution)), (ep.query_x,)), ep.query_y)
            (loss / len(episodes)).backward()


CLASSES: dict[str, type[Implementation]] = {
    "metaloss": Metaloss, "metaloss_batched": MetalossBatched, "metaloss_threads": MetalossThreads,
    "metaloss_compiled": MetalossCompiled, "metaloss_threads_compiled": MetalossThreadsCompiled, "higher": Higher,
    "learn2learn": Learn2Learn,
    "torchopt": TorchOpt, "loop": Loop,
}  # fmt: skip


def build(case: Case, name: str, seed: int, device: str = "cpu") -> Implementation:
    impl = CLASSES[name](case, seed, device)
    impl.setup()
    return impl


def synchronize(device: str) -> None:
    """Wait for the GPU's queued kernels (a timed step ends when its work has, not when it was queued)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_growth(impl: Implementation, batches: Sequence[Sequence[Episode]], device: str) -> dict[str, float]:
    """On a GPU: the peak of CUDA's allocator over one meta-step per batch, minus what it held before
    them, in MB (exact, in this process: the allocator's statistics are reset, no fresh process needed)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for batch in batches:
        impl.step(batch)
    synchronize(device)
    return {"peak_growth_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
            "allocated_before_mb": before / 2**20, "tensor_peak_mb": None}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# measurements


def proc_status_mb(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_growth(run: Callable[[], None]) -> dict[str, float]:
    """The resident-set peak while `run()` runs, minus the resident set before it, in MB (VmHWM is
    reset to the current resident set first)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = proc_status_mb("VmRSS")
    run()
    return {"peak_growth_mb": proc_status_mb("VmHWM") - before, "rss_before_mb": before}


def peak_growth_child(case_json: str, impl_name: str, args: argparse.Namespace) -> dict[str, float | None]:
    """In this (fresh) process: the resident-set peak over warm-up + 1 meta-steps, minus the
    resident set before them, in MB; with `--settled N`, after N meta-steps outside the measurement
    (a long run's steady state, without the first steps' one-time allocations). Then two more
    meta-steps for `tensor_peak_growth` of the second (None for tasks in worker threads)."""
    torch.set_num_threads(args.threads)
    case = Case(**json.loads(case_json))
    impl = build(case, impl_name, args.seed)
    batches = meta_batches(case, args.settled + args.warmup + 3, args.seed + 1)
    for batch in batches[: args.settled]:
        impl.step(batch)
    result: dict[str, float | None] = {
        **peak_growth(lambda: [impl.step(batch) for batch in batches[args.settled : -2]])}
    result["tensor_peak_mb"] = None if "threads" in impl_name else \
        tensor_peak_growth(lambda: impl.step(batches[-2]), lambda: impl.step(batches[-1])) / 2**20  # fmt: skip
    return result


def memory(case: Case, impl_name: str, args: argparse.Namespace) -> dict[str, float]:
    """`peak_growth_child` in a fresh process (a child's getrusage would inherit the parent's peak)."""
    command = [sys.executable, __file__, "--child", json.dumps(case.__dict__), impl_name,
               "--threads", str(args.threads), "--warmup", str(args.warmup), "--seed", str(args.seed),
               "--settled", str(getattr(args, "settled", 0))]  # fmt: skip
    threshold = getattr(args, "mmap_threshold", 0)
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(threshold)} if threshold else {})}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_case(case_name: str, args: argparse.Namespace) -> dict[str, object]:
    case, device = CASES[case_name], args.device
    gpu = torch.device(device).type != "cpu"
    names = [n for n in IMPLEMENTATIONS[case.algorithm] if n not in args.skip and not (gpu and "threads" in n)]
    if args.memory_only:
        rows = {n: rounded(memory(case, n, args)) for n in names}
        return {"case": case_name, "setting": case.__dict__, "implementations": rows,
                "metaloss_task_loop_memory_over_lowest_peer": memory_ratio(rows, "metaloss", names),
                "metaloss_task_loop_tensor_peak_over_lowest_peer":
                    tensor_memory_ratio(rows, "metaloss", names)}  # fmt: skip
    impls = {n: build(case, n, args.seed, device) for n in names}

    probe = meta_batches(case, 1, args.seed, device)[0]  # gradients at the initial phi, before any step
    exact = float64_gradient(case, args.seed, probe, device)
    difference, error, first_call = {}, {}, {}
    assert names[0] == "metaloss"  # the reference, computed first
    for n, impl in impls.items():  # the first call of a compiled implementation compiles
        synchronize(device)
        started = time.perf_counter()
        gradient = impl.gradient(probe)
        synchronize(device)
        first_call[n] = time.perf_counter() - started
        if n == "metaloss":
            reference, scale = gradient, gradient.abs().max().item()
        difference[n] = (gradient - reference).abs().max().item() / scale
        error[n] = (gradient.double() - exact).abs().max().item() / exact.abs().max().item()

    seconds = round_robin(impls, meta_batches(case, args.warmup + args.repeats, args.seed + 1, device), args.warmup,
                          device)  # fmt: skip
    rows = {}
    for n in names:
        rows[n] = {"median_s": round(statistics.median(seconds[n]), 4), "min_s": round(min(seconds[n]), 4),
                   "grad_max_rel_difference": difference[n], "grad_max_rel_error_vs_float64": error[n],
                   "first_call_s": round(first_call[n], 2)}  # fmt: skip
        if not args.no_memory and gpu:
            batches = meta_batches(case, args.warmup + 1, args.seed + 2, device)
            rows[n].update(rounded(cuda_peak_growth(impls[n], batches, device)))
        elif not args.no_memory:
            rows[n].update(rounded(memory(case, n, args)))
        print(f"{case_name} {n}: {rows[n]}", file=sys.stderr)
    fastest_peer = min((n for n in names if not n.startswith("metaloss")), key=lambda n: rows[n]["median_s"])
    # what a user gets: the configs' hypergrad.batched=auto and hypergrad.threads=auto
    problem = impls["metaloss"].problem
    if batching_pays(problem, probe) and case.algorithm != "imaml":
        auto = "metaloss_batched"
    elif resolve_threads("auto", problem.model, len(probe), torch.device(device)) > 1 and "metaloss_threads" in names:
        auto = "metaloss_threads"
    else:
        auto = "metaloss"
    return {
        "case": case_name,
        "setting": case.__dict__,
        "implementations": rows,
        "fastest_peer": fastest_peer,
        "metaloss_auto": auto,
        "auto_over_fastest_peer": round(rows[auto]["median_s"] / rows[fastest_peer]["median_s"], 3),
        "auto_memory_over_lowest_peer": memory_ratio(rows, auto, names),
        **({} if args.no_memory else
           {"metaloss_task_loop_tensor_peak_over_lowest_peer": tensor_memory_ratio(rows, "metaloss", names)}),
        **({"threads_compiled_over_fastest_peer":
            round(rows["metaloss_threads_compiled"]["median_s"] / rows[fastest_peer]["median_s"], 3),
            "compiled_memory_over_lowest_peer": memory_ratio(rows, "metaloss_compiled", names)}
           if "metaloss_threads_compiled" in names and "metaloss_compiled" in names else {}),
    }  # fmt: skip


def round_robin(impls: dict[str, Implementation], batches: Sequence[Sequence[Episode]],
                warmup: int, device: str = "cpu") -> dict[str, list[float]]:  # fmt: skip
    """Seconds of each implementation's meta-step on `batches[r]` in round r, every implementation once
    per round, the order reversed every round (a drift of the machine hits all alike); the first
    `warmup` rounds are run, not counted. On a GPU each step starts and ends synchronised."""
    seconds: dict[str, list[float]] = {n: [] for n in impls}
    for round_, batch in enumerate(batches):
        for n in impls if round_ % 2 == 0 else reversed(impls):
            synchronize(device)
            started = time.perf_counter()
            impls[n].step(batch)
            synchronize(device)
            if round_ >= warmup:
                seconds[n].append(time.perf_counter() - started)
    return seconds


def float64_gradient(case: Case, seed: int, episodes: Sequence[Episode], device: str = "cpu") -> Tensor:
    """metaloss's task loop's meta-gradient on `episodes` computed in float64 (model, meta-parameters
    and data converted): the reference that float32 rounding is measured against."""
    impl = build(case, "metaloss", seed, device)
    for module in (impl.problem.model, *impl.problem.meta_modules().values()):
        module.double()  # in place: the same Parameter objects, so phi() still lists them

    def double(t: Tensor) -> Tensor:  # class labels stay integers
        return t.double() if t.is_floating_point() else t

    return impl.gradient([Episode(*(double(t) for t in (e.support_x, e.support_y, e.query_x, e.query_y)))
                          for e in episodes])  # fmt: skip


def rounded(memory_row: dict[str, float | None]) -> dict[str, float | None]:
    """Resident-set figures to 0.1 MB, tensor peaks to the kB (they are exact)."""
    return {k: v if v is None else round(v, 3 if k == "tensor_peak_mb" else 1) for k, v in memory_row.items()}


def tensor_memory_ratio(rows: dict[str, dict], name: str, names: Sequence[str]) -> float | None:
    """`name`'s tensor peak over the lowest peer's (None without memory runs)."""
    if any(rows[n].get("tensor_peak_mb") is None for n in names if not n.startswith("metaloss")) \
            or rows[name].get("tensor_peak_mb") is None:  # fmt: skip
        return None
    lowest = min(rows[n]["tensor_peak_mb"] for n in names if not n.startswith("metaloss"))
    return round(rows[name]["tensor_peak_mb"] / lowest, 4)


def memory_ratio(rows: dict[str, dict], name: str, names: Sequence[str]) -> float | None:
    """`name`'s peak growth over the lowest peer's (None without memory runs, or where the lowest
    peer's growth rounds to 0 MB, as the sinusoid's can after settled steps)."""
    if any("peak_growth_mb" not in rows[n] for n in names):
        return None
    lowest = min(rows[n]["peak_growth_mb"] for n in names if not n.startswith("metaloss"))
    return round(rows[name]["peak_growth_mb"] / lowest, 3) if lowest > 0 else None


def provenance(argv: Sequence[str] | None = None) -> dict[str, str]:
    """The command (this script with `argv`, default the process's arguments), the UTC date and the
    machine, for a benchmark's result file."""
    return {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
    }


def write_result(result: dict, out: Path) -> None:
    """Write `result` to `out` as JSON and print it as the last stdout line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def versions(device: str = "cpu") -> dict[str, str | bool]:
    out: dict[str, str | bool] = {"torch": torch.__version__}
    if torch.device(device).type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = str(torch.version.cuda)
    for package in ("higher", "learn2learn", "torchopt"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    try:
        import torchopt

        out["torchopt_compiled_ops_loaded"] = bool(torchopt.accelerated_op_available())
    except ImportError:
        pass
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(CLASSES), help="implementations to leave out")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (cuda:N) for the GPU table")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--memory-only", action="store_true", help="only the fresh-process memory runs")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="run the memory children with glibc's MALLOC_MMAP_THRESHOLD_ fixed at this many bytes "
                             "(freed large blocks go back to the system at once; 0: glibc's default)")  # fmt: skip
    parser.add_argument("--settled", type=int, default=0,
                        help="meta-steps each memory child runs before its peak is reset (0: the first steps count)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.json"))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.settled < 0:
        parser.error("need --repeats >= 1, --warmup >= 0, --threads >= 1, --settled >= 0")
    if args.memory_only and args.no_memory:
        parser.error("--memory-only and --no-memory exclude each other")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device: {err}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: need cpu or an available cuda device")
    if args.memory_only and device.type != "cpu":
        parser.error("--memory-only measures fresh CPU processes; on a GPU memory is measured with the timing")
    if args.child:
        print(json.dumps(peak_growth_child(*args.child, args)))
        return
    if "metaloss" in args.skip:
        parser.error("metaloss is the reference of the gradient differences; it cannot be skipped")
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    rows = [run_case(name, args) for name in args.cases]
    result = {
        "benchmark": "peers",
        **provenance(argv),
        "versions": versions(args.device),
        "device": args.device,
        "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats, "mmap_threshold": args.mmap_threshold,
        "settled": args.settled,
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "cases": rows,
    }  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()

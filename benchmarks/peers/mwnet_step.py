"""A one-step look-ahead reweighting run (MW-Net, Shu et al. 2019) through metaloss against the
hand-written MW-Net loop, side by side: seconds per training step and the largest difference of
the weight net and of the trained model after the same steps.

    python benchmarks/peers/mwnet_step.py

metaloss: `LookaheadTraining` + `TruncatedBackprop(1)` + `online_meta_train` (the online regime of
`algorithm=mwnet`). The loop: per step, a virtual step through the real optimizer (momentum SGD, its
buffer carried) with the graph kept, the meta loss on a meta batch, one Adam step of the weight net,
then the real step with the updated net: MW-Net's order. Both read the same minibatches and meta
batches (`problem.batch_rows`, `meta_rows`). Setting: MLP 784-256-10 on random inputs of 10 classes
(Fashion-MNIST's shapes), 12,800 training rows in minibatches of 128, meta batches of 100 from 1,000
rows, weight net 1-100-1, SGD lr 0.05 momentum 0.9, Adam 1e-3. Betty (`betty-ml` 0.1.1) installs, but
its hypergradients are approximations (DARTS, Neumann, CG), not this exact one-step look-ahead; it
is not compared. Runs of `--steps` steps alternate, `--repeats` each; the median seconds per step.
Writes benchmarks/results/peers_mwnet.json; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from run import provenance, write_result  # benchmarks/peers/run.py, beside this script
from torch.func import functional_call

from metaloss.hypergrad import TruncatedBackprop
from metaloss.lookahead import LookaheadTraining, meta_rows
from metaloss.meta import FixedInit, HyperparameterOptimizer
from metaloss.meta.weighting import LossToWeight, WeightedLoss
from metaloss.models import MLP
from metaloss.online import online_meta_train
from metaloss.problem import BilevelProblem
from metaloss.types import Episode

N, M, BATCH, META_BATCH, LR, MOMENTUM, OUTER_LR, SEED = 12_800, 1_000, 128, 100, 0.05, 0.9, 1e-3, 4


def make_problem(seed: int) -> tuple[BilevelProblem, Episode]:
    g = torch.Generator().manual_seed(seed)
    episode = Episode(torch.rand(N, 784, generator=g), torch.randint(10, (N,), generator=g),
                      torch.rand(M, 784, generator=g), torch.randint(10, (M,), generator=g))  # fmt: skip
    torch.manual_seed(seed)
    model = MLP(784, [256], 10)
    problem = BilevelProblem(model=model, init=FixedInit(model),
                             inner_opt=HyperparameterOptimizer("sgd", lr=LR, momentum=MOMENTUM),
                             inner_loss=WeightedLoss(LossToWeight(hidden=(100,), seed=seed)),
                             outer_loss=F.cross_entropy, inner_steps=1, inner_batch_size=BATCH,
                             shuffle_seed=seed)  # fmt: skip
    return problem, episode


def ours(steps: int, seed: int) -> tuple[float, list[torch.Tensor], dict[str, torch.Tensor]]:
    problem, episode = make_problem(seed)
    system = LookaheadTraining(problem, episode, horizon=steps, meta_batch_size=META_BATCH, seed=SEED)
    phi = problem.meta_parameters()
    estimator = TruncatedBackprop(1)
    started = time.perf_counter()
    online_meta_train(system, estimator, phi, torch.optim.Adam(phi, lr=OUTER_LR), truncations=steps)
    trained = system.finish(estimator.state, phi)  # the last real step
    seconds = time.perf_counter() - started
    return seconds / steps, [p.detach() for p in phi], trained


def hand_written(steps: int, seed: int) -> tuple[float, list[torch.Tensor], dict[str, torch.Tensor]]:
    problem, episode = make_problem(seed)
    model, weighter = problem.model, copy.deepcopy(problem.inner_loss.weighter)
    outer = torch.optim.Adam(weighter.parameters(), lr=OUTER_LR)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf: dict[str, torch.Tensor] | None = None

    def momentum_step(w, buf, grads):
        buf = {n: grads[n] if buf is None else MOMENTUM * buf[n] + grads[n] for n in w}
        return {n: w[n] - LR * buf[n] for n in w}, buf

    started = time.perf_counter()
    for t in range(steps):
        rows = problem.batch_rows(t, N)
        x, y = episode.support_x[rows], episode.support_y[rows]
        # virtual step, through the real optimizer, differentiable in the weight net
        wv = {n: p.clone().requires_grad_() for n, p in w.items()}
        losses = F.cross_entropy(functional_call(model, wv, (x,)), y, reduction="none")
        loss = (weighter(losses.detach()) * losses).mean()
        grads = dict(zip(wv, torch.autograd.grad(loss, list(wv.values()), create_graph=True)))
        virtual, _ = momentum_step(wv, buf, grads)
        meta = meta_rows(SEED, t, M, META_BATCH)
        outer.zero_grad()
        F.cross_entropy(functional_call(model, virtual, (episode.query_x[meta],)), episode.query_y[meta]).backward()
        outer.step()
        # the real step with the updated weight net
        wr = {n: p.clone().requires_grad_() for n, p in w.items()}
        losses = F.cross_entropy(functional_call(model, wr, (x,)), y, reduction="none")
        with torch.no_grad():
            weights = weighter(losses.detach())
        grads = dict(zip(wr, torch.autograd.grad((weights * losses).mean(), list(wr.values()))))
        w, buf = momentum_step({n: p.detach() for n, p in wr.items()}, buf, grads)
    seconds = time.perf_counter() - started
    return seconds / steps, [p.detach() for p in weighter.parameters()], w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers_mwnet.json"))
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("need positive --steps, --repeats and --threads")
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    seconds: dict[str, list[float]] = {"metaloss": [], "hand_written": []}
    results = {}
    ours(2, 0), hand_written(2, 0)  # warm-up
    for repeat in range(args.repeats):
        order = [("metaloss", ours), ("hand_written", hand_written)]
        for name, run in order if repeat % 2 == 0 else reversed(order):
            per_step, phi, trained = run(args.steps, 0)
            seconds[name].append(per_step)
            results[name] = (phi, trained)
    (phi_a, w_a), (phi_b, w_b) = results["metaloss"], results["hand_written"]
    result = {
        "benchmark": "peers_mwnet",
        **provenance(), "torch": torch.__version__,
        "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "seconds_per_step": {n: round(statistics.median(s), 5) for n, s in seconds.items()},
        "metaloss_over_hand_written": round(statistics.median(seconds["metaloss"])
                                            / statistics.median(seconds["hand_written"]), 3),
        "weight_net_max_abs_difference": max((a - b).abs().max().item() for a, b in zip(phi_a, phi_b)),
        "model_max_abs_difference": max((w_a[n] - w_b[n]).abs().max().item() for n in w_b),
        "weight_net_moved": max((a - b).abs().max().item()
                                for a, b in zip(phi_b, make_problem(0)[0].meta_parameters())),
    }  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()

"""How close the papers' meta-gradient approximations are to the exact one, on the same batches over the
course of a run: MLC's and EMLC's identity-Hessian K-step look-ahead (reverse mode, and EMLC's forward-
mode jvp) against the exact K-step meta-gradient (truncated backpropagation through the K steps), and
MPL's first-order teacher feedback (one drawn pseudo-label per row, and the mean over `--draws` draws)
against the exact one-step meta-gradient of the teacher's soft labels. The gradient of the corrector's
or teacher's own outer losses (the same in every estimate) is taken out before comparing. The run is
driven by the approximation (what a user of algorithm=mlc / emlc / mpl trains with); every `--every`
look-aheads the other estimators are evaluated from the same state, phi and batches. Recorded: cosine
similarity, relative norm |approx| / |exact| and seconds per estimate.

    python benchmarks/noisy_labels/approximation.py --dataset fashion_mnist --rate 0.6
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from metaloss.hypergrad import IdentityHessian, PseudoLabelFeedback, TruncatedBackprop
from metaloss.online import broadcast

ROOT = Path(__file__).resolve().parents[2]
CASES = {  # name -> (overrides, the approximation driving the run, the estimators compared with exact)
    "mlc_k3": (["algorithm=mlc", "hypergrad.truncation=3"], "reverse", ["reverse"]),
    "emlc_k3": (["algorithm=emlc", "hypergrad.truncation=3"], "forward", ["forward", "reverse"]),
    "emlc_k1": (["algorithm=emlc"], "forward", ["forward"]),
    "mpl": (["algorithm=mpl"], "mpl", ["mpl"]),
}


def load_common():
    spec = importlib.util.spec_from_file_location("metaloss_scripts_common_bench", ROOT / "scripts" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(ROOT / "scripts"))
    spec.loader.exec_module(module)
    return module


def flat(grads: list) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads if g is not None])


def timed(estimator, system, phi) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = estimator.estimate(system, phi)
    return flat(out.grads), time.perf_counter() - start


def direct_terms(system, state: dict, phi: list) -> torch.Tensor:
    """The gradient of the corrector's or teacher's own outer losses on the look-ahead's meta batch
    (EMLC's clean cross-entropy and retain BCE, MPL's supervised teacher loss), which every estimate
    contains in full: it is taken out, so that only the look-ahead's meta-gradient is compared."""
    if not hasattr(system.problem.inner_loss, "outer_terms"):
        return torch.zeros(())
    meta = system._meta_batch(state["t"], state["particles"][0][0])
    with torch.enable_grad():
        terms = system.problem.inner_loss.outer_terms(meta.query_x, meta.query_y)
        if not terms.requires_grad:  # MLC's corrector has none
            return torch.zeros(())
        grads = torch.autograd.grad(terms, phi, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(phi, grads)])


def measure(dataset: str, rate: float, name: str, seed: int, epochs: int, every: int, draws: int) -> dict:
    overrides, driver, compared = CASES[name]
    task = f"semisup_{dataset}" if name == "mpl" else f"noisy_{dataset}"
    extra = [] if name == "mpl" else [f"task.noise.rate={rate}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("meta_train", overrides=[f"task={task}", *overrides, *extra, f"seed={seed}",
                                               f"task.epochs={epochs}", "logger=none"])  # fmt: skip
    common = load_common()
    from online_task import OnlineTaskRun

    built = common.build(cfg)
    run = OnlineTaskRun(built.splits, built.problem, built.estimator, built.outer_opt, seed, 10)
    system, phi, opt = run.system, run.phi, built.outer_opt
    k, eta = int(cfg.hypergrad.truncation), float(cfg.inner_opt.lr)

    def make(kind: str):
        if kind == "exact":
            return TruncatedBackprop(k)
        if kind == "mpl":
            return PseudoLabelFeedback(1)
        return IdentityHessian(k, eta, kind)

    if name == "mpl":  # the exact side: soft labels of the same teacher, differentiable
        soft = copy.copy(system)
        soft.problem = copy.copy(system.problem)
        soft.problem.inner_loss = copy.copy(system.problem.inner_loss)
        object.__setattr__(soft.problem.inner_loss, "mode", "soft")
    driving, records, seconds = make(driver), [], {kind: [] for kind in [*compared, "exact"]}
    step = 0
    while driving.state is None or driving.state["t"] < system.horizon:
        if step % every == 0 and driving.state is not None:
            row = {"t": int(driving.state["t"])}
            # the pending real steps taken now, by the run's own inner loss, so every estimator starts alike
            start = system._real_steps(driving.state, broadcast(phi, 1))
            direct = direct_terms(system, start, phi)  # the teacher's own losses: the same in every estimate
            exact_est = make("exact")
            exact_est.state, exact_est.count = start, driving.count
            exact, seconds_exact = timed(exact_est, soft if name == "mpl" else system, phi)
            exact = exact - direct
            seconds["exact"].append(seconds_exact)
            for kind in compared:
                other = make(kind)
                other.state, other.count = start, driving.count
                approx, s = timed(other, system, phi)
                approx = approx - direct
                seconds[kind].append(s)
                row[f"{kind}_cosine"] = float(F.cosine_similarity(approx, exact, dim=0))
                row[f"{kind}_relative_norm"] = float(approx.norm() / exact.norm().clamp_min(1e-30))
            if name == "mpl" and draws > 1:  # the mean feedback over more draws of the pseudo-labels
                loss, seed0, total = system.problem.inner_loss, system.problem.inner_loss.seed, 0
                for d in range(draws):
                    loss.seed = seed0 + 1000 * (d + 1)
                    other = make("mpl")
                    other.state, other.count = start, driving.count
                    total = total + timed(other, system, phi)[0] - direct
                loss.seed = seed0
                mean = total / draws
                row[f"mpl_mean{draws}_cosine"] = float(F.cosine_similarity(mean, exact, dim=0))
                row[f"mpl_mean{draws}_relative_norm"] = float(mean.norm() / exact.norm().clamp_min(1e-30))
            records.append(row)
        out = driving.estimate(system, phi)
        for p, g in zip(phi, out.grads):
            p.grad = None if g is None else g.detach().clone()
        opt.step()
        step += 1
    summary = {}
    if name == "mpl" and draws > 1:
        compared = [*compared, f"mpl_mean{draws}"]
        seconds[f"mpl_mean{draws}"] = [draws * x for x in seconds["mpl"]]
    for kind in compared:
        cos = np.array([r[f"{kind}_cosine"] for r in records])
        rel = np.array([r[f"{kind}_relative_norm"] for r in records])
        summary[kind] = {"cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4),
                         "relative_norm_median": round(float(np.median(rel)), 4),
                         "seconds_per_estimate": round(float(np.mean(seconds[kind])), 4)}  # fmt: skip
    summary["exact"] = {"seconds_per_estimate": round(float(np.mean(seconds["exact"])), 4)}
    return {"case": name, "dataset": dataset, "rate": None if name == "mpl" else rate, "K": k, "eta": eta,
            "epochs": epochs, "look_aheads": step, "summary": summary, "records": records}  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        for kind in result["summary"]:
            if kind == "exact":
                continue
            ts = [r["t"] for r in result["records"]]
            ax.plot(ts, [r[f"{kind}_cosine"] for r in result["records"]], label=f"{result['case']} ({kind})",
                    alpha=0.8)  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel("cosine(approximate, exact)")
    ax.set_title("meta-gradient approximations against the exact meta-gradient, same batches")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist1d", "digits"])
    parser.add_argument("--rate", type=float, default=0.6)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--draws", type=int, default=64, help="MPL: pseudo-label draws averaged as well")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = [measure(args.dataset, args.rate, c, args.seed, args.epochs, args.every, args.draws) for c in args.cases]
    out = ROOT / "benchmarks" / "results" / f"meta_gradient_approximations_{args.dataset}"
    record = {"benchmark": out.name, "command": "python benchmarks/noisy_labels/approximation.py " + " ".join(
        sys.argv[1:]), "date": started.isoformat(timespec="seconds"), "machine": f"{platform.machine()}, "
        f"{__import__('os').cpu_count()} CPU cores, torch {torch.__version__}, one thread", "results": results}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(results, out.with_suffix(".png"))
    lines = ["| case | estimator | cosine mean (min) | relative norm, median | s / estimate (exact) |",
             "|---|---|---|---|---|"]
    for r in results:
        for kind, s in r["summary"].items():
            if kind != "exact":
                lines.append(f"| {r['case']} (K={r['K']}) | {kind} | {s['cosine_mean']:.3f} ({s['cosine_min']:.3f}) | "
                             f"{s['relative_norm_median']:.3f} | {s['seconds_per_estimate']:.4f} "
                             f"({r['summary']['exact']['seconds_per_estimate']:.4f}) |")  # fmt: skip
    out.with_suffix(".md").write_text(f"{record['command']} ({record['date']}, {record['machine']})\n\n" +
                                      "\n".join(lines) + "\n")  # fmt: skip
    print("\n".join(lines))
    print(json.dumps({"benchmark": record["benchmark"], "cases": len(results)}))


if __name__ == "__main__":
    main()

"""Every algorithm and hypergradient-estimator config still learns: a short meta-training run of the
composed config on the sinusoid task (the default task) beats the untrained start on fixed meta-test
tasks, with non-overlapping 95% confidence intervals of the query MSE after T inner steps. The
classification algorithms (ml3, npbml and its ablations) and the learned update rule run on the
synthetic few-shot classification task `task=blobs` (query cross-entropy), with T = 3 (at lr 0.1).

A few seconds each on one thread. The settings (outer lr 0.01, meta-steps, meta-batch, T, ES
particles, test tasks) were checked to pass on seeds 0, 1 and 2; the test runs seed 0.
- truncated and tbptt keep their K = 1 with T = 1, where the truncation is the whole inner loop: a
  learned initialisation gets no gradient through a truncated unroll (the stop-gradient cuts it
  off), so T > K trains nothing. pes and es_single run T = 1 too (one truncation); update=truncation
  runs T = 4, K = 2 (two meta-updates per meta-step). The online ES kinds use 32 particles (16
  pairs) instead of 8: with 8 they do not clear the bar robustly in a few seconds.
- iMAML runs with a proximal strength of 20 instead of 2.0: at 2.0 the proximal inner problem of the
  untrained MLP is not convex (Hessian eigenvalues measured from about -8 up to about 70), ten inner
  steps at lr 0.01 stop far from w*, CG stalls (relative residual ~0.3) and Neumann with alpha = 0.1
  diverges (meta-gradient norm ~1e14), so the implicit meta-gradient does not train in seconds. At
  20 the inner problem is strongly convex; Neumann needs alpha < 2 / lambda_max, hence 0.01."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from metaloss.engine import evaluate, meta_train

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
COMMON = ("logger=none", "outer_opt.lr=0.01")  # a larger outer lr than the default 1e-3: few steps
IMAML = ("algorithm=imaml", "problem.inner_regularizer.strength=20")
NEUMANN = (*IMAML, "hypergrad=implicit_neumann", "hypergrad.iterations=10", "hypergrad.alpha=0.01")
PER_TRUNCATION = ("algorithm=maml", "hypergrad=es_single", "hypergrad.update=truncation", "hypergrad.truncation=2")
BLOBS = ("task=blobs", "inner_opt.lr=0.1", "problem.inner_steps=3")
SEED = 0


@dataclass(frozen=True)
class Case:
    overrides: tuple[str, ...]
    meta_steps: int
    meta_batch: int
    test_tasks: int = 400  # meta-test episodes 0..test_tasks-1 of the test split, before and after


CASES = {
    # algorithms, each with its own estimator (maml, fomaml, anil, metasgd: T = 1)
    "maml": Case(("algorithm=maml",), 100, 10),
    "fomaml": Case(("algorithm=fomaml",), 150, 10),
    "anil": Case(("algorithm=anil",), 150, 10),
    "metasgd": Case(("algorithm=metasgd",), 100, 10),
    "imaml": Case((*IMAML, "hypergrad.iterations=5"), 60, 5, test_tasks=150),  # T = 10, implicit_cg
    # estimators on plain MAML (implicit ones on iMAML: a plain learned init has no implicit gradient)
    "unrolled": Case(("algorithm=maml", "hypergrad=unrolled"), 100, 10),
    "first_order": Case(("algorithm=maml", "hypergrad=first_order"), 150, 10),
    "truncated": Case(("algorithm=maml", "hypergrad=truncated"), 100, 10),
    "checkpointed": Case(("algorithm=maml", "hypergrad=checkpointed", "problem.inner_steps=4"), 60, 5),
    "implicit_cg": Case((*IMAML, "hypergrad=implicit_cg", "hypergrad.iterations=5"), 60, 5, test_tasks=150),
    "implicit_neumann": Case(NEUMANN, 60, 5, test_tasks=150),
    "es": Case(("algorithm=maml", "hypergrad=es"), 300, 5),
    "tbptt": Case(("algorithm=maml", "hypergrad=tbptt"), 100, 10),
    "pes": Case(("algorithm=maml", "hypergrad=pes", "hypergrad.particles=32"), 200, 5),
    "es_single": Case(("algorithm=maml", "hypergrad=es_single", "hypergrad.particles=32"), 200, 5),
    "es_single_per_truncation": Case(
        (*PER_TRUNCATION, "problem.inner_steps=4", "hypergrad.particles=32"), 100, 5, test_tasks=250
    ),
    # classification algorithms and learned optimizers, on task=blobs
    "ml3": Case((*BLOBS, "algorithm=ml3"), 50, 8, test_tasks=200),
    "npbml": Case((*BLOBS, "algorithm=npbml"), 25, 8, test_tasks=200),
    "npbml_loss": Case((*BLOBS, "algorithm=npbml_loss"), 25, 8, test_tasks=200),
    "npbml_optimizer": Case((*BLOBS, "algorithm=npbml_optimizer"), 40, 8, test_tasks=200),
    "mlp_update_rule_es_single": Case(
        ("task=blobs", "problem.inner_steps=3", "init=fixed", "inner_opt=mlp_update_rule")
        + ("hypergrad=es_single", "hypergrad.particles=16"),
        40,
        4,
        test_tasks=200,
    ),
}


@functools.cache
def load_common():
    """scripts/common.py, which is not a package module."""
    import common  # scripts/ is on sys.path (tests/conftest.py)

    return common


def compose_with(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("meta_train", overrides=list(overrides))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def untrained_and_trained(case: Case, seed: int = SEED) -> tuple[tuple[float, float], tuple[float, float]]:
    """(mean, 95% CI half-width) of the meta-test query loss after T inner steps, before and after
    meta-training `case` with `seed`."""
    common = load_common()
    cfg = compose_with(*COMMON, *case.overrides, f"seed={seed}")
    built = common.build(cfg)
    problem, test, dtype = built.problem, built.splits.test, common.dtype_of(cfg)
    steps, key = [cfg.problem.inner_steps], f"loss_step{cfg.problem.inner_steps}"
    before = evaluate(problem, test, case.test_tasks, steps, device=cfg.device, dtype=dtype)
    meta_train(problem, built.estimator, built.outer_opt, built.splits.train, meta_steps=case.meta_steps,
               meta_batch=case.meta_batch, progress=False, device=cfg.device, dtype=dtype)  # fmt: skip
    after = evaluate(problem, test, case.test_tasks, steps, device=cfg.device, dtype=dtype)
    return (before[key], before[f"{key}_ci95"]), (after[key], after[f"{key}_ci95"])


# the noisy-label algorithms train one model in the online regime, not episodes: their end-to-end runs
# (above-chance test accuracy after two epochs on noisy digits, all but ml3_online) are in
# tests/scripts/test_noisy_label_runs.py; label correction and pseudo-labelling (above chance too) in
# tests/scripts/test_label_correction_runs.py
NOISY_LABEL_ALGORITHMS = {"cross_entropy", "clean_only", "gce", "sce", "nce_rce", "poly1", "mwnet", "l2rw", "storm",
                          "ml3_online", "transition", "mlc", "emlc", "mpl", "mpl_exact", "pseudo_label"}  # fmt: skip
# the domain-generalisation algorithms and Fish's estimator train one model on source-domain episodes
# and are scored on whole domains: their end-to-end runs (above chance after 120 steps on rotated
# digits, with training-domain model selection; the learned loss without a threshold) are in
# tests/scripts/test_domain_runs.py
DOMAIN_ALGORITHMS = {"erm", "mldg", "maml_domains", "fish", "reptile", "learned_loss_domains"}


def test_every_algorithm_and_estimator_config_has_a_case() -> None:
    configs = {p.stem for group in ("algorithm", "hypergrad") for p in (CONFIG_DIR / group).glob("*.yaml")}
    assert configs - NOISY_LABEL_ALGORITHMS - DOMAIN_ALGORITHMS <= set(CASES)


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_still_learns_sinusoid(name: str) -> None:
    (untrained, untrained_ci), (trained, trained_ci) = untrained_and_trained(CASES[name])
    assert trained + trained_ci < untrained - untrained_ci, (
        f"{name}: trained {trained:.3f} ± {trained_ci:.3f} vs untrained {untrained:.3f} ± {untrained_ci:.3f}"
    )

"""Checkpoints and the run state: every estimator resumes bitwise, files are written atomically and
read without running code, a checkpoint for another problem is one line, non-finite updates are
skipped, counted and stop the run after too many in a row."""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from metaloss.checkpoint import CheckpointError, atomic_write, load_checkpoint, read_checkpoint, save_checkpoint
from metaloss.engine import MetaTrainer, NonFiniteError
from metaloss.errors import ConfigError
from metaloss.hypergrad import AntitheticES, CheckpointedUnrolled, EpisodicOnline, Implicit, Unrolled
from metaloss.losses import mse
from metaloss.meta import HyperparameterOptimizer, LearnedInit, Proximal
from metaloss.models import MLP
from metaloss.problem import BilevelProblem
from metaloss.types import HypergradOut
from tasks import SinusoidSampler

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def problem_for(name: str, seed: int) -> BilevelProblem:
    torch.manual_seed(seed)
    model = MLP(1, (8,), 1)
    regularizer = Proximal(1.0) if name == "implicit" else None
    steps = 3 if name.startswith(("online", "checkpointed", "implicit")) else 2
    inner_opt = HyperparameterOptimizer("sgd", lr=0.02, momentum=0.5, learn=["lr"])
    return BilevelProblem(model, LearnedInit(model), inner_opt, mse, mse, steps, inner_regularizer=regularizer)


ESTIMATORS = {
    "unrolled": lambda: Unrolled("full"),
    "first_order": lambda: Unrolled("first_order"),
    "truncated": lambda: Unrolled("truncated", truncation=1),
    "checkpointed": lambda: CheckpointedUnrolled(segment=2),
    "implicit": lambda: Implicit("cg", iterations=5),
    "es": lambda: AntitheticES(particles=2, sigma=0.05, seed=3),
    "es_batched": lambda: AntitheticES(particles=2, sigma=0.05, seed=3, batched=True),
    "online_tbptt_truncation": lambda: EpisodicOnline("tbptt", truncation=1, update="truncation"),
    "online_pes": lambda: EpisodicOnline("pes", truncation=1, particles=2, sigma=0.05, seed=5),
    "online_es_single_truncation": lambda: EpisodicOnline("es_single", truncation=[1, 2], particles=2, sigma=0.05,
                                                          seed=5, update="truncation", batched=True),  # fmt: skip
}


def trainer_for(name: str, seed: int = 0) -> MetaTrainer:
    problem = problem_for(name, seed)
    outer = torch.optim.Adam(problem.meta_parameters(), lr=0.01)
    return MetaTrainer(problem, ESTIMATORS[name](), outer, SinusoidSampler(seed=1), meta_batch=2)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_a_resumed_run_equals_the_uninterrupted_run_bitwise(name, tmp_path):
    """Train 5 steps; or train 2, checkpoint, rebuild everything from another seed, load, train to 5.
    The global RNG is drawn from between the steps (as dropout would), so it must be restored too."""
    torch.manual_seed(123)
    whole = trainer_for(name)
    whole.train(5, progress=False, checkpoint=lambda t: torch.rand(1), checkpoint_every=1)
    rng_after_whole = torch.get_rng_state()
    torch.manual_seed(123)
    first = trainer_for(name)
    first.train(2, progress=False, checkpoint=lambda t: torch.rand(1), checkpoint_every=1)
    save_checkpoint(tmp_path / "checkpoint.pt", first.state_dict())
    torch.manual_seed(999)  # the resumed process starts with another RNG state
    resumed = trainer_for(name, seed=7)
    resumed.load_state_dict(read_checkpoint(tmp_path / "checkpoint.pt"))
    assert resumed.run.step == 2
    resumed.train(5, progress=False, checkpoint=lambda t: torch.rand(1), checkpoint_every=1)
    for a, b in zip(whole.problem.meta_parameters(), resumed.problem.meta_parameters()):
        assert torch.equal(a, b)
    assert whole.run.outer_updates == resumed.run.outer_updates
    assert torch.equal(rng_after_whole, torch.get_rng_state())
    state_a, state_b = whole.outer_opt.state_dict()["state"], resumed.outer_opt.state_dict()["state"]
    assert all(torch.equal(state_a[k]["exp_avg"], state_b[k]["exp_avg"]) for k in state_a)
    assert whole.estimator.state_dict() == resumed.estimator.state_dict()


def test_stateful_estimators_say_so_and_stateless_ones_refuse_state():
    assert AntitheticES(seed=1).state_dict() == {"calls": 0}
    assert EpisodicOnline("pes").state_dict() == {"calls": 0}
    assert Unrolled().state_dict() == {}
    with pytest.raises(ConfigError, match="stateless"):
        Unrolled().load_state_dict({"calls": 3})


def test_checkpoint_is_loaded_without_running_its_pickle(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"meta": {"init": {}}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle") as err:
        read_checkpoint(path)
    assert len(str(err.value).splitlines()) == 1
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"meta": {}, "x": os.system}))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_checkpoint(plain)


def test_a_checkpoint_of_another_model_is_one_line_naming_the_mismatch(tmp_path):
    trainer = trainer_for("unrolled")
    save_checkpoint(tmp_path / "c.pt", trainer.state_dict())
    torch.manual_seed(0)
    wider = MLP(1, (16,), 1)
    learned_lr = HyperparameterOptimizer("sgd", lr=0.02, learn=["lr"])
    other = BilevelProblem(wider, LearnedInit(wider), learned_lr, mse, mse, 1)
    with pytest.raises(CheckpointError, match=r"shape \[8, 1\] but this model's has \[16, 1\]") as err:
        load_checkpoint(tmp_path / "c.pt", other)
    assert len(str(err.value).splitlines()) == 1
    fixed_lr = BilevelProblem(wider, LearnedInit(wider), HyperparameterOptimizer("sgd", lr=0.02), mse, mse, 1)
    with pytest.raises(CheckpointError, match=r"meta-modules \['init', 'inner_opt'\] but this problem has \['init'\]"):
        load_checkpoint(tmp_path / "c.pt", fixed_lr)
    torch.save({"format": "metaloss-checkpoint", "version": 99, "meta": {}}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="version 99; this metaloss reads"):
        read_checkpoint(tmp_path / "newer.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        read_checkpoint(tmp_path / "truncated.pt")


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"meta": {"init": {"w": torch.ones(2)}}})

    def disk_full(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert torch.equal(read_checkpoint(path)["meta"]["init"]["w"], torch.ones(2))


def test_sigkill_during_the_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A process writes a good checkpoint, then is killed (SIGKILL) in the middle of writing the next."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {REPO_ROOT!r})
        from pathlib import Path
        import metaloss.checkpoint as c
        path = Path({str(tmp_path / "checkpoint.pt")!r})
        c.save_checkpoint(path, {{"meta": {{"init": {{"w": torch.ones(3)}}}}}})
        real_write_bytes = Path.write_bytes
        def slow_write_bytes(self, data):
            with open(self, "wb") as handle:
                handle.write(bytes(data)[: len(data) // 2])
                handle.flush()
            print("writing", flush=True)
            time.sleep(60)
        Path.write_bytes = slow_write_bytes
        c.save_checkpoint(path, {{"meta": {{"init": {{"w": torch.zeros(3)}}}}}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # killed mid-write
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert torch.equal(read_checkpoint(tmp_path / "checkpoint.pt")["meta"]["init"]["w"], torch.ones(3))


class NonFiniteAt(Unrolled):
    """Unrolled, except that the estimates of the calls in `bad` are NaN (a test double for divergence)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__("full")
        self.bad, self.calls = bad, 0

    def estimate(self, problem, episodes) -> HypergradOut:
        out = super().estimate(problem, episodes)
        self.calls += 1
        if self.calls - 1 in self.bad:
            return HypergradOut([torch.full_like(g, math.nan) for g in out.grads], out.outer_loss, out.metrics)
        return out


def test_non_finite_updates_are_skipped_and_counted():
    trainer = trainer_for("unrolled")
    trainer.estimator = NonFiniteAt({1, 2})
    history = []
    for step in range(4):
        before = [p.detach().clone() for p in trainer.problem.meta_parameters()]
        history = trainer.train(step + 1, progress=False)
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainer.problem.meta_parameters()))
        assert changed == (step not in (1, 2))
    assert trainer.run.skipped_updates == 2 and trainer.run.outer_updates == 2 and trainer.run.bad_streak == 0
    assert history[-1]["skipped_updates"] == 0.0
    assert all(torch.isfinite(p).all() for p in trainer.problem.meta_parameters())


def test_too_many_consecutive_non_finite_updates_stop_the_run():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    diverging = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=1e6), mse, mse, 3)
    before = [p.detach().clone() for p in diverging.meta_parameters()]
    outer = torch.optim.Adam(diverging.meta_parameters(), lr=0.01)
    trainer = MetaTrainer(diverging, Unrolled(), outer, SinusoidSampler(), meta_batch=2, max_bad_steps=3)
    with pytest.raises(NonFiniteError, match="3 consecutive meta-updates"):
        trainer.train(20, progress=False)
    assert trainer.run.skipped_updates == 3 and trainer.run.outer_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, diverging.meta_parameters()))  # phi untouched


def test_an_estimator_that_reaches_no_meta_parameter_is_a_config_error():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1)
    maml = BilevelProblem(model, LearnedInit(model), HyperparameterOptimizer("sgd", lr=0.01), mse, mse, 3)
    outer = torch.optim.Adam(maml.meta_parameters(), lr=0.01)
    for estimator in (Implicit("cg"), Unrolled("truncated", truncation=1)):
        trainer = MetaTrainer(maml, estimator, outer, SinusoidSampler(), meta_batch=2)
        with pytest.raises(ConfigError, match="gives no meta-parameter a gradient"):
            trainer.train(1, progress=False)


@pytest.mark.parametrize("kind", ["pes", "tbptt"])
def test_an_online_system_run_resumes_bitwise(kind, tmp_path):
    """The online regime on a `TruncatedSystem` (the 2D learned-lr-schedule task) goes through the
    same outer loop: stopped after 3 of 7 updates (of 2 truncations each), checkpointed and resumed
    in fresh objects, it ends where the uninterrupted run ends, particles and noise included."""
    from metaloss.hypergrad import OnlineES, TruncatedBackprop
    from metaloss.online import OnlinePhi, SystemUpdates
    from tasks.synthetic import LearningRateSchedule2D

    def trainer() -> MetaTrainer:
        theta = torch.nn.Parameter(torch.tensor([-4.0, -4.0], dtype=torch.float64))
        online = OnlineES(8, 0.3, 10, resample_every=1, seed=4) if kind == "pes" else TruncatedBackprop(10)
        updates = SystemUpdates(LearningRateSchedule2D(horizon=30), online, update_every=2, truncations=13)
        return MetaTrainer(OnlinePhi([theta]), updates, torch.optim.Adam([theta], lr=0.05))

    whole = trainer()
    whole.train(7, progress=False)
    first = trainer()
    first.train(3, progress=False)
    save_checkpoint(tmp_path / "checkpoint.pt", first.state_dict())
    resumed = trainer()
    resumed.load_state_dict(read_checkpoint(tmp_path / "checkpoint.pt"))
    resumed.train(7, progress=False)
    assert resumed.estimator.done == whole.estimator.done == 13  # the last update has one truncation
    assert torch.equal(whole.problem.meta_parameters()[0], resumed.problem.meta_parameters()[0])
    assert not torch.equal(first.problem.meta_parameters()[0], whole.problem.meta_parameters()[0])
    assert resumed.estimator.history == whole.estimator.history[6:]

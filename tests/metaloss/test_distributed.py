"""metaloss.distributed in two real processes (gloo, a file rendezvous): the reduction is the mean
over all ranks' tasks, absent gradients stay absent, and MetaTrainer on 2 ranks leaves both ranks
with bitwise identical phi equal (to float tolerance) to one process's, a learned inner learning rate
included, with the tasks split and (antithetic ES) with the perturbation pairs split; the meta-test
gathered from 2 ranks equals one process's; the sum over ranks backpropagates, and a data-parallel
MW-Net training run (uneven shares of every batch) equals one process's run; a rank that raises makes
the other's collective fail (in well under a second here: gloo sees the closed connection) instead of
hanging."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metaloss.distributed import Distributed, export_slurm_environment, init_distributed
from metaloss.engine import MetaTrainer, evaluate
from metaloss.errors import ConfigError
from metaloss.hypergrad import AntitheticES, TruncatedBackprop, Unrolled
from metaloss.lookahead import LookaheadTraining
from metaloss.losses import cross_entropy, mse
from metaloss.meta import FixedInit, HyperparameterOptimizer, LearnedInit
from metaloss.meta.weighting import LossToWeight, WeightedLoss
from metaloss.models import MLP
from metaloss.online import SystemUpdates
from metaloss.problem import BilevelProblem
from metaloss.types import Episode, HypergradOut
from tasks import SinusoidSampler


def problem() -> BilevelProblem:
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).double()
    inner = HyperparameterOptimizer("sgd", learn=["lr"], lr=0.01).double()
    return BilevelProblem(model, LearnedInit(model), inner, mse, mse, 2)


def train(distributed: Distributed | None) -> tuple[list[torch.Tensor], dict[str, float]]:
    p = problem()
    outer = torch.optim.SGD(p.meta_parameters(), lr=0.002)
    trainer = MetaTrainer(p, Unrolled(), outer, SinusoidSampler(seed=3), meta_batch=5, dtype=torch.float64,
                          distributed=distributed)  # fmt: skip
    trainer.train(4, progress=False)
    test = evaluate(p, SinusoidSampler(seed=4), 5, [0, 1], dtype=torch.float64, distributed=distributed)
    return [t.detach().clone() for t in p.meta_parameters()], test


def worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    d = Distributed(rank, 2, rank, "gloo")
    count = rank + 1  # rank 0 averaged 1 task, rank 1 two
    grads = [torch.full((2,), float(rank + 1), dtype=torch.float64), None, torch.ones(3) * rank]
    reduced = d.reduce(HypergradOut(grads, float(rank), {"loss": float(rank), "acc": 0.5}), count,
                       [torch.zeros(2, dtype=torch.float64), torch.zeros(1), torch.zeros(3)])  # fmt: skip
    phi, test = train(d)
    es = es_step(d)
    x = torch.tensor([rank + 1.0], dtype=torch.float64, requires_grad=True)
    summed = d.sum_tensors([x * x, torch.ones(2) * rank])  # with a graph, and without
    (summed[0] * (rank + 1)).sum().backward()  # d/dx_r of sum_r' (r'+1) sum_r'' x_r''^2 = 2 x_r * 3
    online = online_run(d)
    torch.save({"reduced": reduced, "phi": phi, "test": test, "shard": d.shard(5), "es": es,
                "gathered": d.gather([rank, rank]), "summed": [t.detach() for t in summed], "x_grad": x.grad,
                "online": online}, f"{out}/rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def es_step(distributed: Distributed | None) -> list[torch.Tensor]:
    """phi after two SGD steps of antithetic ES (5 pairs; split over the ranks when distributed)."""
    p = problem()
    trainer = MetaTrainer(p, AntitheticES(particles=5, sigma=0.01, seed=2), torch.optim.SGD(p.meta_parameters(),
                          lr=0.002), SinusoidSampler(seed=3), meta_batch=2, dtype=torch.float64,
                          distributed=distributed, split="particles")  # fmt: skip
    trainer.train(2, progress=False)
    return [t.detach().clone() for t in p.meta_parameters()]


def online_run(distributed: Distributed | None) -> dict[str, list[torch.Tensor]]:
    """Three MW-Net updates of a training run (momentum SGD with weight decay, 2-step look-aheads,
    batches of 5 rows and meta batches of 5: shares of 2 and 3 rows on 2 ranks); phi and the model."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    episode = Episode(torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(3, (30,), generator=g),
                      torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(3, (12,), generator=g))
    model = torch.nn.Linear(4, 3).double()
    loss = WeightedLoss(LossToWeight(hidden=(5,), seed=2)).double()
    inner_opt = HyperparameterOptimizer("sgd", lr=0.3, momentum=0.9, weight_decay=0.01)
    p = BilevelProblem(model, FixedInit(model), inner_opt, loss, cross_entropy, 1, inner_batch_size=5,
                       shuffle_seed=3)  # fmt: skip
    p.data_parallel = distributed
    system = LookaheadTraining(p, episode, horizon=6, meta_batch_size=5, seed=4)
    online = TruncatedBackprop(2)
    trainer = MetaTrainer(p, SystemUpdates(system, online, 1, 3), torch.optim.SGD(p.meta_parameters(), lr=0.5),
                          distributed=distributed, split="rows")  # fmt: skip
    trainer.train(3, progress=False)
    model_params = system.finish(online.state, p.meta_parameters())
    return {"phi": [t.detach().clone() for t in p.meta_parameters()], "model": list(model_params.values())}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ranks")
    mp.start_processes(worker, args=(str(folder / "store"), str(folder)), nprocs=2, start_method="spawn")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_the_reduction_is_the_mean_over_every_task(ranks):
    for out in (r["reduced"] for r in ranks):
        torch.testing.assert_close(out.grads[0], torch.full((2,), (1 * 1 + 2 * 2) / 3, dtype=torch.float64))
        assert out.grads[1] is None  # absent on every rank: stays absent
        torch.testing.assert_close(out.grads[2], torch.ones(3) * 2 / 3)
        assert out.outer_loss == pytest.approx(2 / 3) and out.metrics == pytest.approx({"loss": 2 / 3, "acc": 0.5})
    assert [r["shard"] for r in ranks] == [(0, 2), (2, 5)] and ranks[1]["gathered"] == [0, 0, 1, 1]


def test_two_ranks_hold_identical_phi_equal_to_one_process(ranks):
    one, test = train(None)
    for a, b, c in zip(ranks[0]["phi"], ranks[1]["phi"], one):
        assert torch.equal(a, b)  # the same update applied on both ranks
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)
    assert ranks[0]["test"] == ranks[1]["test"] and ranks[0]["test"] == pytest.approx(test, rel=1e-12)


def test_es_pairs_split_over_two_ranks_give_the_one_process_estimate(ranks):
    one = es_step(None)
    for a, b, c in zip(ranks[0]["es"], ranks[1]["es"], one):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)
    assert not torch.equal(one[0], problem().meta_parameters()[0].detach())


def test_a_sum_over_ranks_backpropagates_the_sum_of_the_incoming_gradients(ranks):
    for r, out in enumerate(ranks):
        torch.testing.assert_close(out["summed"][0], torch.tensor([1.0 + 4.0], dtype=torch.float64))
        assert torch.equal(out["summed"][1], torch.ones(2))  # 0 + 1
        torch.testing.assert_close(out["x_grad"], torch.tensor([2.0 * (r + 1) * 3], dtype=torch.float64))


def test_a_data_parallel_training_run_on_two_ranks_equals_one_process(ranks):
    one = online_run(None)
    for key in ("phi", "model"):
        for a, b, c in zip(ranks[0]["online"][key], ranks[1]["online"][key], one[key]):
            assert torch.equal(a, b)  # the same steps on both ranks
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    untouched = LossToWeight(hidden=(5,), seed=2).double()  # the weight net's own seed: phi before training
    assert not torch.equal(one["phi"][0], next(untouched.parameters()))  # phi moved


def test_one_rank_outside_torchrun_and_bad_settings(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = init_distributed()
    assert (d.enabled, d.is_main, d.shard(7), d.device("cuda")) == (False, True, (0, 7), "cuda")
    out = HypergradOut([torch.ones(1)], 1.0, {"loss": 1.0})
    assert d.reduce(out, 3, [torch.zeros(1)]) is out and d.gather([1]) == [1] and d.broadcast(5) == 5
    with pytest.raises(ConfigError, match="distributed.backend"):
        init_distributed("mpi")
    with pytest.raises(ConfigError, match="at least the number of ranks"):
        p = problem()
        MetaTrainer(p, Unrolled(), torch.optim.SGD(p.meta_parameters(), lr=0.1), SinusoidSampler(), meta_batch=1,
                    distributed=Distributed(0, 2))  # fmt: skip
    with pytest.raises(ConfigError, match="split=particles is for hypergrad=es"):
        p = problem()
        MetaTrainer(p, Unrolled(), torch.optim.SGD(p.meta_parameters(), lr=0.1), SinusoidSampler(), meta_batch=2,
                    distributed=Distributed(0, 2), split="particles")  # fmt: skip
    assert os.environ.get("WORLD_SIZE") is None


def test_a_slurm_job_of_several_tasks_gets_torch_distributed_variables(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "")  # recorded, so that what the export writes is undone after the test
        monkeypatch.delenv(key)
    assert not export_slurm_environment()  # not a SLURM job
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "123", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NODEID": "1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert export_slurm_environment()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")] == ["3", "4", "1", "node07"]
    assert not export_slurm_environment()  # already set: left alone


def test_the_slurm_export_left_no_torch_variables_behind():
    """Runs after the test above (file order): later subprocesses must not believe they are rank 3 of 4."""
    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ


def raising_worker(rank: int, store: str, out: str) -> None:
    import datetime
    import time

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))  # fmt: skip
    d = Distributed(rank, 2, rank, "gloo")
    if rank == 1:
        raise ValueError("rank 1 fails in its inner loop")  # this rank raises; rank 0 is in a collective
    started = time.monotonic()
    try:
        d.reduce(HypergradOut([torch.ones(2)], 1.0, {}), 1, [torch.zeros(2)])
    except Exception as err:  # noqa: BLE001 - whatever the backend raises: not a hang
        torch.save({"error": type(err).__name__, "seconds": time.monotonic() - started}, f"{out}/rank0.pt")
        raise


def test_a_rank_that_raises_makes_the_others_fail_within_the_timeout(tmp_path):
    context = mp.start_processes(raising_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                                 start_method="spawn", join=False)  # fmt: skip
    for process in context.processes:
        process.join(timeout=120)
    codes = [process.exitcode for process in context.processes]
    assert all(code not in (None, 0) for code in codes), codes  # both ended, both with an error
    seen = torch.load(tmp_path / "rank0.pt")
    assert seen["seconds"] < 20 + 5, seen  # rank 0's collective failed (at the latest at the timeout)

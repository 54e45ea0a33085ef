"""The final per-sample weights of a finished noisy-label run (its checkpoint.pt): their quantiles,
the mean weight of clean and noisy rows, and the effective sample size of a batch, (sum v)^2 / sum v^2,
on the first 40 batches of 128 training rows. For a Fashion-MNIST MLP run of
`scripts/meta_train.py task=noisy_fashion_mnist algorithm=mwnet` (symmetric noise).

    python benchmarks/noisy_labels/weight_diagnostics.py benchmarks/runs/noisy_labels/fashion_mnist/sym60_mwnet_seed0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from metaloss.meta.weighting import LossToWeight
from tasks.classification import fashion_mnist_data
from tasks.noisy_label import make_noisy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rate", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint = torch.load(args.run_dir / "checkpoint.pt", weights_only=True)
    net = LossToWeight()
    net.load_state_dict({k.removeprefix("weighter."): v for k, v in checkpoint["meta"]["inner_loss"].items()})
    w = checkpoint["estimator"]["estimator"]["state"]["particles"][0][0]  # the trained MLP's weights
    seen, truth = make_noisy(fashion_mnist_data(), "symmetric", args.rate, 10, args.seed)
    x, y, noisy = seen.x_train[: 128 * 40], seen.y_train[: 128 * 40], truth.is_noisy[: 128 * 40]
    logits = torch.relu(x @ w["body.0.weight"].T + w["body.0.bias"]) @ w["head.weight"].T + w["head.bias"]
    with torch.no_grad():
        v = net(F.cross_entropy(logits, y, reduction="none"))  # [5120]
    batches = v.reshape(40, 128)
    ess = batches.sum(1) ** 2 / (batches**2).sum(1)
    quantiles = torch.quantile(v, torch.tensor([0.0, 0.5, 1.0])).tolist()
    out = {"run": str(args.run_dir), "weight_min_median_max": [round(q, 4) for q in quantiles],
           "weight_clean": round(float(v[~noisy].mean()), 4), "weight_noisy": round(float(v[noisy].mean()), 4),
           "effective_sample_size_of_128": round(float(ess.mean()), 1)}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()

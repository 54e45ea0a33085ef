"""meta_train.py's online regime for a noisy-label task (`tasks.noisy_label.NoisyLabelTask`): one model
trained on the noisy set while phi (a weighting net, L2RW's weights, a learned loss, or nothing: a
baseline) is updated from look-aheads on the clean meta set, through the one outer loop (checkpoints,
exact resume, non-finite guard). Every epoch: test accuracy, the training loss on the noisy labels,
and, from the hidden noise mask (analysis only), the accuracy against the true labels of the training
rows and how the weights separate clean from noisy rows (mean weights, AUC, histograms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaloss.distributed import Distributed
from metaloss.engine import MetaTrainer
from metaloss.errors import ConfigError
from metaloss.functional import forward
from metaloss.hypergrad import EpisodicOnline
from metaloss.lookahead import LookaheadTraining
from metaloss.meta.transition import transition_error
from metaloss.meta.weighting import weight_separation
from metaloss.online import SystemUpdates, check_truncation, truncation_length
from metaloss.problem import BilevelProblem
from metaloss.types import LossContext
from tasks.noisy_label import NoisyLabelTask

LOOKAHEAD_KINDS = ("tbptt", "identity_hessian", "identity_hessian_jvp", "mpl_feedback")
ANALYSIS_ROWS = 5000  # training rows scored every epoch (the first ones: the noise is i.i.d. over rows)


def truncation_count(horizon: int, truncation: Any) -> int:
    """How many truncations of the schedule `truncation` make up `horizon` steps."""
    lengths, t, count = check_truncation(truncation), 0, 0
    while t < horizon:
        t += truncation_length(lengths, count, horizon - t)
        count += 1
    return count


@torch.no_grad()
def classify(problem: BilevelProblem, params: dict[str, Tensor], x: Tensor, y: Tensor, batch: int = 2000
             ) -> tuple[float, float, Tensor]:  # fmt: skip
    """Mean cross-entropy and accuracy of the model with `params` on (x, y), and the logits [N, C]."""
    x = x.to(next(iter(params.values())).dtype) if x.is_floating_point() else x
    logits = torch.cat([forward(problem.model, params, x[i : i + batch]) for i in range(0, len(x), batch)])
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item(), logits


class OnlineTaskRun:
    """The pieces of one run, built from what `common.build` made of the config."""

    def __init__(self, task: NoisyLabelTask, problem: BilevelProblem, estimator: Any, outer_opt: Any, seed: int,
                 max_bad_steps: int, distributed: Distributed | None = None, split: str = "auto") -> None:  # fmt: skip
        if not isinstance(estimator, EpisodicOnline) or estimator.kind not in LOOKAHEAD_KINDS or (
                estimator.update == "horizon"):  # fmt: skip
            raise ConfigError("a noisy-label task runs in the online regime with truncated backpropagation or its "
                              f"identity-Hessian approximation: hypergrad.kind in {LOOKAHEAD_KINDS} with "
                              "hypergrad.update=truncation or an int (the task config sets it; pes and es_single "
                              "are not wired to noisy-label tasks yet)")  # fmt: skip
        reads_labels = getattr(problem.inner_loss, "reads_labels", True)
        if task.data.unlabelled and task.train_on == "noisy" and reads_labels:
            raise ConfigError("this task's training rows are unlabelled (semi-supervised): its algorithms are mpl, "
                              "mpl_exact, pseudo_label and clean_only")  # fmt: skip
        if not reads_labels and not task.data.unlabelled:
            raise ConfigError("pseudo-labelling (mpl, pseudo_label) is for tasks with unlabelled data: "
                              "task=semisup_fashion_mnist, semisup_mnist1d or semisup_digits")  # fmt: skip
        distributed = distributed or Distributed()
        if distributed.enabled and estimator.kind != "tbptt":
            raise ConfigError(f"a data-parallel training run looks ahead with hypergrad.kind=tbptt; {estimator.kind} "
                              "runs in one process")  # fmt: skip
        every = 1 if estimator.update == "truncation" else int(estimator.update)
        dtype = next(problem.model.parameters()).dtype  # the run's (dtype=float64 casts the data too)
        episode = task.episode().to(None, dtype)
        problem.inner_batch_size, problem.shuffle_seed = task.inner_batch_size, seed
        problem.data_parallel = distributed if distributed.enabled else None  # every batch's rows over the ranks
        self.phi = problem.meta_parameters()
        real_step = task.real_step if self.phi else "lookahead"  # nothing to update: one pass per step
        self.task, self.problem = task, problem
        self.system = LookaheadTraining(problem, episode, task.horizon, task.meta_batch_size, seed, real_step,
                                        task.meta_source, task.select_factor, task.average)  # fmt: skip
        self.online = estimator.online_estimator()
        truncations = truncation_count(task.horizon, self.online.lengths)
        self.updates = SystemUpdates(self.system, self.online, every, truncations)
        self.meta_steps = -(-truncations // every)
        self.trainer = MetaTrainer(problem, self.updates, outer_opt, max_bad_steps=max_bad_steps,
                                   distributed=distributed, split=split)  # fmt: skip
        self.epochs_logged = 0
        n = min(ANALYSIS_ROWS, len(task.data.y_train))
        self.analysis = (task.data.x_train[:n], task.data.y_train[:n], task.truth.y_true[:n], task.truth.is_noisy[:n])

    def state(self) -> dict[str, Any]:
        return self.online.state  # the system state TruncatedBackprop carries

    def epoch_metrics(self, state: Any) -> tuple[dict[str, float], Tensor | None]:
        """Test accuracy, the noisy-label training loss, the true-label training accuracy and (for a
        per-sample weighting) the weight separation, on the analysis rows; and their weights. With
        averaging (task.average > 0) the test metrics are the averaged model's, the last iterate's
        beside them; the training-row metrics are always the last iterate's (the model that trains)."""
        data = self.task.data
        params, average = self.system.params(state), self.system.averaged_params(state)
        test_loss, test_acc, _ = classify(self.problem, params, data.x_test, data.y_test)
        last = {}
        if average is not None:
            last = {"last_iterate_test_accuracy": test_acc, "last_iterate_test_loss": test_loss}
            test_loss, test_acc, _ = classify(self.problem, average, data.x_test, data.y_test)
        x, y_noisy, y_true, is_noisy = self.analysis
        unlabelled = data.unlabelled
        train_loss, train_acc, logits = classify(self.problem, params, x, y_true if unlabelled else y_noisy)
        metrics = {"test_accuracy": test_acc, "test_loss": test_loss, **last,
                   "train_accuracy_true_labels": (logits.argmax(1) == y_true).float().mean().item()}  # fmt: skip
        if not unlabelled:
            metrics.update({"train_loss_noisy_labels": train_loss, "train_accuracy_noisy_labels": train_acc})
        loss, weights = self.problem.inner_loss, None
        if hasattr(loss, "weights") and getattr(loss.weighter, "depends_on_sample", True):
            context = LossContext(x, params, None, self.system.episode, lambda inputs: forward(self.problem.model,
                                                                                              params, inputs))
            with torch.no_grad():
                weights = loss.weights(logits, y_noisy, context)
            metrics.update(weight_separation(weights, is_noisy))
        if hasattr(loss, "transition") and not unlabelled:  # a learned noise model against the realised one
            metrics["transition_error"] = transition_error(loss.transition().detach().cpu().double(),
                                                           self.task.truth.transition)  # fmt: skip
        if hasattr(loss, "corrected"):
            context = LossContext(x, params, None, self.system.episode, lambda inputs: forward(self.problem.model,
                                                                                              params, inputs))
            with torch.no_grad():
                fixed = loss.corrected(logits, y_noisy, context).argmax(1) == y_true  # [n]
            if unlabelled:
                metrics["pseudo_label_accuracy"] = fixed.float().mean().item()
            else:
                metrics.update(corrected_label_accuracy(fixed, is_noisy))
        return metrics, weights

    def after_step(self, logger: Any, trainer: MetaTrainer) -> None:
        """At every epoch boundary the look-ahead frontier crossed: the epoch's metrics to the logger."""
        state = self.state()
        if state is None:
            return
        epoch = state["t"] // self.task.steps_per_epoch
        if epoch <= self.epochs_logged:
            return
        self.epochs_logged = epoch
        metrics, weights = self.epoch_metrics(state)
        logger.log(epoch, metrics, prefix="epoch/")
        writer = getattr(logger, "writer", None)
        if weights is not None and writer is not None and self.analysis[3].any() and (~self.analysis[3]).any():
            writer.add_histogram("weights/clean", weights[~self.analysis[3]], epoch)
            writer.add_histogram("weights/noisy", weights[self.analysis[3]], epoch)

    def finish(self) -> tuple[dict[str, Any], Tensor | None]:
        """The trained model (pending real steps taken with the final phi) and its final metrics."""
        metrics, weights = self.epoch_metrics(self.system.finish_state(self.state(), self.phi))
        if not self.task.data.unlabelled:
            metrics["noise_rate_realised"] = self.task.truth.noise_rate
        metrics.update({"train_rows": len(self.task.data.y_train), "meta_rows": len(self.task.data.y_meta),
                        "epochs": self.task.epochs, "training_steps": self.task.horizon})  # fmt: skip
        return metrics, weights


def corrected_label_accuracy(right: Tensor, is_noisy: Tensor) -> dict[str, float]:
    """How often the corrected label (its argmax) is the true one, on noisy and on clean rows."""
    out = {}
    for name, rows in (("corrected_label_accuracy_noisy", is_noisy), ("corrected_label_accuracy_clean", ~is_noisy)):
        out[name] = right[rows].float().mean().item() if rows.any() else float("nan")
    return out


def save_weight_histogram(weights: Tensor, is_noisy: Tensor, path: Path, title: str) -> Path:
    """Histograms of the final weights of clean and of noisy training rows, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = torch.linspace(float(weights.min()), float(weights.max()) + 1e-6, 41).tolist()
    ax.hist(weights[~is_noisy].tolist(), bins=bins, alpha=0.6, label=f"clean ({int((~is_noisy).sum())})")
    ax.hist(weights[is_noisy].tolist(), bins=bins, alpha=0.6, label=f"noisy ({int(is_noisy.sum())})")
    ax.set_xlabel("weight")
    ax.set_ylabel("training rows")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_transition_plot(learned: Tensor, realised: Tensor, path: Path, title: str) -> Path:
    """The learned transition matrix beside the realised one (rows: true class, columns: given label), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, matrix, name in ((axes[0], learned, "learned T"), (axes[1], realised, "realised T (hidden truth)")):
        image = ax.imshow(matrix.double().numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("given (noisy) label")
        ax.set_ylabel("true class")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

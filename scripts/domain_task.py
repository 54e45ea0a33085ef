"""meta_train.py's branch for a domain-generalisation task (`tasks.domain_shift.DomainTask`): the
meta-parameters (a learned initialisation, the model itself; or a learned loss) are trained on episodes
of the source domains through the one outer loop (checkpoints, exact resume), and every
`train.validate_every` steps the model (the initialisation as it is; or one trained with the learned
loss for `task.eval_steps` steps on the source domains) is scored on each source domain's validation
part and on the held-out test domain. Model selection as DomainBed defines it: the step with the best
mean accuracy on the source validation parts (training-domain validation) gives the reported test
accuracy; the test-domain oracle (the step with the best accuracy on a held-out fifth of the test
domain, scored on the rest) is reported apart, labelled as such. The history of these evaluations is
kept in `domain_validation.json` beside the checkpoint, so a resumed run selects among all of them.
With `task.adaptation.episodes` > 0 the final model is also adapted to the test domain, on few-shot
episodes (labelled rows) and test-time episodes (an unlabelled batch, entropy minimisation), and
scored before and after."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaloss.errors import ConfigError
from metaloss.functional import forward
from metaloss.inner.loop import run_inner_loop
from metaloss.inner.optim import sgd
from metaloss.losses import cross_entropy, entropy
from metaloss.problem import BilevelProblem
from metaloss.types import Episode
from tasks.domain_shift import DomainTask, TargetAdaptation

HISTORY = "domain_validation.json"


@torch.no_grad()
def accuracy(problem: BilevelProblem, params: dict[str, Tensor], x: Tensor, y: Tensor, batch: int = 2000) -> float:
    """The accuracy of the model with `params` on (x, y)."""
    like = next(iter(params.values()))
    x, y = x.to(like.device, like.dtype if x.is_floating_point() else x.dtype), y.to(like.device)
    right = sum(int((forward(problem.model, params, x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
                for i in range(0, len(y), batch))  # fmt: skip
    return right / max(len(y), 1)


def fine_tune(model: torch.nn.Module, params: dict[str, Tensor], names: list[str], x: Tensor, y: Tensor,
              loss: Callable[[Tensor, Tensor], Tensor], steps: int, lr: float) -> dict[str, Tensor]:  # fmt: skip
    """`steps` plain SGD steps of size `lr` on loss(model(x), y), on the parameters called `names` only:
    w <- w - lr grad_w loss. Returns new (detached) parameters; `params` is untouched."""
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    start = {n: params[n].detach() for n in names}
    with torch.enable_grad():  # the one inner loop, first order, nothing tracked
        result = run_inner_loop(start, lambda w, t: loss(forward(model, {**fixed, **w}, x), y), sgd(lr), steps,
                                second_order=False, differentiable_steps=0)  # fmt: skip
    return {**fixed, **{n: w.detach() for n, w in result.params.items()}}


NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)


def norm_parameter_names(model: torch.nn.Module) -> list[str]:
    """The affine parameters of the normalisation layers of `model` (what Tent adapts)."""
    return [f"{m}.{n}" if m else n for m, module in model.named_modules() if isinstance(module, NORMS)
            for n, _ in module.named_parameters(recurse=False)]  # fmt: skip


class DomainRun:
    """The evaluations and the model selection of one run."""

    def __init__(self, task: DomainTask, problem: BilevelProblem, run_dir: Path) -> None:
        w0, _ = problem.initial_params()
        phi = {id(p) for p in problem.meta_parameters()}
        self.learned_init = any(id(p) in phi for p in w0.values())
        if task.train.mode == "fish":  # one inner step per source domain, on its batch
            problem.inner_steps, problem.inner_batch_size = len(task.split.sources), task.train.batch_size
        tent = task.adaptation is not None and task.adaptation.test_time_parameters == "norm"
        if tent and not norm_parameter_names(problem.model):
            raise ConfigError(f"task.adaptation.test_time_parameters=norm but the model "
                              f"({type(problem.model).__name__}) has no normalisation layers; use all")  # fmt: skip
        self.task, self.problem, self.path = task, problem, run_dir / HISTORY
        self.history: list[dict[str, Any]] = []
        self.latest: tuple[int, dict[str, Tensor], dict[str, float]] | None = None

    def resume(self, resumed_from: int | None) -> None:
        """Take up the evaluations of the interrupted run, up to the step it resumes from."""
        if resumed_from is not None and self.path.is_file():
            self.history = [h for h in json.loads(self.path.read_text()) if h["step"] <= resumed_from]

    def model(self) -> dict[str, Tensor]:
        """The model to score: a learned initialisation as it is; otherwise (a learned loss, ...) the
        problem's initialisation trained for `task.eval_steps` minibatch steps of the inner loop on the
        source domains' training parts pooled (batches of `task.batch_size` rows per source domain, as
        many rows as an ERM step reads; reshuffled per epoch)."""
        w0, frozen = self.problem.initial_params()
        if self.learned_init:
            return {**frozen, **w0}
        train = self.task.split.train
        x, y = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
        sources = Episode(x, y, x[:1], y[:1])  # the query is not read
        like = next(iter(w0.values()))
        sources = sources.to(like.device, like.dtype)
        saved = (self.problem.inner_batch_size, self.problem.shuffle_seed)
        rows = self.task.train.batch_size * len(train)
        self.problem.inner_batch_size, self.problem.shuffle_seed = rows, self.task.train.seed
        try:
            with torch.enable_grad():
                params, _ = self.problem.adapt_to(sources, steps=self.task.eval_steps, second_order=False)
        finally:
            self.problem.inner_batch_size, self.problem.shuffle_seed = saved
        return {n: p.detach() for n, p in params.items()}

    def scores(self, params: dict[str, Tensor]) -> dict[str, float]:
        """Accuracy of the model `params` (from `model()`) on each source domain's validation part, their
        mean, the test domain (whole) and the oracle's two parts of it."""
        split, out = self.task.split, {}
        for name, (x, y) in zip(split.source_names, split.val):
            out[f"val_accuracy/{name}"] = accuracy(self.problem, params, x, y)
        out["val_accuracy"] = sum(out.values()) / len(split.val)
        out["test_accuracy"] = accuracy(self.problem, params, *split.test)
        out["oracle_select_accuracy"] = accuracy(self.problem, params, *split.test_select)
        out["oracle_eval_accuracy"] = accuracy(self.problem, params, *split.test_eval)
        return out

    def validate(self, step: int) -> dict[str, float]:
        """`scores()` at meta-step `step`, recorded (and written) for model selection."""
        params = self.model()
        scores = self.scores(params)
        self.history = [h for h in self.history if h["step"] < step + 1] + [{"step": step + 1, **scores}]
        self.latest = (step + 1, params, scores)  # final() after the last step reuses them
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.history, indent=1))
        tmp.replace(self.path)
        return scores

    def adaptation(self, params: dict[str, Tensor]) -> dict[str, float]:
        """Mean query accuracy over the adaptation episodes, before and after: few-shot (cross-entropy on
        the labelled support rows, every parameter) and test-time (entropy on the unlabelled batch, the
        parameters `test_time_parameters` names)."""
        spec: TargetAdaptation | None = self.task.adaptation
        if spec is None:
            return {}
        model = self.problem.model
        every = [n for n, _ in model.named_parameters() if n in params]
        norms = [n for n in norm_parameter_names(model) if n in params]
        test_time_names = every if spec.test_time_parameters == "all" else norms
        like = next(iter(params.values()))
        out = {}
        for kind, sampler, loss, names in (("few_shot", spec.few_shot, cross_entropy, every),
                                           ("test_time", spec.test_time, entropy, test_time_names)):  # fmt: skip
            before, after = [], []
            for index in range(spec.episodes):
                e = sampler.episode(index).to(like.device, like.dtype)
                before.append(accuracy(self.problem, params, e.query_x, e.query_y))
                adapted = fine_tune(model, params, names, e.support_x, e.support_y, loss, spec.steps, spec.lr)
                after.append(accuracy(self.problem, adapted, e.query_x, e.query_y))
            out[f"{kind}_accuracy_before"] = sum(before) / len(before)
            out[f"{kind}_accuracy"] = sum(after) / len(after)
        return out

    def final(self, last_step: int | None = None) -> dict[str, Any]:
        """The final model's scores (after meta-step `last_step`), the selected ones (training-domain
        validation) and the oracle's, and the final model's adaptation to the test domain (if asked for)."""
        if self.latest is not None and self.latest[0] == last_step:  # validated at the last step
            _, params, last = self.latest
        else:
            params = self.model()
            last = self.scores(params)
        history = self.history or [{"step": None, **last}]
        chosen = max(history, key=lambda h: h["val_accuracy"])
        oracle = max(history, key=lambda h: h["oracle_select_accuracy"])
        split = self.task.split
        return {"test_domain": split.data.domains[split.test_domain], "source_domains": split.source_names,
                "episodes": self.task.train.mode, "final_test_accuracy": last["test_accuracy"],
                "final_val_accuracy": last["val_accuracy"], "selected_step": chosen["step"],
                "val_accuracy": chosen["val_accuracy"], "test_accuracy": chosen["test_accuracy"],
                "oracle_step": oracle["step"], "oracle_test_accuracy": oracle["oracle_eval_accuracy"],
                **{k: v for k, v in chosen.items() if k.startswith("val_accuracy/")},
                "validations": len(self.history), **self.adaptation(params)}  # fmt: skip

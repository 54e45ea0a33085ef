"""Semi-supervised episodes for the online regime: a few labelled rows per class, the rest of the
training set unlabelled (Meta Pseudo Labels' setting, Pham et al. 2021).

The labelled rows are the task's meta set (what look-aheads are scored on, and what a supervised
baseline trains on, `train_on=meta`); the unlabelled rows are the training set, their labels replaced
by UNLABELLED (-1); the true labels are kept apart (`NoiseTruth`, every row marked as lacking its
label) for analysis metrics only.
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.classification import LabelledData
from tasks.noisy_label import NoiseTruth, NoisyLabelData, NoisyLabelTask, split_meta

UNLABELLED = -1


def semisup_task(data: LabelledData, labels_per_class: int = 10, seed: int = 0, **settings: Any) -> NoisyLabelTask:
    """`data` with `labels_per_class` labelled rows per class (drawn with `seed`) and the rest unlabelled,
    as a `NoisyLabelTask` (its other fields in `settings`)."""
    labelled, unlabelled = split_meta(data.y_train, data.n_classes, labels_per_class, seed)
    y_true = data.y_train[unlabelled]
    hidden = torch.full_like(y_true, UNLABELLED)
    seen = NoisyLabelData(f"{data.name}_semisup{labels_per_class}", data.x_train[unlabelled], hidden,
                          data.x_train[labelled], data.y_train[labelled], data.x_test, data.y_test,
                          data.n_classes)  # fmt: skip
    truth = NoiseTruth(y_true, torch.ones_like(y_true, dtype=torch.bool),
                       torch.zeros(data.n_classes, data.n_classes))  # fmt: skip
    settings.pop("n_way", None)
    return NoisyLabelTask(seen, truth, **settings)

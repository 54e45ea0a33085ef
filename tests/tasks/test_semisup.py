import torch

from tasks.classification import digits_data
from tasks.semisup import UNLABELLED, semisup_task


def test_labelled_rows_are_a_per_class_split_and_the_rest_carry_no_label():
    data = digits_data()
    task = semisup_task(data, labels_per_class=7, seed=3, batch_size=32)
    seen = task.data
    assert torch.equal(torch.bincount(seen.y_meta, minlength=10), torch.full((10,), 7))
    assert len(seen.y_meta) + len(seen.y_train) == len(data.y_train)
    assert seen.unlabelled and bool((seen.y_train == UNLABELLED).all())
    # disjoint: every training row appears exactly once, labelled or not
    rows = torch.cat([seen.x_meta, seen.x_train])
    assert torch.unique(rows, dim=0).shape[0] == torch.unique(data.x_train, dim=0).shape[0]
    # the true labels are kept apart, aligned with the unlabelled rows
    assert len(task.truth.y_true) == len(seen.y_train) and bool(task.truth.is_noisy.all())
    episode = task.episode()
    assert torch.equal(episode.query_y, seen.y_meta) and torch.equal(episode.support_y, seen.y_train)


def test_the_split_is_fixed_by_the_seed():
    data = digits_data()
    a, b, c = (semisup_task(data, labels_per_class=5, seed=s).data for s in (1, 1, 2))
    assert torch.equal(a.x_meta, b.x_meta) and not torch.equal(a.x_meta, c.x_meta)

"""FewShotSampler and split_classes over a small labelled tensor dataset whose inputs encode their label."""

from __future__ import annotations

import warnings

import pytest
import torch

from metaloss.errors import ConfigError
from tasks.base import TaskSampler
from tasks.few_shot import FewShotSampler, split_classes

N_CLASSES, PER_CLASS = 10, 6


def dataset(n_classes: int = N_CLASSES, per_class: int = PER_CLASS) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [N, 2, 3]: channel 0 filled with the class id, channel 1 with the row number (a unique id).
    Rows are interleaved across classes so that a sampler cannot rely on contiguous classes."""
    labels = torch.arange(n_classes).repeat(per_class)  # 0 1 2 .. 0 1 2 ..
    inputs = torch.empty(len(labels), 2, 3)
    inputs[:, 0] = labels[:, None].float()
    inputs[:, 1] = torch.arange(len(labels))[:, None].float()
    return inputs, labels


def sampler(classes=range(N_CLASSES), n_way=5, k_shot=2, q_query=3, seed=0, **data) -> FewShotSampler:
    inputs, labels = dataset(**data)
    return FewShotSampler(inputs, labels, classes, n_way, k_shot, q_query, seed=seed)


def test_is_a_task_sampler():
    assert isinstance(sampler(), TaskSampler)


def test_shapes_and_class_major_labels():
    e = sampler(n_way=4, k_shot=2, q_query=3).episode(0)
    assert e.support_x.shape == (4 * 2, 2, 3)
    assert e.query_x.shape == (4 * 3, 2, 3)
    assert e.support_y.dtype == e.query_y.dtype == torch.int64
    assert e.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert e.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert e.support_x.dtype == torch.float32  # floating inputs are kept as they are


def test_each_new_label_is_one_original_class_named_in_meta():
    s = sampler(n_way=5, k_shot=2, q_query=3)
    for i in range(30):
        e = s.episode(i)
        classes = e.meta["classes"]
        assert len(classes) == len(set(classes)) == 5
        for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
            original = x[:, 0, 0].long()
            assert (x[:, 0] == x[:, 0, :1]).all()  # untouched inputs
            assert original.tolist() == [classes[j] for j in y.tolist()]


def test_support_and_query_are_disjoint_and_without_repeats():
    s = sampler(n_way=5, k_shot=2, q_query=4)  # 6 of the 6 examples per class are used
    for i in range(30):
        e = s.episode(i)
        support = e.support_x[:, 1, 0].long().tolist()
        query = e.query_x[:, 1, 0].long().tolist()
        assert len(set(support)) == len(support)
        assert len(set(query)) == len(query)
        assert not set(support) & set(query)


def test_classes_come_from_the_split_and_vary_across_episodes():
    train, val, test = split_classes(range(N_CLASSES), (0.6, 0.2, 0.2), seed=1)
    s = sampler(classes=train, n_way=3, k_shot=1, q_query=1)
    seen, orders = set(), set()
    for i in range(40):
        e = s.episode(i)
        assert set(e.meta["classes"]) <= set(train)
        assert set(e.support_x[:, 0, 0].long().tolist()) <= set(train)
        seen |= set(e.meta["classes"])
        orders.add(tuple(e.meta["classes"]))
    assert seen == set(train)  # every class of the split gets used
    assert len(orders) > 10  # class choice and relabelling order are random


def test_deterministic_given_seed_and_index():
    a, b, c = sampler(seed=5), sampler(seed=5), sampler(seed=6)
    for i in (0, 1, 123):
        ea, eb = a.episode(i), b.episode(i)
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.support_y, eb.support_y)
        assert torch.equal(ea.query_x, eb.query_x) and torch.equal(ea.query_y, eb.query_y)
        assert ea.meta == eb.meta
    assert any(not torch.equal(a.episode(i).support_x, c.episode(i).support_x) for i in range(5))
    assert any(not torch.equal(a.episode(0).support_x, a.episode(i).support_x) for i in range(1, 5))


def test_uint8_inputs_are_scaled_to_unit_interval():
    labels = torch.arange(4).repeat_interleave(3)
    inputs = (labels * 80 + 15).to(torch.uint8)[:, None, None].expand(-1, 2, 2).contiguous()  # values 15..255
    e = FewShotSampler(inputs, labels, range(4), n_way=4, k_shot=1, q_query=2, seed=0).episode(0)
    for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
        assert x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        original = torch.tensor(e.meta["classes"])[y]
        torch.testing.assert_close(x[:, 0, 0], (original * 80 + 15).float() / 255.0)
    assert e.support_x.max() == 1.0  # 255 -> 1 (class 3 is always in a 4-way episode over 4 classes)


def test_zero_query_examples_is_allowed():
    e = sampler(n_way=2, k_shot=1, q_query=0).episode(0)
    assert e.query_x.shape == (0, 2, 3) and e.query_y.shape == (0,)


def test_within_group_episodes_warn_about_the_groups_they_never_draw():
    """Groups a (4 classes), b (3), c (2) at 3-way: c's classes are never drawn, and a warning says so
    (Omniglot's Tagalog, 17 characters, in 20-way within-alphabet episodes); at 2-way, no warning."""
    inputs, labels = dataset()
    groups = {0: "a", 1: "a", 2: "a", 3: "a", 4: "b", 5: "b", 6: "b", 7: "c", 8: "c"}
    with pytest.warns(UserWarning, match=r"3-way episodes of the train split never draw the 2 classes of its "
                                         r"1 group\(s\) with fewer than 3: c \(2\)"):  # fmt: skip
        within = FewShotSampler(inputs, labels, list(groups), 3, 1, 1, seed=0, groups=groups)
    drawn = {c for i in range(60) for c in within.episode(i).meta["classes"]}
    assert drawn == set(range(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FewShotSampler(inputs, labels, list(groups), 2, 1, 1, seed=0, groups=groups)


def test_n_way_larger_than_the_split_is_rejected():
    with pytest.raises(ConfigError, match="n_way=4.*3 classes"):
        sampler(classes=[0, 1, 2], n_way=4)


def test_class_with_too_few_examples_is_rejected():
    inputs, labels = dataset()
    keep = ~((labels == 7) & (torch.arange(len(labels)) >= 3 * N_CLASSES))  # class 7 keeps 3 of 6
    with pytest.raises(ConfigError, match="class 7 has 3"):
        FewShotSampler(inputs[keep], labels[keep], range(N_CLASSES), n_way=2, k_shot=2, q_query=2)
    FewShotSampler(inputs[keep], labels[keep], range(N_CLASSES), n_way=2, k_shot=2, q_query=1)  # 3 are enough


def test_class_without_examples_is_rejected():
    with pytest.raises(ConfigError, match="class 42 has 0"):
        sampler(classes=[0, 1, 42], n_way=2)


@pytest.mark.parametrize("kwargs", [{"n_way": 0}, {"k_shot": 0}, {"q_query": -1}], ids=["n_way", "k_shot", "q_query"])
def test_nonpositive_sizes_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        sampler(**{"n_way": 2, "k_shot": 1, "q_query": 1, **kwargs})


def test_inputs_and_labels_of_different_length_are_rejected():
    inputs, labels = dataset()
    with pytest.raises(ConfigError, match="labels"):
        FewShotSampler(inputs[:-1], labels, range(N_CLASSES), 2, 1, 1)


def test_split_classes_parts_are_disjoint_complete_and_sized():
    classes = list(range(100, 120))
    parts = split_classes(classes, (0.6, 0.2, 0.2), seed=0)
    assert [len(p) for p in parts] == [12, 4, 4]
    assert all(p == sorted(p) for p in parts)
    assert sorted(sum(parts, [])) == classes
    assert not set(parts[0]) & set(parts[1]) and not set(parts[0]) & set(parts[2]) and not set(parts[1]) & set(parts[2])


def test_split_classes_is_a_seeded_shuffle():
    classes = range(30)
    assert split_classes(classes, (0.5, 0.5), seed=3) == split_classes(list(classes)[::-1], (0.5, 0.5), seed=3)
    assert split_classes(classes, (0.5, 0.5), seed=3) != split_classes(classes, (0.5, 0.5), seed=4)
    assert split_classes(classes, (0.5, 0.5), seed=3)[0] != list(range(15))  # shuffled, not cut in order


def test_split_classes_ignores_duplicates():
    parts = split_classes([3, 1, 2, 3, 1, 4], (0.5, 0.5))
    assert sorted(sum(parts, [])) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "fractions",
    [(0.5, 0.4), (0.6, 0.6), (1.2, -0.2), (0.5, 0.5, 0.0), ()],
    ids=["sum<1", "sum>1", "negative", "zero", "empty"],
)
def test_split_classes_rejects_bad_fractions(fractions):
    with pytest.raises(ConfigError, match="fractions"):
        split_classes(range(10), fractions)


def test_split_classes_rejects_too_few_classes_for_the_parts():
    with pytest.raises(ConfigError, match="non-empty"):
        split_classes(range(2), (0.6, 0.2, 0.2))

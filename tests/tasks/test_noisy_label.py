import dataclasses

import pytest
import torch

from metaloss.errors import ConfigError
from tasks.classification import LabelledData
from tasks.noisy_label import (
    CIFAR10_PAIRS,
    NoisyLabelData,
    inject_noise,
    make_noisy,
    pair_map_of,
    split_meta,
    transition_matrix,
)

C, N = 10, 20_000


def balanced_labels(n: int = N, classes: int = C) -> torch.Tensor:
    return torch.arange(n) % classes


def close_to(realised: torch.Tensor, nominal: torch.Tensor, per_row: int) -> None:
    """Every cell within 5 binomial standard deviations of the nominal probability."""
    sd = (nominal * (1 - nominal) / per_row).sqrt()
    assert ((realised - nominal).abs() <= 5 * sd + 1e-9).all(), (realised - nominal).abs().max()


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.8])
def test_symmetric_noise_flips_at_the_nominal_rate_to_a_different_class_uniformly(rate):
    y = balanced_labels()
    noisy = inject_noise(y, C, "symmetric", rate, seed=3)
    flip_rate = (noisy != y).float().mean().item()
    assert abs(flip_rate - rate) < 5 * (rate * (1 - rate) / N) ** 0.5
    nominal = torch.full((C, C), rate / (C - 1), dtype=torch.float64)
    nominal.fill_diagonal_(1 - rate)
    close_to(transition_matrix(y, noisy, C), nominal, N // C)


def test_uniform_noise_redraws_from_all_classes_so_it_flips_less_than_its_rate():
    rate, y = 0.6, balanced_labels()
    noisy = inject_noise(y, C, "uniform", rate, seed=1)
    expected = rate * (C - 1) / C
    assert abs((noisy != y).float().mean().item() - expected) < 5 * (expected * (1 - expected) / N) ** 0.5
    nominal = torch.full((C, C), rate / C, dtype=torch.float64)
    nominal.fill_diagonal_(1 - rate + rate / C)
    close_to(transition_matrix(y, noisy, C), nominal, N // C)


@pytest.mark.parametrize("pair_map", ["next", "cifar10"])
def test_pair_noise_sends_a_class_to_its_pair_only(pair_map):
    rate, y = 0.4, balanced_labels()
    noisy = inject_noise(y, C, "pair", rate, seed=2, pair_map=pair_map)
    mapping = pair_map_of(pair_map, C)
    nominal = torch.eye(C, dtype=torch.float64)
    for c, target in mapping.items():
        nominal[c, c], nominal[c, target] = 1 - rate, rate
    close_to(transition_matrix(y, noisy, C), nominal, N // C)
    if pair_map == "cifar10":  # airplane, automobile, frog, horse keep their labels
        for c in (0, 1, 6, 7):
            assert torch.equal(noisy[y == c], y[y == c])
        assert CIFAR10_PAIRS[3] == 5 and CIFAR10_PAIRS[5] == 3  # cat <-> dog


def test_an_explicit_pair_map_is_applied():
    y = balanced_labels(4000, 4)
    noisy = inject_noise(y, 4, "pair", 0.5, seed=0, pair_map={0: 3})
    assert set(noisy[y == 0].tolist()) == {0, 3}
    assert torch.equal(noisy[y != 0], y[y != 0])


def test_instance_noise_has_the_nominal_mean_rate_and_its_targets_depend_on_the_input():
    rate, d, copies = 0.4, 50, 4000
    # two inputs of class 0 (orthogonal one-hot vectors), each repeated: the flip targets of an input
    # follow softmax(x W_0) over the other classes, so two inputs differ and two halves of one agree
    x = torch.zeros(2 * copies, d)
    x[:copies, 0], x[copies:, 1] = 1.0, 1.0
    y = torch.zeros(2 * copies, dtype=torch.long)
    noisy = inject_noise(y, C, "instance", rate, seed=5, x=x)
    assert abs((noisy != y).float().mean().item() - rate) < 0.03

    def histogram(labels: torch.Tensor) -> torch.Tensor:
        flipped = labels[labels != 0]
        return torch.bincount(flipped, minlength=C).double() / len(flipped)

    a, b = noisy[:copies], noisy[copies:]
    between = (histogram(a) - histogram(b)).abs().sum() / 2
    within = (histogram(a[: copies // 2]) - histogram(a[copies // 2 :])).abs().sum() / 2
    assert between > 0.1 and within < 0.06 and between > 3 * within, (between, within)


def test_instance_noise_needs_inputs():
    with pytest.raises(ConfigError, match="inputs"):
        inject_noise(balanced_labels(), C, "instance", 0.4, seed=0)


@pytest.mark.parametrize("kind", ["symmetric", "uniform", "pair", "instance"])
def test_noise_is_a_pure_function_of_the_seed(kind):
    y, x = balanced_labels(2000), torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    first = inject_noise(y, C, kind, 0.4, seed=7, x=x)
    assert torch.equal(first, inject_noise(y, C, kind, 0.4, seed=7, x=x))
    assert not torch.equal(first, inject_noise(y, C, kind, 0.4, seed=8, x=x))


def test_rate_zero_and_type_none_keep_every_label():
    y = balanced_labels(500)
    assert torch.equal(inject_noise(y, C, "symmetric", 0.0, seed=0), y)
    assert torch.equal(inject_noise(y, C, "none", 0.5, seed=0), y)


def test_the_transition_matrix_is_counted():
    y_true = torch.tensor([0, 0, 0, 0, 1, 1])
    y_noisy = torch.tensor([0, 1, 1, 2, 1, 1])
    expected = torch.tensor([[0.25, 0.5, 0.25], [0, 1, 0], [0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(transition_matrix(y_true, y_noisy, 3), expected)


def dataset(n_train: int = 3000, seed: int = 0) -> LabelledData:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(C, (n_train,), generator=g)
    return LabelledData("toy", torch.randn(n_train, 6, generator=g), y, torch.randn(100, 6, generator=g),
                        torch.randint(C, (100,), generator=g), C)  # fmt: skip


def test_the_clean_meta_set_is_split_off_before_the_noise_and_is_disjoint_from_training():
    data = dataset()
    seen, truth = make_noisy(data, "symmetric", 0.6, meta_per_class=7, seed=4)
    meta_rows, train_rows = split_meta(data.y_train, C, 7, seed=4)
    assert len(set(meta_rows.tolist()) & set(train_rows.tolist())) == 0
    assert len(meta_rows) + len(train_rows) == len(data.y_train)
    assert torch.equal(seen.x_meta, data.x_train[meta_rows]) and torch.equal(seen.x_train, data.x_train[train_rows])
    assert torch.equal(seen.y_meta, data.y_train[meta_rows])  # clean labels
    assert torch.equal(torch.bincount(seen.y_meta, minlength=C), torch.full((C,), 7))
    assert torch.equal(truth.y_true, data.y_train[train_rows])
    assert torch.equal(truth.is_noisy, seen.y_train != truth.y_true)
    assert abs(truth.noise_rate - 0.6) < 0.05
    assert torch.allclose(truth.transition, transition_matrix(truth.y_true, seen.y_train, C))


def test_what_a_method_sees_holds_no_truth():
    names = {f.name for f in dataclasses.fields(NoisyLabelData)}
    assert names == {"name", "x_train", "y_train", "x_meta", "y_meta", "x_test", "y_test", "n_classes"}
    seen, truth = make_noisy(dataset(), "symmetric", 0.4, meta_per_class=3, seed=0)
    assert not any(v is truth.is_noisy or v is truth.y_true for v in vars(seen).values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "gaussian"}, "unknown noise type 'gaussian'"),
        ({"rate": 1.0}, r"noise rate must be in \[0, 1\)"),
        ({"rate": -0.1}, r"noise rate must be in \[0, 1\)"),
        ({"meta_per_class": 10_000}, "takes all of class"),
        ({"kind": "pair", "pair_map": {0: 12}}, "names classes"),
        ({"kind": "pair", "pair_map": "cifar100"}, "pair_map must be"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_noisy(dataset(), **{"kind": "symmetric", "rate": 0.4, "meta_per_class": 5, **kwargs})


def test_the_cifar10_map_needs_ten_classes():
    with pytest.raises(ConfigError, match="10 classes"):
        pair_map_of("cifar10", 5)

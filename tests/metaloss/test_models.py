"""Backbones: output shapes and the parameter counts of the published architectures."""

from __future__ import annotations

import pytest
import torch

from metaloss.errors import ConfigError
from metaloss.models import MLP, CifarResNet, Conv4, PerStepBatchNorm2d, ResNet12, ShapedSine


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_maml_sinusoid_mlp() -> None:
    model = MLP(1, (40, 40), 1)
    assert model(torch.zeros(7, 1)).shape == (7, 1)
    assert n_params(model) == (1 * 40 + 40) + (40 * 40 + 40) + (40 + 1)


def test_maml_omniglot_conv4_has_64_features_after_the_mean() -> None:
    model = Conv4(20, in_channels=1, filters=64, image_size=28, pool="stride", global_pool=True)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 20)
    convs = (1 * 9 * 64 + 64) + 3 * (64 * 9 * 64 + 64)
    assert n_params(model) == convs + 4 * 2 * 64 + (64 * 20 + 20)


def test_maml_miniimagenet_conv4_flattens_5x5x32() -> None:
    model = Conv4(5, in_channels=3, filters=32, image_size=84, pool="max")
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert model.head.in_features == 32 * 5 * 5


def test_max_pool_conv4_pools_before_the_relu_with_the_same_function_and_meta_gradient() -> None:
    """conv -> BN -> ReLU -> max-pool (MAML's block) equals conv -> BN -> max-pool -> ReLU, which the
    model runs (cheaper), in the output and in a second-order MAML meta-gradient."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Conv4(5, in_channels=1, filters=4, image_size=28, pool="max").double()
    params = dict(model.named_parameters())

    def textbook(p: dict, x: torch.Tensor) -> torch.Tensor:  # relu before the pool, as in MAML's code
        for i in range(4):
            x = F.conv2d(x, p[f"features.{4 * i}.weight"], p[f"features.{4 * i}.bias"], padding=1)
            x = F.batch_norm(x, None, None, p[f"features.{4 * i + 1}.weight"], p[f"features.{4 * i + 1}.bias"], True)
            x = F.max_pool2d(F.relu(x), 2)
        return F.linear(x.flatten(1), p["head.weight"], p["head.bias"])

    def meta_gradient(fwd) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        xs, xq = torch.randn(5, 1, 28, 28, generator=g).double(), torch.randn(10, 1, 28, 28, generator=g).double()
        inner = torch.autograd.grad(F.cross_entropy(fwd(params, xs), torch.arange(5)), list(params.values()),
                                    create_graph=True)  # fmt: skip
        fast = {n: w - 0.4 * gw for (n, w), gw in zip(params.items(), inner)}
        return torch.autograd.grad(F.cross_entropy(fwd(fast, xq), torch.arange(5).repeat(2)), list(params.values()))

    x = torch.randn(6, 1, 28, 28).double()
    torch.testing.assert_close(torch.func.functional_call(model, params, (x,)), textbook(params, x), rtol=0, atol=0)
    ours = meta_gradient(lambda p, x: torch.func.functional_call(model, p, (x,)))
    for a, b in zip(ours, meta_gradient(textbook)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert isinstance(model.features[2], torch.nn.MaxPool2d) and isinstance(model.features[3], torch.nn.ReLU)


def test_group_norm_conv4_predicts_each_sample_alone() -> None:
    torch.manual_seed(0)
    model = Conv4(10, in_channels=1, filters=16, image_size=28, pool="stride", global_pool=True, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(model(x)[:2], model(x[:2]))  # no statistics of the batch reach a prediction


def test_per_step_batchnorm_conv4_uses_the_pair_of_the_step_and_the_last_after_adaptation() -> None:
    """MAML++'s per-step BatchNorm: step k normalises like BatchNorm on the batch, with the k-th affine
    pair; None (the query) and steps past the last use the last pair."""
    torch.manual_seed(0)
    plain = Conv4(5, in_channels=1, filters=4, image_size=28, pool="max")
    per_step = Conv4(5, in_channels=1, filters=4, image_size=28, pool="max", norm="batch_per_step", norm_steps=3)
    assert per_step.takes_step and not plain.takes_step
    own = per_step.state_dict()
    per_step.load_state_dict({n: p for n, p in plain.state_dict().items() if n in own and p.shape == own[n].shape},
                             strict=False)  # the convolutions and the head  # fmt: skip
    with torch.no_grad():
        for m in per_step.modules():
            if isinstance(m, PerStepBatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias))
    x = torch.randn(6, 1, 28, 28)
    outputs = [per_step(x, step) for step in range(3)]
    for step in range(3):
        params = {n: p for n, p in per_step.named_parameters()}
        for name, m in per_step.named_modules():
            if isinstance(m, PerStepBatchNorm2d):
                params[f"{name}.weight"], params[f"{name}.bias"] = m.weight[step], m.bias[step]
        torch.testing.assert_close(outputs[step], torch.func.functional_call(plain, params, (x,)))
    assert not torch.allclose(outputs[0], outputs[1])
    torch.testing.assert_close(per_step(x), outputs[2], rtol=0, atol=0)  # after adaptation: the last pair
    torch.testing.assert_close(per_step(x, 7), outputs[2], rtol=0, atol=0)  # evaluation beyond training
    assert sum(p.numel() for p in per_step.parameters()) == n_params(plain) + 4 * 2 * 2 * 4


def test_resnet32_for_cifar_shape_and_size() -> None:
    model = CifarResNet(n_classes=10)
    assert n_params(model) == 464_154  # He et al. 2016's ResNet-32: 0.46M
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 32  # 31 convolutions and the head


def test_resnet12_shape_and_size() -> None:
    model = ResNet12(5, in_channels=3, widths=(8, 16, 32, 64))
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert 12.3e6 < n_params(ResNet12(5)) < 12.5e6  # the usual "12.4M" ResNet-12


@pytest.mark.parametrize(
    "make",
    [lambda: MLP(0), lambda: Conv4(pool="avg"), lambda: Conv4(image_size=0),
     lambda: Conv4(norm="layer"), lambda: Conv4(filters=12, norm="group"),
     lambda: Conv4(norm="batch_per_step", norm_steps=0), lambda: ResNet12(widths=(1, 2))],
)
def test_invalid_shapes_are_rejected(make) -> None:
    with pytest.raises(ConfigError):
        make()


def test_shaped_sine_is_sin_of_one_frequency() -> None:
    model = ShapedSine()
    assert [(name, p.shape) for name, p in model.named_parameters()] == [("frequency", (1,))]
    assert model.frequency.item() == pytest.approx(0.1)
    x = torch.linspace(-5, 5, 11).unsqueeze(-1)  # [11, 1]
    torch.testing.assert_close(model(x), torch.sin(0.1 * x))
    model = ShapedSine(frequency_init=-2.5)
    out = model(x)
    assert out.shape == (11, 1)
    torch.testing.assert_close(out, torch.sin(-2.5 * x))
    out.sum().backward()  # d/dtheta sum sin(theta x) = sum x cos(theta x)
    torch.testing.assert_close(model.frequency.grad, (x * torch.cos(-2.5 * x)).sum().reshape(1))

import math

import pytest
import torch

from metaloss.errors import ConfigError
from tasks.augment import RandomAffine


def test_no_transform_is_the_identity_and_a_rotation_turns_a_point_about_the_centre():
    images = torch.rand(3, 1, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(RandomAffine(0, 0, 0, 0)(images, torch.Generator().manual_seed(0)), images)
    blob = torch.zeros(1, 1, 33, 33, dtype=torch.float64)
    blob[0, 0, 6:9, 15:18] = 1.0  # a 3x3 blob 9 pixels above the centre (16, 16)
    turned = RandomAffine(60, 0, 0, 0)(blob, torch.Generator().manual_seed(0))
    drawn = float(torch.rand(1, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[0, 0] * 2 - 1) * 60
    rows, cols = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
    mass = turned[0, 0]
    y, x = float((mass * rows).sum() / mass.sum()) - 16, float((mass * cols).sum() / mass.sum()) - 16
    assert math.hypot(x, y) == pytest.approx(9, abs=0.3)  # the distance to the centre is kept
    turned_by = math.degrees(math.atan2(x, -y))  # from straight up
    assert abs(abs(turned_by) - abs(drawn)) < 2 and abs(drawn) > 5


def test_seeded_by_the_generator_and_in_range():
    images = torch.rand(4, 1, 12, 12)
    a = RandomAffine()(images, torch.Generator().manual_seed(5))
    b = RandomAffine()(images, torch.Generator().manual_seed(5))
    c = RandomAffine()(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == images.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1 + 1e-6
    with pytest.raises(ConfigError):
        RandomAffine(scale=1.0)

import pytest
import torch

from metaloss.errors import ConfigError
from tasks.domain_shift import DomainData, leave_one_domain_out, rotate_images, rotated_domains


def test_rotation_by_ninety_degrees_is_rot90_and_zero_is_the_identity():
    images = torch.rand(5, 9, 9)
    assert torch.allclose(rotate_images(images, 90), torch.rot90(images, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(rotate_images(images, -90), torch.rot90(images, -1, (-2, -1)), atol=1e-5)
    assert torch.equal(rotate_images(images, 0), images) and torch.equal(rotate_images(images, 360), images)
    channels = torch.rand(2, 3, 8, 8)
    assert torch.allclose(rotate_images(channels, 90), torch.rot90(channels, 1, (-2, -1)), atol=1e-5)


def test_rotation_is_counter_clockwise_with_zero_fill():
    image = torch.zeros(1, 11, 11)
    image[0, 5, 8] = 1.0  # right of the centre
    turned = rotate_images(image, 90)[0]
    assert turned[2, 5] == pytest.approx(1.0, abs=1e-5)  # now above the centre
    corner = rotate_images(torch.ones(1, 11, 11), 45)[0]
    assert corner[0, 0] == 0 and corner[5, 5] == pytest.approx(1.0)  # the corners come from outside: zero
    assert torch.allclose(rotate_images(rotate_images(image, 30), -30)[0, 5, 5], image[0, 5, 5], atol=1e-6)


def test_rotated_domains_deal_every_row_once_round_robin_and_rotate_each_domain():
    images, labels = torch.rand(60, 8, 8), torch.arange(60) % 10
    data = rotated_domains("toy", images, labels, 10, angles=(0, 15, 30), seed=4)
    assert data.domains == ["0", "15", "30"] and [len(y) for y in data.y] == [20, 20, 20]
    assert sorted(torch.cat(data.y).tolist()) == sorted(labels.tolist())
    unrotated = {tuple(row.flatten().tolist()) for row in images}
    assert all(tuple(row.flatten().tolist()) in unrotated for row in data.x[0])  # the 0-degree domain: as read
    again = rotated_domains("toy", images, labels, 10, angles=(0, 15, 30), seed=4)
    other = rotated_domains("toy", images, labels, 10, angles=(0, 15, 30), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(data.x, again.x))
    assert not torch.equal(data.y[0], other.y[0])


def toy_domains(sizes=(30, 25, 40)) -> DomainData:
    xs = [torch.full((n, 2), float(d)) + torch.arange(n)[:, None] / 1000 for d, n in enumerate(sizes)]
    ys = [torch.arange(n) % 3 for n in sizes]
    return DomainData("toy", [f"d{d}" for d in range(len(sizes))], xs, ys, 3)


@pytest.mark.parametrize("test_domain", ["d0", "d1", "d2"])
def test_no_row_of_the_held_out_domain_reaches_training_or_validation(test_domain):
    data = toy_domains()
    split = leave_one_domain_out(data, test_domain, holdout_fraction=0.2, seed=1)
    held = data.index(test_domain)
    assert split.test_domain == held and held not in split.sources and len(split.sources) == 2
    seen = torch.cat([x for x, _ in split.train] + [x for x, _ in split.val])
    assert not (seen[:, 0] == float(held)).any()  # every row carries its domain in its first feature
    for d, (train, val) in zip(split.sources, zip(split.train, split.val)):
        rows = torch.cat([train[0], val[0]])
        assert len(rows) == len(data.y[d]) and len(torch.unique(rows, dim=0)) == len(rows)  # disjoint, complete
        assert len(val[0]) == round(0.2 * len(data.y[d]))
    assert torch.equal(split.test[0], data.x[held])
    assert len(split.test_select[0]) + len(split.test_eval[0]) == len(data.y[held])


def test_splits_are_deterministic_for_a_seed():
    a, b, c = (leave_one_domain_out(toy_domains(), "d1", seed=s) for s in (3, 3, 4))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a.val, b.val))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a.val, c.val))


def test_bad_input_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown test domain '90'.*0, 15"):
        leave_one_domain_out(rotated_domains("r", torch.rand(12, 4, 4), torch.zeros(12).long(), 2, (0, 15)), 90)
    with pytest.raises(ConfigError, match=r"domain\(s\) \['d1'\] have no samples"):
        DomainData("toy", ["d0", "d1"], [torch.zeros(3, 2), torch.zeros(0, 2)], [torch.zeros(3), torch.zeros(0)], 2)
    with pytest.raises(ConfigError, match="too few samples"):
        leave_one_domain_out(toy_domains((30, 1, 40)), "d0")
    with pytest.raises(ConfigError, match="holdout_fraction"):
        leave_one_domain_out(toy_domains(), "d0", holdout_fraction=1.0)


@pytest.mark.parametrize("mode", ["erm", "mldg", "fish"])
def test_episodes_draw_only_source_training_rows_and_repeat_for_a_seed(mode):
    from tasks.domain_shift import DomainEpisodes

    data = toy_domains((30, 25, 40, 35))
    split = leave_one_domain_out(data, "d2", seed=1)
    sampler = DomainEpisodes(split, batch_size=6, mode=mode, meta_test_domains=1, seed=3)
    allowed = {tuple(r.tolist()) for x, _ in split.train for r in x}
    for i in range(5):
        e = sampler.episode(i)
        rows = torch.cat([e.support_x, e.query_x])
        assert all(tuple(r.tolist()) in allowed for r in rows)  # no test-domain and no validation row
        again = sampler.episode(i)
        assert torch.equal(e.support_x, again.support_x) and torch.equal(e.query_y, again.query_y)
        if mode == "mldg":
            assert len(e.meta["meta_test"]) == 1 and len(e.meta["meta_train"]) == 2
            assert set(e.meta["meta_test"]) | set(e.meta["meta_train"]) == {"d0", "d1", "d3"}
            domains_of_query = {int(v) for v in e.query_x[:, 0].floor().tolist()}
            assert domains_of_query == {int(e.meta["meta_test"][0][1:])}
        if mode == "fish":
            order = e.meta["domain_order"]
            assert sorted(order) == ["d0", "d1", "d3"]
            for k, name in enumerate(order):  # inner step k (batch 6) reads domain order[k]
                assert (e.support_x[6 * k : 6 * (k + 1), 0].floor() == int(name[1:])).all()
    assert not torch.equal(sampler.episode(0).support_x, sampler.episode(1).support_x)
    with pytest.raises(ConfigError, match="meta_test_domains"):
        DomainEpisodes(split, mode="mldg", meta_test_domains=3)
    with pytest.raises(ConfigError, match="unknown domain episode mode"):
        DomainEpisodes(split, mode="coral")


def test_target_few_shot_episodes_adapt_on_the_oracle_part_and_query_the_rest():
    from tasks.domain_shift import TargetFewShotEpisodes

    data = toy_domains((60, 60, 90))
    split = leave_one_domain_out(data, "d2", seed=1)
    sampler = TargetFewShotEpisodes(split, n_way=3, k_shot=2, q_query=4, seed=5)
    select = {tuple(r.tolist()) for r in split.test_select[0]}
    evaluate = {tuple(r.tolist()) for r in split.test_eval[0]}
    e = sampler.episode(0)
    assert e.support_y.tolist() == [0, 0, 1, 1, 2, 2] and len(e.query_y) == 12
    assert all(tuple(r.tolist()) in select for r in e.support_x)
    assert all(tuple(r.tolist()) in evaluate for r in e.query_x)
    assert torch.equal(e.query_x, sampler.episode(0).query_x)
    with pytest.raises(ConfigError, match="few-shot target episodes"):
        TargetFewShotEpisodes(split, n_way=4)


def test_target_adaptation_keeps_the_class_indices_of_the_trained_head():
    from tasks.domain_shift import target_adaptation

    data = toy_domains((60, 60, 90))
    split = leave_one_domain_out(data, "d2", seed=1)
    assert target_adaptation(split, episodes=0) is None
    adapt = target_adaptation(split, episodes=2, k_shot=2, q_query=3, test_time_batch=5, seed=4)
    e = adapt.few_shot.episode(1)
    assert sorted(e.support_y.tolist()) == [0, 0, 1, 1, 2, 2]  # every class, under its own index
    assert e.support_y.tolist() == [c for c in e.meta["classes"] for _ in range(2)]
    for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):  # a row's index in d2 gives its class
        assert torch.equal(((x[:, 0] - 2) * 1000).round().long() % 3, y)
    assert len(adapt.test_time.episode(0).query_y) == 5
    for bad, match in (({"steps": -1}, "episodes, steps and lr"), ({"test_time_parameters": "head"}, "one of")):
        with pytest.raises(ConfigError, match=match):
            target_adaptation(split, episodes=1, **bad)


def test_a_model_width_unlike_the_classes_is_refused():
    from tasks.domain_shift import domain_task

    with pytest.raises(ConfigError, match="has 3 classes but task.n_way"):
        domain_task(toy_domains(), "d1", n_way=10, flatten=False)


def test_test_time_episodes_hide_the_labels_of_the_adaptation_batch():
    from tasks.domain_shift import UNLABELLED, TestTimeEpisodes

    split = leave_one_domain_out(toy_domains(), "d1", seed=1)
    e = TestTimeEpisodes(split, batch_size=8, seed=2).episode(3)
    assert (e.support_y == UNLABELLED).all() and torch.equal(e.support_x, e.query_x)
    assert (e.query_x[:, 0].floor() == 1).all() and (e.query_y >= 0).all()

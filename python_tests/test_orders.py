import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sarkernels import orders


@given(n=st.integers(1, 300), data=st.data())
def test_sizes_are_positive_and_sum_to_n(n, data):
    schedule = data.draw(st.sampled_from(orders.SCHEDULES))
    steps = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    sizes = orders.set_sizes(schedule, n, steps, gen)
    assert sum(sizes) == n and min(sizes) >= 1
    if schedule in ("constant", "random", "cosine") or (schedule == "randar" and steps > 1):
        assert len(sizes) == steps
    if schedule == "ar":
        assert sizes == [1] * n
    if schedule == "constant":
        assert max(sizes) - min(sizes) <= 1


def official_randar_sizes(n, steps):
    """The official sampler's loop: after each step it computes the NEXT step's query count
    from the step counter, the first query index and the current count."""
    sizes, first, count, step = [], 0, 1, 0
    while first < n:
        sizes.append(count)
        step += 1
        target = min(int((1.0 - math.cos(math.pi / 2.0 * (step + 1) / steps)) * n + 1), n)
        first, count = first + count, min(max(target - first - count, 1), n - first - count)
    return sizes


@pytest.mark.parametrize("n,steps,want", [
    (16, 4, [1, 4, 5, 6]), (16, 6, [1, 2, 2, 3, 4, 4]),
    (64, 16, [1, 1, 1, 2, 3, 3, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6])])
def test_randar_schedule_matches_reference_examples(n, steps, want):
    assert orders.set_sizes("randar", n, steps) == want


@given(n=st.integers(1, 1024), data=st.data())
def test_randar_schedule_equals_official_sampler(n, data):
    steps = data.draw(st.integers(1, n))
    assert orders.set_sizes("randar", n, steps) == official_randar_sizes(n, steps)


def test_randar_schedule_step_counts():
    sizes = orders.set_sizes("randar", 256, 88)
    assert len(sizes) == 88 and sizes[:24] == [1] * 24 and sizes[24] > 1
    assert max(sizes[-10:]) in (4, 5)
    assert orders.set_sizes("randar", 256, 256) == [1] * 256


def test_random_sizes_cover_all_splits():
    gen = torch.Generator().manual_seed(0)
    seen = {tuple(orders.set_sizes("random", 5, 3, gen)) for _ in range(300)}
    assert seen == {(1, 1, 3), (1, 3, 1), (3, 1, 1), (1, 2, 2), (2, 1, 2), (2, 2, 1)}


def test_explicit_and_bad_schedules():
    assert orders.set_sizes([2, 3, 1], 6) == [2, 3, 1]
    with pytest.raises(ValueError, match="sum to 6"):
        orders.set_sizes([2, 3], 6)
    with pytest.raises(ValueError, match="steps must be in"):
        orders.set_sizes("constant", 6, 0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        orders.set_sizes("zigzag", 6, 2)


def test_orders():
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(orders.make_order("raster", 2, 4), torch.arange(4).expand(2, 4))
    r = orders.make_order("random", 3, 10, gen)
    assert torch.equal(r.sort(-1).values, torch.arange(10).expand(3, 10))
    assert not torch.equal(r[0], r[1])
    with pytest.raises(ValueError, match="permutation"):
        orders.make_order(torch.tensor([0, 0, 1]), 1, 3)


def test_rar_ratio():
    assert [orders.rar_ratio(s, 100, 200) for s in (0, 99, 100, 150, 199, 200, 500)] == pytest.approx(
        [1.0, 1.0, 1.0, 0.5, 0.01, 0.0, 0.0])

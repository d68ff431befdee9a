"""Placement policies: Megatron-style even spreading and periodic units."""
from collections import Counter

import pytest

from composer.recipe.placement import place_even, place_period, repeat_to


def s(xs):
    return "".join(xs)


def test_even_12_layers_3_to_1_matches_megatron_example():
    assert s(place_even(["M", "*"], [3, 1], 12)) == "MM*MMM*MM*MM"


def test_period_12_layers_3_to_1():
    assert s(place_period(["M", "*"], [3, 1], 12)) == "MMM*MMM*MMM*"


def test_period_offset_is_index_of_first_minority_jamba():
    out = place_period(["M", "*"], [7, 1], 32, offset=4)
    assert [i for i, c in enumerate(out) if c == "*"] == [4, 12, 20, 28]


@pytest.mark.parametrize("depth", range(1, 41))
@pytest.mark.parametrize("parts", [(3, 1), (1, 1), (7, 1), (5, 1), (1, 3), (2, 1, 1), (4, 2, 1)])
def test_even_counts_are_rounded_half_to_even(depth, parts):
    names = [chr(ord("a") + i) for i in range(len(parts))]
    out = place_even(names, list(parts), depth)
    assert len(out) == depth
    c = Counter(out)
    major = max(range(len(parts)), key=lambda i: (parts[i], -i))
    for i, n in enumerate(names):
        if i != major:
            assert c[n] == round(depth * parts[i] / sum(parts))


@pytest.mark.parametrize("depth,count", [(12, 3), (8, 1), (16, 3), (24, 4), (10, 1), (7, 2)])
def test_even_two_types_have_equal_end_runs_and_balanced_gaps(depth, count):
    ratio = [depth - count, count]
    out = place_even(["M", "*"], ratio, depth)
    pos = [i for i, c in enumerate(out) if c == "*"]
    runs = [pos[0]] + [b - a - 1 for a, b in zip(pos, pos[1:])] + [depth - 1 - pos[-1]]
    assert max(runs) - min(runs) <= 1          # runs as equal as the integers allow
    assert abs(runs[0] - runs[-1]) <= 1         # both ends alike


def test_exactly_half_way_goes_to_the_majority_type():
    # 4 layers at 3:1: runs of 1.5; at index 1 the budget is exactly 0.5 -> stays M
    assert s(place_even(["M", "*"], [3, 1], 4)) == "MM*M"


def test_repeat_to():
    assert s(repeat_to(list("M-*"), 7)) == "M-*M-*M"

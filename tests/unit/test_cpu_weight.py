"""The sessions running a turn weigh together about one nice-0 group, whatever their number
(workers/cpu_weight.py): the nice for a count, and the order in which groups are changed."""

from __future__ import annotations

import pytest

from workers.cpu_weight import MAX_NICE, WEIGHTS, GroupNices, busy_nice


@pytest.mark.parametrize(("busy", "nice"), [(1, 0), (2, 4), (4, 7), (8, 10), (16, 13), (32, 16), (64, 19)])
def test_the_nice_for_a_count_of_busy_sessions(busy: int, nice: int) -> None:
    assert busy_nice(busy, 1.0, MAX_NICE) == nice


def test_the_nice_is_the_lowest_that_keeps_within_the_share() -> None:
    for share in (0.5, 1.0, 2.0, 4.0):
        for busy in range(1, 300):
            nice = busy_nice(busy, share, MAX_NICE)
            if nice < MAX_NICE:
                assert busy * WEIGHTS[nice] <= share * WEIGHTS[0]
            if nice > 0:
                assert busy * WEIGHTS[nice - 1] > share * WEIGHTS[0]


def test_the_ceiling_caps_the_nice_and_share_zero_fixes_it() -> None:
    assert busy_nice(64, 1.0, 12) == 12
    assert busy_nice(1, 0.0, 19) == 19
    assert busy_nice(1, 0.0, 7) == 7
    with pytest.raises(ValueError, match="ceiling"):
        busy_nice(1, 1.0, 20)


def test_a_new_group_goes_to_the_ceiling_until_it_runs_a_turn() -> None:
    nices: GroupNices[str] = GroupNices(1.0, 19)
    nices.add("a")
    assert nices.plan() == [("a", 19)]
    nices.applied("a", 19)
    assert nices.plan() == []
    nices.set_busy("a", True)
    assert nices.plan() == [("a", 0)]
    nices.applied("a", 0)
    nices.set_busy("a", False)
    assert nices.plan() == [("a", 19)]


def test_weight_is_taken_away_before_any_is_given() -> None:
    nices: GroupNices[str] = GroupNices(1.0, 19)
    for key in ("a", "b", "c"):
        nices.add(key, 19)
    nices.set_busy("a", True)
    nices.applied("a", 0)
    nices.set_busy("b", True)  # two busy: both at 4, "a" first (it must give weight up)
    assert nices.plan() == [("a", 4), ("b", 4)]
    nices.applied("a", 4)
    nices.applied("b", 4)
    nices.set_busy("c", True)  # three busy: 5 (3 * 335 <= 1024 < 3 * 423), "c" last (it gains weight)
    assert nices.plan() == [("a", 5), ("b", 5), ("c", 5)]


def test_an_untracked_group_is_ignored_and_a_removed_one_forgotten() -> None:
    nices: GroupNices[str] = GroupNices(1.0, 19)
    nices.set_busy("ghost", True)
    nices.applied("ghost", 3)
    assert nices.plan() == [] and nices.busy == 0
    nices.add("a", 19)
    nices.set_busy("a", True)
    nices.remove("a")
    assert nices.plan() == [] and nices.busy == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="share"):
        GroupNices(-1.0, 19)
    with pytest.raises(ValueError, match="ceiling"):
        GroupNices(1.0, -1)

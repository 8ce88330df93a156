from noded.services.slots import plan_slots


def test_new_members_append():
    assert plan_slots([], [1, 2, 3]) == [1, 2, 3]
    assert plan_slots([1, 2], [1, 2, 3]) == [1, 2, 3]


def test_removal_moves_only_the_last_member():
    assert plan_slots([1, 2, 3, 4], [1, 3, 4]) == [1, 4, 3]


def test_replacement_reuses_the_hole():
    assert plan_slots([1, 2, 3], [1, 3, 9]) == [1, 9, 3]


def test_removing_the_tail_moves_nothing():
    assert plan_slots([1, 2, 3], [1, 2]) == [1, 2]


def test_everything_gone():
    assert plan_slots([1, 2], []) == []


def test_same_membership_any_order():
    for old, want in [([5, 6, 7, 8], [8, 6]), ([1], [2, 3]), ([1, 2, 3, 4, 5], [2, 4])]:
        assert sorted(plan_slots(old, want)) == sorted(want)

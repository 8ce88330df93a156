"""Backend slot planning: the new slot order of a frontend that moves as few slots as it can."""

from __future__ import annotations


def plan_slots(old: list[int], want: list[int]) -> list[int]:
    """Order `want` so that members keep their old positions where possible.

    A removed member's hole takes a new member, or else the last member moves
    into it (swap-remove): one endpoint change rewrites at most two slots.
    """
    if not old:  # a new frontend (every one in a first sync): nothing to keep in place
        return list(want)
    want_set = set(want)
    old_set = set(old)
    slots: list[int | None] = [x if x in want_set else None for x in old]
    added = [x for x in want if x not in old_set]
    for i, x in enumerate(slots):
        if x is None and added:
            slots[i] = added.pop(0)
    slots.extend(added)
    while slots and slots[-1] is None:
        slots.pop()
    while None in slots:
        hole = slots.index(None)
        slots[hole] = slots.pop()
        while slots and slots[-1] is None:
            slots.pop()
    return [x for x in slots if x is not None]

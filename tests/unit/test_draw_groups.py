"""The round's unit of one draw: photos of a declared part and pixel-verified near-copies count together, transitively."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from loop.round import draw_groups


def _state(parts: list[str | None], near_groups: list[list[int]] | None) -> SimpleNamespace:
    near = None if near_groups is None else SimpleNamespace(summary={"groups": near_groups})
    return SimpleNamespace(parts=parts, near_duplicates=near, image_ids=[100 + i for i in range(len(parts))])


def _partition(groups: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(groups == g).tolist()) for g in set(groups.tolist())}


def test_every_image_alone_without_parts_or_near_copies() -> None:
    positions = np.arange(4)
    assert draw_groups(_state([None] * 4, None), positions) is None  # the check did not run
    assert draw_groups(_state([None] * 4, []), positions) is None
    assert draw_groups(_state([None] * 4, [[1, 7]]), positions) is None  # the copy is outside these positions


def test_near_copies_join_one_draw_and_chain_through_a_part() -> None:
    groups = draw_groups(_state([None] * 5, [[1, 3]]), np.arange(5))
    assert _partition(groups) == {frozenset({0}), frozenset({1, 3}), frozenset({2}), frozenset({4})}
    # part "a" holds 0 and 2; 2 has a near-copy 3: one physical thing seen three times
    groups = draw_groups(_state(["a", None, "a", None, "b"], [[2, 3]]), np.arange(5))
    assert _partition(groups) == {frozenset({0, 2, 3}), frozenset({1}), frozenset({4})}


def test_positions_are_a_subset_of_the_project() -> None:
    # positions 2, 4, 6 of the project; near group (4, 6) and (2, 9): 9 is not among them
    groups = draw_groups(_state([None] * 10, [[4, 6], [2, 9]]), np.array([2, 4, 6]))
    assert _partition(groups) == {frozenset({0}), frozenset({1, 2})}
    assert len(groups) == 3

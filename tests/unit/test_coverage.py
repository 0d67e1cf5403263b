"""Images unlike every labeled image, and ingest batches made mostly of them (a new camera or product line)."""
from __future__ import annotations

import numpy as np

from modeling.coverage import (EXPECTED_SHARE, MAX_SCORED_TOTAL, MIN_GROUP_IMAGES, MIN_REFERENCE, MIN_SCORED_PER_GROUP, find_unfamiliar_images,
                               first_lane, reads_unlike_alone,
                               judging_groups, sample_per_group, unfamiliar_share_by_group)

DIM = 48


def _cluster_images(rng: np.random.Generator, centers: np.ndarray, n: int, *, shift: np.ndarray | None = None, spread: float = 0.25) -> np.ndarray:
    """Unit vectors around the class centers (a camera's images of every class); `shift` moves them all (another camera)."""
    picks = centers[rng.integers(0, len(centers), n)]
    vectors = picks + spread * rng.normal(size=(n, DIM)) + (0 if shift is None else shift)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _two_cameras(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, ingest batch per row, reference positions): camera A's 600 images (200 of them labeled) and camera
    B's 200, every class seen through a shift of the whole embedding."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, DIM)) / np.sqrt(DIM) * 3
    camera_a = _cluster_images(rng, centers, 600)
    camera_b = _cluster_images(rng, centers, 200, shift=rng.normal(size=DIM) / np.sqrt(DIM) * 4)
    embeddings = np.vstack([camera_a, camera_b]).astype(np.float32)
    batches = np.array([1] * 600 + [2] * 200)
    return embeddings, batches, rng.choice(600, 200, replace=False)


def test_a_shifted_batch_is_flagged_and_images_like_the_labeled_ones_read_unfamiliar_about_as_often_as_expected() -> None:
    embeddings, batches, reference = _two_cameras()
    finding = find_unfamiliar_images(embeddings=embeddings, reference=reference)
    shares = unfamiliar_share_by_group(finding=finding, groups=batches)
    assert shares[2]["share_unfamiliar"] > 0.9 and shares[2]["flagged"]
    # camera A, labeled or not, is drawn like the reference: its nearest labeled image is as near as a labeled image's own
    assert shares[1]["share_unfamiliar"] < 3 * EXPECTED_SHARE and not shares[1]["flagged"]
    unlabeled_a = np.setdiff1d(np.arange(600), reference)
    assert finding.is_issue[unlabeled_a].mean() < 3 * EXPECTED_SHARE
    assert finding.summary["n_reference"] == 200 and finding.summary["n_scored"] == 800
    assert set(finding.related[finding.is_issue]) <= set(reference.tolist())  # the nearest labeled image explains the score


def test_photos_of_one_part_are_not_each_others_nearest_reference() -> None:
    """Reference images are parts photographed 5 times: the cutoff must come from other parts, as a new part's photo
    has no photo of its own part among the labels. Read from the part's own photos it flags every new part."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, DIM)) / np.sqrt(DIM) * 3
    part_centers = _cluster_images(rng, centers, 120)
    photos = np.repeat(part_centers, 5, axis=0) + 0.02 * rng.normal(size=(600, DIM))
    photos = (photos / np.linalg.norm(photos, axis=1, keepdims=True)).astype(np.float32)
    parts = [f"part-{i // 5}" for i in range(600)]
    reference = np.arange(300)  # the first 60 parts are labeled; the other 60 are new parts of the same kind
    new = np.arange(300, 600)
    with_parts = find_unfamiliar_images(embeddings=photos, reference=reference, parts=parts)
    without_parts = find_unfamiliar_images(embeddings=photos, reference=reference)
    assert with_parts.is_issue[new].mean() < 3 * EXPECTED_SHARE
    assert without_parts.is_issue[new].mean() > 0.5


def test_too_few_labeled_images_judge_nothing_and_say_why() -> None:
    embeddings, _, _ = _two_cameras()
    finding = find_unfamiliar_images(embeddings=embeddings, reference=np.arange(MIN_REFERENCE - 1))
    assert not finding.is_issue.any() and np.isnan(finding.scores).all()
    assert "too few" in finding.summary["note"]


def test_a_sample_per_group_reads_a_share_of_any_batch_at_a_bounded_cost() -> None:
    groups = np.array([1] * 5000 + [2] * 30)
    sample = sample_per_group(groups=groups, positions=np.arange(5030), limit=1000)
    assert (groups[sample] == 1).sum() == 1000 and (groups[sample] == 2).sum() == 30
    assert np.array_equal(sample, sample_per_group(groups=groups, positions=np.arange(5030), limit=1000))  # seeded: the same every round


def test_many_batches_share_the_scoring_budget_but_each_keeps_enough_images_to_read_its_share() -> None:
    groups = np.repeat(np.arange(100), 500)  # a hundred daily ingests
    sample = sample_per_group(groups=groups, positions=np.arange(len(groups)))
    per_group = np.bincount(groups[sample])
    assert (per_group == MIN_SCORED_PER_GROUP).all() and len(sample) < 2 * MAX_SCORED_TOTAL


def test_small_ingests_in_a_row_are_judged_together_until_they_hold_enough_images_and_a_large_one_stands_alone() -> None:
    sizes = {1: 400, 2: 8, 3: 8, 4: 30, 5: 9, 6: 9, 7: 120, 8: 5, 9: 5}
    assert judging_groups(batch_sizes=sizes, min_images=40) == {1: 1, 2: 2, 3: 2, 4: 2, 5: 5, 6: 5, 7: 7, 8: 8, 9: 8}
    # the newest group keeps its name as ingests join it, and closes at the size
    assert judging_groups(batch_sizes={**sizes, 10: 30}, min_images=40)[10] == 8
    assert judging_groups(batch_sizes={**sizes, 10: 30, 11: 1}, min_images=40)[11] == 11
    # a labeled batch (what the others are judged against) stands alone and ends the run, whatever its size
    assert judging_groups(batch_sizes=sizes, standalone={3}, min_images=40) == {1: 1, 2: 2, 3: 3, 4: 4, 5: 4, 6: 4, 7: 7, 8: 8, 9: 8}


def test_a_new_camera_arriving_a_few_images_an_ingest_is_flagged_as_a_group_it_never_is_alone() -> None:
    """Camera B's 200 images in daily ingests of 8: no ingest alone can show 10 unlike images; together they do, and
    camera A's daily ingests, judged the same way, are not flagged."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, DIM)) / np.sqrt(DIM) * 3
    camera_a = _cluster_images(rng, centers, 600 + 200)
    camera_b = _cluster_images(rng, centers, 200, shift=rng.normal(size=DIM) / np.sqrt(DIM) * 4)
    embeddings = np.vstack([camera_a, camera_b]).astype(np.float32)
    batches = np.array([0] * 600 + [1 + i // 8 for i in range(200)] + [100 + i // 8 for i in range(200)])
    finding = find_unfamiliar_images(embeddings=embeddings, reference=np.arange(200))
    alone = unfamiliar_share_by_group(finding=finding, groups=batches)
    assert not any(share["flagged"] for share in alone.values())
    group_of = judging_groups(batch_sizes={int(b): int((batches == b).sum()) for b in np.unique(batches)})
    groups = np.array([group_of[int(b)] for b in batches])
    together = unfamiliar_share_by_group(finding=finding, groups=groups)
    flagged = {g for g, share in together.items() if share["flagged"]}
    # every ingest of camera B is in a flagged group (the first of them with camera A's last few) but the newest: alone
    # in its group, its 8 images wait for the next ingests; no group of camera A's ingests alone is flagged
    assert {group_of[b] for b in range(100, 124)} <= flagged and group_of[124] == 124 and 124 not in flagged
    assert not {g for g in flagged if all(b < 100 for b in group_of if group_of[b] == g)}
    assert max(list(group_of.values()).count(g) for g in flagged) == -(-MIN_GROUP_IMAGES // 8)  # 7 ingests of 8


def test_small_ingests_of_two_lanes_in_turn_make_groups_of_their_own_lane() -> None:
    sizes = {1: 400, **{b: 8 for b in range(2, 16)}}
    lanes = {b: "unlike" if b % 2 else "like" for b in range(2, 16)}
    groups = judging_groups(batch_sizes=sizes, lanes=lanes, min_images=40)
    assert {b for b in groups if groups[b] == 3} == {3, 5, 7, 9, 11} and {b for b in groups if groups[b] == 2} == {2, 4, 6, 8, 10}
    assert groups[13] == groups[15] == 13 and groups[12] == groups[14] == 12


def test_an_ingest_reads_unlike_alone_only_with_half_its_images_and_at_least_three_unlike() -> None:
    # one odd image of a day of the old camera (1 of 1, 1 of 2, 2 of 2) must not open a lane of its own
    def share(n_unlike: int, n_scored: int) -> dict:
        return {"n_scored": n_scored, "n_unfamiliar": n_unlike, "share_unfamiliar": n_unlike / n_scored}

    assert [reads_unlike_alone(share(u, n)) for u, n in ((1, 1), (1, 2), (2, 2), (3, 3), (3, 6), (3, 7), (4, 8), (9, 20))] == [
        False, False, False, True, True, False, True, False]


def test_a_small_ingest_is_kin_of_the_unlike_lane_only_when_most_of_its_nearest_labels_and_three_came_in_it() -> None:
    assert first_lane(unlike_alone=True, nearest_lanes={}, judged_by_both=False) == "unlike"  # decided at once
    assert first_lane(unlike_alone=False, nearest_lanes={"unlike": 3, "like": 2}, judged_by_both=False) == "unlike"
    assert first_lane(unlike_alone=False, nearest_lanes={"unlike": 2}, judged_by_both=True) == "like"  # too few kin
    assert first_lane(unlike_alone=False, nearest_lanes={"unlike": 4, "like": 3, None: 1}, judged_by_both=True) == "like"  # not most
    # like the labels, but only one of the two checks could judge it: not decided yet
    assert first_lane(unlike_alone=False, nearest_lanes={"like": 8}, judged_by_both=False) is None


def test_a_flagged_batch_the_test_split_could_not_be_judged_for_says_why_none_of_it_was_drawn() -> None:
    # QA: 58 bottle photos in a tile project: "the test split holds 0 labeled images of it", and nothing said that no
    # test sample was drawn because the test split (under 30 labeled images) could not be judged
    from loop.round import _coverage_text

    row = {"ingest_batch_ids": [3], "source": "/data/bottle", "n_images": 58, "n_labeled_train_validation": 0, "n_labeled_test": 0,
           "n_unlabeled_test": 0, "n_drawn_into_test_now": 0, "n_test_target": 12,
           "unlike_training_labels": {"flagged": True, "n_unfamiliar": 58, "n_scored": 58, "share_unfamiliar": 1.0}, "unlike_test_labels": None,
           "test_check_note": "fewer than 30 labeled images: too few to tell what is unlike them"}
    said = _coverage_text(row, 40)
    assert ("the test split holds 0 labeled images of it, and none were drawn into it: whether the test split covers it could not be "
            "judged (fewer than 30 labeled images") in said
    assert "`loop ingest DIR --split test`" in said
    assert _coverage_text({**row, "test_check_note": None}, 40).endswith("the test split holds 0 labeled images of it.")

"""Images unlike every labeled image, and ingest batches made mostly of them (a new camera or product line)."""
from __future__ import annotations

import numpy as np

from modeling.coverage import (EXPECTED_SHARE, MAX_SCORED_TOTAL, MIN_REFERENCE, MIN_SCORED_PER_GROUP, find_unfamiliar_images, sample_per_group,
                               unfamiliar_share_by_group)

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

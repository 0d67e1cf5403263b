"""Which images are unlike every labeled image, and which ingest batches are mostly such images (a new camera, a new
product line): the training labels do not cover them, and a frozen test split drawn before they came does not
measure them.

- `find_unfamiliar_images(embeddings=, reference=, scored=, parts=)` -> `Finding`: an image is unfamiliar when its
  most similar reference image (a labeled image: the training labels, or the test split's) is less similar than the reference images'
  own nearest other reference is, for all but `EXPECTED_SHARE` of them. Images drawn like the reference images are
  flagged at about that share (their nearest reference is distributed as a reference's nearest other reference);
  a shifted batch is flagged at many times it.
- `unfamiliar_share_by_group(finding=, groups=)` -> per group: scored, unfamiliar, share, flagged.
- `judging_groups(batch_sizes=, standalone=, lanes=)` -> the group each ingest batch is judged in: small ingests of
  one lane together, in the order they came (a new camera whose images come a few a day fills a group of its own
  days, where alone no ingest could show 10).

Both read the pretrained embeddings (unit length; a fine-tuned model would move its own training images closer
together). A sample of `MAX_REFERENCE` reference images and `MAX_SCORED_PER_GROUP` images per group bounds the cost
(shares need a sample, not every image): at most 2048 x 2048 and about 8192 x 2048 dot products per finding.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from modeling.label_quality import Finding

__all__ = ["EXPECTED_SHARE", "FLAG_SHARE", "MIN_GROUP_IMAGES", "find_unfamiliar_images", "judging_groups", "sample_per_group",
           "unfamiliar_share_by_group"]

EXPECTED_SHARE = 0.05  # images like the labeled ones read as unfamiliar this often: the cutoff is the 5th percentile
FLAG_SHARE = 0.30  # a group this unfamiliar (6x the expected share) is not drawn like the labeled images
MIN_FLAGGED_IMAGES = 10  # and at least this many of its images are: a handful of odd images is an outlier finding
# an ingest of fewer images is judged with other small ingests of its lane, in the order they came: alone, a batch
# of 9 could never be flagged, and a share read from a few images is noise (with 50 images like the labeled ones, 15
# or more unlike them is a 1-in-10^5 draw at the expected 5%)
MIN_GROUP_IMAGES = 50
# fewer labeled images cannot tell how far apart images like them lie: with 20, a batch drawn like them was flagged in
# 6 of 300 draws (a reviewer's simulation), with 30 in 1, from 60 on in none (a false flag costs a test sample of the
# batch and half a round's budget; a small project's test split may hold no more)
MIN_REFERENCE = 30
MAX_REFERENCE = 2048
MAX_SCORED_PER_GROUP = 1024
# all groups together: past MAX_SCORED_TOTAL / MAX_SCORED_PER_GROUP batches each gets fewer, at least MIN_SCORED_PER_GROUP
# (a share of 30% read from 128 images is within +-8 points at 95%). 50 batches of 400 3808-d images took 16.5 s a round
# scored whole; with these caps 2.7 s (20k images, parts of 4).
MAX_SCORED_TOTAL = 8192
MIN_SCORED_PER_GROUP = 128
BLOCK = 2048


def find_unfamiliar_images(*, embeddings: np.ndarray, reference: np.ndarray, scored: np.ndarray | None = None,
                           parts: Sequence[str | None] | None = None, seed: int = 0) -> Finding:
    """embeddings: (n, d) unit rows. reference: positions of the images the model learns from. scored: the positions
    to judge (default all). parts: per position, the physical part (None: its own); a reference image's nearest other
    reference is never a photo of its own part, as a new part's photo never has one.

    scores: per position, the similarity (cosine, clipped to [0, 1]) of the nearest sampled reference image, NaN for
    positions not scored; is_issue: scored and below the cutoff; related: that nearest reference's position (-1)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {embeddings.shape}")
    n = len(embeddings)
    reference = np.unique(np.asarray(reference, dtype=np.int64))
    scored = np.arange(n) if scored is None else np.unique(np.asarray(scored, dtype=np.int64))
    scores = np.full(n, np.nan)
    is_issue = np.zeros(n, dtype=bool)
    related = np.full(n, -1, dtype=np.int64)
    # parts as integer codes, an image without a part its own: a same-part mask is then one comparison per block
    part_names = [None] * n if parts is None else list(parts)
    if len(part_names) != n:
        raise ValueError(f"parts must be one value per image ({n}), got {len(part_names)}")
    code_of: dict[str, int] = {}
    part_of = np.array([-1 - i if name is None else code_of.setdefault(str(name), len(code_of)) for i, name in enumerate(part_names)], dtype=np.int64)
    if len(reference) < MIN_REFERENCE:
        return Finding(scores=scores, is_issue=is_issue, related=related,
                       summary={"n_issues": 0, "n_reference": int(len(reference)), "n_scored": 0,
                                "note": f"fewer than {MIN_REFERENCE} labeled images: too few to tell what is unlike them"})
    rng = np.random.default_rng(seed)
    if len(reference) > MAX_REFERENCE:
        reference = np.sort(rng.choice(reference, MAX_REFERENCE, replace=False))
    ref_vectors = embeddings[reference]

    # each reference image's nearest OTHER reference image, never one of its own part
    own = np.empty(len(reference), dtype=np.float64)
    ref_parts = part_of[reference]
    for start in range(0, len(reference), BLOCK):
        rows = np.arange(start, min(start + BLOCK, len(reference)))
        block = ref_vectors[rows] @ ref_vectors.T
        block[ref_parts[rows][:, None] == ref_parts[None, :]] = -np.inf  # itself, and its part's other photos
        own[rows] = block.max(axis=1)
    finite = own[np.isfinite(own)]
    if len(finite) < MIN_REFERENCE:  # one part holds nearly every labeled image
        return Finding(scores=scores, is_issue=is_issue, related=related,
                       summary={"n_issues": 0, "n_reference": int(len(reference)), "n_scored": 0,
                                "note": "the labeled images are photos of too few parts to tell what is unlike them"})
    cutoff = float(np.quantile(finite, EXPECTED_SHARE))

    is_reference = np.zeros(n, dtype=bool)
    is_reference[reference] = True
    for start in range(0, len(scored), BLOCK):
        rows = scored[start:start + BLOCK]
        block = embeddings[rows] @ ref_vectors.T
        # a reference image is judged as the cutoff was drawn: against the others, never its own part; any image's
        # photo of a labeled part is familiar (its part is known)
        judged_alone = is_reference[rows][:, None] & (part_of[rows][:, None] == ref_parts[None, :])
        block[judged_alone] = -np.inf
        best = block.argmax(axis=1)
        best_similarity = block[np.arange(len(rows)), best].astype(np.float64)
        scores[rows] = np.clip(best_similarity, 0.0, 1.0)
        related[rows] = np.where(np.isfinite(best_similarity), reference[best], -1)
        is_issue[rows] = best_similarity < cutoff
    return Finding(scores=scores, is_issue=is_issue, related=related, summary={
        "n_issues": int(is_issue.sum()), "n_reference": int(len(reference)), "n_scored": int(len(scored)),
        "cutoff_similarity": round(cutoff, 6), "expected_share": EXPECTED_SHARE,
    })


def sample_per_group(*, groups: np.ndarray, positions: np.ndarray, seed: int = 0, limit: int = MAX_SCORED_PER_GROUP,
                     total: int = MAX_SCORED_TOTAL) -> np.ndarray:
    """At most `limit` of `positions` per group, fewer when the groups are many (about `total` in all, never under
    MIN_SCORED_PER_GROUP each): a seeded sample, enough to read a share, cheap for any pool."""
    groups = np.asarray(groups)
    positions = np.asarray(positions, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    names = np.unique(groups[positions])
    limit = max(min(limit, total // max(len(names), 1)), MIN_SCORED_PER_GROUP)
    for group in names:
        members = positions[groups[positions] == group]
        chosen.append(members if len(members) <= limit else rng.choice(members, limit, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def unfamiliar_share_by_group(*, finding: Finding, groups: np.ndarray) -> dict[Any, dict[str, Any]]:
    """Per group value: images scored, unfamiliar among them, their share, and whether the group is flagged (share
    at least FLAG_SHARE and at least MIN_FLAGGED_IMAGES unfamiliar images)."""
    groups = np.asarray(groups)
    scored = np.isfinite(finding.scores)
    out: dict[Any, dict[str, Any]] = {}
    for group in np.unique(groups[scored]):
        members = scored & (groups == group)
        n_scored, n_unfamiliar = int(members.sum()), int((finding.is_issue & members).sum())
        share = n_unfamiliar / n_scored
        out[group.item() if hasattr(group, "item") else group] = {
            "n_scored": n_scored, "n_unfamiliar": n_unfamiliar, "share_unfamiliar": round(share, 4),
            "flagged": bool(share >= FLAG_SHARE and n_unfamiliar >= MIN_FLAGGED_IMAGES),
        }
    return out


# A small ingest's lane (judging_groups' `lanes`): "unlike" when at least half its scored images, and at least this
# many, read unlike the labels: 1 of 1 or 1 of 2 would read unlike 11-21% of the time for an ingest like the labels
UNLIKE_LANE_SHARE = 0.5
MIN_UNLIKE_LANE_IMAGES = 3


def reads_unlike_alone(share: Mapping[str, Any]) -> bool:
    """Whether an ingest judged alone (a value of unfamiliar_share_by_group) is of the "unlike" lane by its own images."""
    return share["share_unfamiliar"] >= UNLIKE_LANE_SHARE and share["n_unfamiliar"] >= MIN_UNLIKE_LANE_IMAGES


def first_lane(*, unlike_alone: bool, nearest_lanes: Mapping[Hashable, int], judged_by_both: bool) -> str | None:
    """The lane a small ingest is put in when first judged, or None (not decided yet: judged again next round).
    "unlike": it reads unlike the labels on its own, or is kin of that lane: most of its images' nearest labeled images
    (`nearest_lanes`: the lane of the batch each came in -> how many) came in "unlike" batches, at least
    MIN_UNLIKE_LANE_IMAGES of them (a new camera's later days, once its first days taught the model). "like" only once
    both the training and the test labels could judge it: with too few test labels a new camera's days read like the
    training labels that came with them."""
    kin = nearest_lanes.get("unlike", 0)
    if unlike_alone or (kin >= MIN_UNLIKE_LANE_IMAGES and kin * 2 > sum(nearest_lanes.values())):
        return "unlike"
    return "like" if judged_by_both else None


def judging_groups(*, batch_sizes: Mapping[int, int], standalone: Collection[int] = (), lanes: Mapping[int, Hashable] | None = None,
                   min_images: int = MIN_GROUP_IMAGES) -> dict[int, int]:
    """batch id -> the id of the group it is judged in (its first batch's id). A batch of at least `min_images`
    images, or one in `standalone` (it came with labels, or went whole into the test split: what the others are
    judged against), is judged alone and ends every run; smaller batches in a row (in id order, the order they were
    ingested) are judged together, a group closing once it holds `min_images` images; the newest group may hold
    fewer. `lanes` (batch -> a key; default one lane) keeps runs apart: a small batch joins the open group of its own
    lane, so a new camera's daily ingests between the old camera's form groups of their own. Sizes are the images
    each ingest added (not what is left of them): a file quarantined later must not move every later boundary, and a
    group's id stays the same as later ingests join it, so what a round draws from it is seeded the same way."""
    alone = set(standalone)
    lane_of = lanes or {}
    group_of: dict[int, int] = {}
    open_groups: dict[Hashable, tuple[int, int]] = {}  # lane -> (group id, images so far)
    for batch_id in sorted(batch_sizes):
        size = int(batch_sizes[batch_id])
        if size >= min_images or batch_id in alone:
            group_of[batch_id] = batch_id
            open_groups.clear()  # a large or labeled batch between small ones ends their runs
            continue
        lane = lane_of.get(batch_id)
        group, so_far = open_groups.get(lane, (batch_id, 0))
        group_of[batch_id] = group
        if so_far + size >= min_images:
            open_groups.pop(lane, None)
        else:
            open_groups[lane] = (group, so_far + size)
    return group_of

"""The indoor/outdoor vote rules `select` decides with, from the Places365 stage's stored top-k.

Each image's top-k scene categories come with whether each is an outdoor one (the official
IO_places365.txt); a rule turns those flags into outdoor or not:
  - votes:    at least `min_votes` outdoor categories among the top `top_k` (seed 004: 3 of 5);
  - official: the Places365 demo rule, mean IO label over the top 10 >= 0.5 (a 5/5 tie is outdoor).
Pure functions, no torch: changing a rule reruns only `select`, never the scene classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OFFICIAL_TOP_K = 10  # the official rule votes over the top 10 categories


def outdoor_by_votes(topk_outdoor: Sequence[bool], min_votes: int = 3, top_k: int = 5) -> bool:
    """At least `min_votes` outdoor categories among the top `top_k` (seed 004: 3 of 5)."""
    if top_k > len(topk_outdoor):
        raise ValueError(f"rule needs the top {top_k} categories, only {len(topk_outdoor)} stored")
    return int(sum(bool(x) for x in topk_outdoor[:top_k])) >= min_votes


def outdoor_by_official(topk_outdoor: Sequence[bool]) -> bool:
    """The Places365 demo rule: mean IO label over the top 10 >= 0.5, so a 5/5 tie is outdoor."""
    if len(topk_outdoor) < OFFICIAL_TOP_K:
        raise ValueError(f"rule needs the top {OFFICIAL_TOP_K} categories, only {len(topk_outdoor)} stored")
    return float(np.mean([bool(x) for x in topk_outdoor[:OFFICIAL_TOP_K]])) >= 0.5


def outdoor_votes_matrix(topk_outdoor: np.ndarray, top_k: int) -> np.ndarray:
    """Outdoor votes among the first `top_k` columns of an (images, k) boolean matrix."""
    if top_k > topk_outdoor.shape[1]:
        raise ValueError(f"rule needs the top {top_k} categories, only {topk_outdoor.shape[1]} stored")
    return topk_outdoor[:, :top_k].sum(axis=1).astype(np.int16)


def decide_outdoor(
    topk_outdoor: np.ndarray, rule: str, min_votes: int = 3, top_k: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised rules over an (images, k) matrix: returns (votes counted, is_outdoor).

    Agrees row by row with `outdoor_by_votes` / `outdoor_by_official` (tested).
    """
    if rule == "votes":
        votes = outdoor_votes_matrix(topk_outdoor, top_k)
        return votes, votes >= min_votes
    if rule == "official":
        votes = outdoor_votes_matrix(topk_outdoor, OFFICIAL_TOP_K)
        return votes, votes / OFFICIAL_TOP_K >= 0.5
    raise ValueError(f"unknown outdoor rule {rule!r} (expected 'votes' or 'official')")

"""Prediction rules and rerankings: how a query's k neighbours become one landmark and a confidence.

Both are registries, as timm registers its models: a rule is a function registered here under the
name config.yaml's retrieve section uses (`prediction`, `rerank`), so a new one touches this module
(and the schema's enum), not the code that calls them.

Prediction rules (pick the label from the neighbours that have a landmark id):
  - top1: the label of the nearest neighbour;
  - vote: the label with the largest sum of cosines over its neighbours among the k.
Rerankings (the confidence of that label):
  - none:    the best cosine of the predicted label (its nearest neighbour's);
  - seed004: that cosine minus `bank_weight` x the query's bank term (its mean top-`bank_k` cosine to
             the non-landmark bank);
  - glr2020: the GLR2020 winners' rule, which also picks the label (`prediction` is not used). For
             database image j, B_j = mean of its top-`bank_k` cosines to the bank; for query i,
             A_ij = clamp(cos(i, j), 0, 1) - B_j; sum A over the first `neighbours_per_label`
             neighbours of each label, keep the best label, subtract C_i = mean of the query's
             top-`glr2020_query_bank_k` cosines to the bank.
Ties between labels (equal vote or A sums) go to the label whose nearest neighbour ranks higher.
With `margin_weight`, the confidence of none/seed004 also subtracts that times the runner-up landmark's
best cosine among the k (an answer that barely beat another landmark is less sure), unless one of the
answer's neighbours was geometrically verified (`verified`): the geometry has settled which landmark it
is, and a relabelled answer's runner-up is the cosine verification overruled. With `impostor_weight`, it also subtracts that times the impostor term of the
answer's nearest database image: that image's mean cosine to its nearest database images of other
landmarks (retrieve computes it once per database image). A database photo that resembles other
landmarks' photos (an interior, a close-up, a generic facade) is weak evidence when a query matches it,
as CSLS (Conneau et al. 2018) discounts "hub" neighbours; GLR2020's B_j does the same against the
non-landmark bank. With `bank_excess_weight` (given the queries' bank terms), it also subtracts that
times how far the query's bank term exceeds the answer's cosine: a photo more like the non-landmark
photos than like its answer is likely no landmark at all, while a landmark photo that merely resembles
the bank a little (sky, street, people), as seed004's whole bank term would punish, pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .common import StageError

PREDICT_CELLS = 1 << 22  # queries x k x k label comparisons made at once (bounds predict's memory)


class Predictions(NamedTuple):
    """One row per query: the predicted label (-1: none), its confidence, the best cosine of that label
    among the neighbours, the best cosine of any other label (the runner-up; when all k neighbours
    share the label, the k-th cosine, which bounds every other label's), and the impostor term of the
    answer's nearest database image (NaN when the database's impostor terms were not given)."""

    label: np.ndarray
    confidence: np.ndarray
    top_cosine: np.ndarray
    other_cosine: np.ndarray
    impostor: np.ndarray


class Neighbours(NamedTuple):
    """A block of queries' k neighbours as the rules see them, (queries, k) arrays, best first."""

    cosines: np.ndarray  # float64
    labels: np.ndarray  # landmark id of each neighbour, -1 for none
    valid: np.ndarray  # found and labelled: the neighbours that can give a label
    rows: np.ndarray  # database row of each neighbour (0 where none, so it can index)
    db_bank: np.ndarray | None  # B_j per database row (glr2020)
    neighbours_per_label: int  # glr2020: how many neighbours of each label count
    db_impostor: np.ndarray | None = None  # impostor term per database row (None: not used)

    def same_label(self) -> np.ndarray:
        """same[i, j, l]: neighbours j and l of query i have the same landmark (a (queries, k, k) mask)."""
        return (self.labels[:, :, None] == self.labels[:, None, :]) & self.valid[:, :, None] & self.valid[:, None, :]


class Choice(NamedTuple):
    """What a prediction rule decides: the neighbour column whose label is the answer, and, for rules that
    add up scores per label, each neighbour's label total (else None)."""

    column: np.ndarray
    totals: np.ndarray | None


class Scored(NamedTuple):
    """What a reranking computes the confidence from, per query of the block."""

    neighbours: Neighbours
    column: np.ndarray  # the answer's neighbour column (after a label forced by verification)
    totals: np.ndarray | None  # the rule's label totals (Choice.totals)
    top_cosine: np.ndarray  # best cosine of the answer's landmark (float64)
    other_cosine: np.ndarray  # the runner-up's (float64; -inf when there is none)
    query_bank: np.ndarray | None  # the query's bank term (None: not used, or no bank)
    margin_weight: float
    bank_weight: float
    impostor_weight: float = 0.0
    settled: np.ndarray | None = None  # the answer has a geometrically verified neighbour (None: not verified)
    bank_excess_weight: float = 0.0

    def bank_excess(self) -> np.ndarray:
        """How far each query's bank term exceeds its answer's cosine (0 where it does not, or without one)."""
        if self.query_bank is None:
            return np.zeros(len(self.column))
        return np.maximum(self.query_bank - self.top_cosine, 0.0)

    def answer_impostor(self) -> np.ndarray:
        """The impostor term of each query's answer (its nearest database image of the answer's landmark)."""
        n = self.neighbours
        if n.db_impostor is None:
            return np.zeros(len(self.column))
        return n.db_impostor[n.rows[np.arange(len(self.column)), self.column]].astype(np.float64)


PredictionRule = Callable[[Neighbours], Choice]


@dataclass(frozen=True)
class Reranking:
    """A registered reranking: its confidence and what it needs."""

    name: str
    confidence: Callable[[Scored], np.ndarray]
    needs_bank: bool = False  # the queries' bank terms (and so a non-empty bank)
    needs_database_bank: bool = False  # B_j of every database image
    chooses_label: PredictionRule | None = None  # a label rule of its own, used instead of `prediction`
    query_bank_k: str = "bank_k"  # the retrieve setting: how many bank photos a query's bank term averages
    uses_impostor: bool = False  # subtracts impostor_weight x the answer's impostor term (so needs db_impostor)


PREDICTION_RULES: dict[str, PredictionRule] = {}
RERANKINGS: dict[str, Reranking] = {}


def register_prediction_rule(name: str):
    """Decorator: register `rule(neighbours) -> Choice` as the prediction rule `name`."""

    def register(rule: PredictionRule) -> PredictionRule:
        if name in PREDICTION_RULES:
            raise ValueError(f"prediction rule {name!r} is already registered")
        PREDICTION_RULES[name] = rule
        return rule

    return register


def register_reranking(name: str, **needs):
    """Decorator: register `confidence(scored) -> array` as the reranking `name`; `needs`: the other
    fields of `Reranking`."""

    def register(confidence: Callable[[Scored], np.ndarray]):
        if name in RERANKINGS:
            raise ValueError(f"reranking {name!r} is already registered")
        RERANKINGS[name] = Reranking(name, confidence, **needs)
        return confidence

    return register


def prediction_rule(name: str) -> PredictionRule:
    if name not in PREDICTION_RULES:
        raise StageError(f"unknown prediction rule {name!r} (choose from {', '.join(PREDICTION_RULES)})")
    return PREDICTION_RULES[name]


def reranking(name: str) -> Reranking:
    if name not in RERANKINGS:
        raise StageError(f"unknown rerank method {name!r} (choose from {', '.join(RERANKINGS)})")
    return RERANKINGS[name]


def label_rule_name(prediction: str, rerank: str) -> str:
    """The name of the rule that picks the label: the reranking's own when it has one, else `prediction`."""
    return rerank if reranking(rerank).chooses_label else prediction


# ----------------------------------------------------------------------------- prediction rules


def label_totals(neighbours: Neighbours, values: np.ndarray, counted: np.ndarray, same=None) -> Choice:
    """The label whose `counted` neighbours' `values` add up highest (`same`: `same_label()`, if known)."""
    same = neighbours.same_label() if same is None else same
    contributions = np.where(same & counted[:, None, :], values[:, None, :], 0.0)
    # cumsum adds in rank order (as a loop over the neighbours would), so equal totals are equal exactly.
    totals = np.where(neighbours.valid, np.cumsum(contributions, axis=2)[:, :, -1], -np.inf)
    # Every neighbour of a label carries its label's total; argmax takes the first maximum, i.e. on a
    # tie the label whose nearest neighbour ranks higher.
    return Choice(np.argmax(totals, axis=1), totals)


@register_prediction_rule("top1")
def top1(neighbours: Neighbours) -> Choice:
    return Choice(np.argmax(neighbours.valid, axis=1), None)  # the first usable neighbour


@register_prediction_rule("vote")
def vote(neighbours: Neighbours) -> Choice:
    return label_totals(neighbours, neighbours.cosines, neighbours.valid)


def glr2020_label(neighbours: Neighbours) -> Choice:
    """The best sum of A_ij = clamp(cos, 0, 1) - B_j over the first `neighbours_per_label` of each label."""
    values = np.clip(neighbours.cosines, 0.0, 1.0) - neighbours.db_bank[neighbours.rows].astype(np.float64)
    k = neighbours.cosines.shape[1]
    earlier = np.tri(k, k, -1, dtype=bool)  # [j, l]: l ranks above j
    same = neighbours.same_label()
    counted = neighbours.valid & ((same & earlier).sum(axis=2) < neighbours.neighbours_per_label)
    return label_totals(neighbours, values, counted, same)


# ----------------------------------------------------------------------------- rerankings


@register_reranking("none", uses_impostor=True)
def cosine(scored: Scored) -> np.ndarray:
    other = np.where(np.isfinite(scored.other_cosine), scored.other_cosine, 0.0)
    if scored.settled is not None:
        other = np.where(scored.settled, 0.0, other)
    confidence = scored.top_cosine - scored.margin_weight * other
    if scored.impostor_weight:
        confidence = confidence - scored.impostor_weight * scored.answer_impostor()
    if scored.bank_excess_weight:
        confidence = confidence - scored.bank_excess_weight * scored.bank_excess()
    return confidence


@register_reranking("seed004", needs_bank=True, uses_impostor=True)
def seed004(scored: Scored) -> np.ndarray:
    return cosine(scored) - scored.bank_weight * scored.query_bank


@register_reranking(
    "glr2020",
    needs_bank=True,
    needs_database_bank=True,
    chooses_label=glr2020_label,
    query_bank_k="glr2020_query_bank_k",
)
def glr2020(scored: Scored) -> np.ndarray:
    return scored.totals[np.arange(len(scored.column)), scored.column] - scored.query_bank


# ----------------------------------------------------------------------------- predict


def _predict_chunk(
    cosines, positions, db_labels, choose, rerank, query_bank, db_terms, cap, weights, forced=None, verified=None
):
    """`predict` on a block of queries. Labels are compared pairwise among each query's k neighbours
    (a (queries, k, k) mask): cheap for the k of retrieval, and no Python loop per query."""
    rows = np.arange(len(cosines))
    found = positions >= 0
    safe = np.where(found, positions, 0)
    neighbour_labels = np.where(found, db_labels[safe], -1)
    valid = found & (neighbour_labels >= 0)
    cos64 = cosines.astype(np.float64)
    neighbours = Neighbours(cos64, neighbour_labels, valid, safe, db_terms["bank"], cap, db_terms["impostor"])
    choice = choose(neighbours)
    column = choice.column
    if forced is not None:  # a label decided elsewhere (verification): its first neighbour's column
        given = forced >= 0
        column = np.where(given, np.argmax(valid & (neighbour_labels == forced[:, None]), axis=1), column)
    has_label = valid[rows, column]
    label = np.where(has_label, neighbour_labels[rows, column], -1)
    of_label = valid & (neighbour_labels == label[:, None])
    base = np.where(of_label, cos64, -np.inf).max(axis=1)
    other = np.where(valid & ~of_label, cos64, -np.inf).max(axis=1)
    lowest = np.where(valid, cos64, np.inf).min(axis=1)
    other = np.where(np.isfinite(other), other, np.where(np.isfinite(lowest), lowest, -np.inf))
    settled = None if verified is None else (of_label[:, : verified.shape[1]] & verified).any(axis=1)
    scored = Scored(
        neighbours,
        column,
        choice.totals,
        base,
        other,
        query_bank,
        weights["margin"],
        weights["bank"],
        weights["impostor"],
        settled,
        weights["bank_excess"],
    )
    confidence = rerank.confidence(scored)
    confidence[~has_label] = -np.inf
    impostor = scored.answer_impostor() if db_terms["impostor"] is not None else np.full(len(label), np.nan)
    impostor[~has_label] = np.nan
    return label, confidence, base.astype(np.float32), other.astype(np.float32), impostor.astype(np.float32)


def predict(
    cosines: np.ndarray,
    positions: np.ndarray,
    db_labels: np.ndarray,
    *,
    prediction: str = "top1",
    rerank: str = "seed004",
    query_bank: np.ndarray | None = None,
    db_bank: np.ndarray | None = None,
    neighbours_per_label: int = 3,
    margin_weight: float = 0.0,
    bank_weight: float = 1.0,
    db_impostor: np.ndarray | None = None,
    impostor_weight: float = 0.0,
    bank_excess_weight: float = 0.0,
    labels: np.ndarray | None = None,
    verified: np.ndarray | None = None,
) -> Predictions:
    """Label, confidence, top and runner-up cosines per query, vectorised; label -1 when no neighbour has
    a label.

    cosines, positions: (queries, k) from `index.search`, best first (position -1 = no neighbour);
    db_labels: landmark id of each database row, -1 for none. query_bank: the query's mean cosine to
    the bank (seed004: top-`bank_k`; glr2020: C_i); db_bank: B_j per database row (glr2020).
    margin_weight, bank_weight: the confidence of the top1/vote rules subtracts these times the
    runner-up cosine and the bank similarity; impostor_weight: likewise times `db_impostor` (the
    impostor term per database row) of the answer's nearest database image; bank_excess_weight: likewise
    times max(0, query_bank - the answer's cosine) (top1/vote; none without query_bank). labels: a label per query
    (-1: the rule's own) whose confidence to compute instead, e.g. after verification; it must be among
    the query's neighbours. verified: (queries, m) mask of the first m neighbours geometric verification
    confirmed; an answer with a verified neighbour of its landmark pays no runner-up margin.
    The rules and tie-breaking are in the module docstring.
    """
    choose = prediction_rule(prediction)
    rule = reranking(rerank)
    if rule.needs_bank and query_bank is None:
        raise StageError(f"rerank {rerank!r} needs the queries' bank similarities (query_bank)")
    if rule.needs_database_bank and db_bank is None:
        raise StageError(f"rerank {rerank!r} needs the database images' bank similarities (db_bank)")
    if impostor_weight and rule.uses_impostor and db_impostor is None:
        raise StageError("impostor_weight needs the database images' impostor terms (db_impostor)")
    if neighbours_per_label < 1:
        raise StageError(f"neighbours_per_label must be at least 1, got {neighbours_per_label}")
    cosines, positions = np.asarray(cosines), np.asarray(positions)
    if cosines.shape != positions.shape or cosines.ndim != 2:
        raise StageError(f"cosines {cosines.shape} and positions {positions.shape} must be the same 2-d shape")
    db_labels = np.asarray(db_labels, dtype=np.int64)
    choose = rule.chooses_label or choose
    uses_bank = rule.needs_bank or (bank_excess_weight and query_bank is not None)
    bank = np.asarray(query_bank, dtype=np.float64) if uses_bank else None
    db_terms = {
        "bank": np.asarray(db_bank, dtype=np.float64) if db_bank is not None else None,
        "impostor": np.asarray(db_impostor, dtype=np.float64) if db_impostor is not None else None,
    }
    weights = {
        "margin": margin_weight,
        "bank": bank_weight,
        "impostor": impostor_weight,
        "bank_excess": bank_excess_weight,
    }
    n = len(cosines)
    out = Predictions(
        np.full(n, -1, np.int64),
        np.full(n, -np.inf, np.float64),
        np.full(n, -np.inf, np.float32),
        np.full(n, -np.inf, np.float32),
        np.full(n, np.nan, np.float32),
    )
    if cosines.shape[1] == 0:
        return out
    chunk = max(1, PREDICT_CELLS // cosines.shape[1] ** 2)
    for start in range(0, n, chunk):
        part = slice(start, min(start + chunk, n))
        results = _predict_chunk(
            cosines[part],
            positions[part],
            db_labels,
            choose,
            rule,
            None if bank is None else bank[part],
            db_terms,
            neighbours_per_label,
            weights,
            None if labels is None else np.asarray(labels)[part],
            None if verified is None else np.asarray(verified, dtype=bool)[part],
        )
        for column, values in zip(out, results):
            column[part] = values
    return out

"""Figures of the score stage: example queries with their neighbours, precision against rank, score
distributions, per-class accuracy. Each function takes the tables the score stage computed and writes
one PNG atomically; matplotlib runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .common import atomic_path
from .loader import ShardImages


CORRECT, WRONG, NON_LANDMARK, NEUTRAL = "#1a9850", "#d73027", "#7b3294", "#808080"
EXAMPLE_GROUPS = (
    ("most confident correct", CORRECT),
    ("least confident correct", CORRECT),
    ("most confident wrong landmark", WRONG),
    ("most confident non-landmark query", NON_LANDMARK),
)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def pick_examples(ranked: pd.DataFrame, per_group: int = 2) -> list[tuple[str, pd.Series]]:
    """(group, prediction row) for the example figure, from `ranked` (score order, best first):
    the most and least confident correct predictions, the most confident wrong predictions on
    landmark queries, and the most confident predictions on non-landmark queries (always wrong)."""
    correct = ranked[ranked["correct"]]
    top_correct = correct.head(per_group)
    bottom_correct = correct.iloc[max(len(top_correct), len(correct) - per_group):].iloc[::-1]
    wrong_landmark = ranked[ranked["is_landmark"] & ~ranked["correct"]].head(per_group)
    non_landmark = ranked[~ranked["is_landmark"]].head(per_group)
    frames = zip((name for name, _ in EXAMPLE_GROUPS), (top_correct, bottom_correct, wrong_landmark, non_landmark))
    return [(name, row) for name, frame in frames for _, row in frame.iterrows()]


def _frame(ax, colour: str, width: float = 4) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(colour)
        spine.set_linewidth(width)


def _show(ax, image) -> None:
    if image is None:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, "image not\navailable", ha="center", va="center", fontsize=7, color=NEUTRAL,
                transform=ax.transAxes)
    else:
        ax.imshow(image)


def _landmark_text(value) -> str:
    return "non-landmark" if value is None or pd.isna(value) else f"landmark {int(value)}"


def plot_examples(ranked: pd.DataFrame, neighbours: pd.DataFrame | None, images: ShardImages, path: Path,
                  k: int = 5, per_group: int = 2) -> None:
    """Query images with their top-k neighbours, framed green where the neighbour shows the query's
    landmark and red where not; one row per example, grouped as in `pick_examples`."""
    plt = _pyplot()
    examples = pick_examples(ranked, per_group)
    by_query = {}
    if neighbours is not None and len(examples):
        wanted = neighbours[neighbours["query_id"].isin([row["id"] for _, row in examples])]
        by_query = {q: g.sort_values("rank").head(k) for q, g in wanted.groupby("query_id")}
        k = max([len(g) for g in by_query.values()] + [1])  # no empty columns when fewer were kept
    n_rows = max(1, len(examples))
    fig, axes = plt.subplots(n_rows, k + 1, figsize=(1.75 * (k + 1) + 0.4, 2.05 * n_rows), squeeze=False,
                             gridspec_kw={"wspace": 0.08, "hspace": 0.75})
    for ax in axes.flat:
        ax.axis("off")
    if not examples:
        axes[0, 0].text(0, 0.5, "no predictions to show", fontsize=10)
    group_colour = dict(EXAMPLE_GROUPS)
    previous_group = None
    for r, (group, row) in enumerate(examples):
        query_ax = axes[r, 0]
        query_ax.axis("on")
        _show(query_ax, images.thumbnail(row["id"]))
        verdict = CORRECT if row["correct"] else (WRONG if row["is_landmark"] else NON_LANDMARK)
        _frame(query_ax, verdict, 5)
        query_ax.set_title(f"query {str(row['id'])[:14]}\ntruth: {_landmark_text(row['truth_landmark_id'])}\n"
                           f"predicted {int(row['landmark_id'])}, score {row['score']:.3f}",
                           fontsize=6.5, color=verdict, loc="left")
        if group != previous_group:  # a heading over the first row of each group
            query_ax.annotate(group.upper(), xy=(0, 1), xycoords="axes fraction", xytext=(0, 38),
                              textcoords="offset points", fontsize=8.5, fontweight="bold",
                              color=group_colour[group], ha="left", va="bottom", annotation_clip=False)
            previous_group = group
        truth = row["truth_landmark_id"]
        for c, (_, n) in enumerate(by_query.get(row["id"], pd.DataFrame()).iterrows(), start=1):
            ax = axes[r, c]
            ax.axis("on")
            _show(ax, images.thumbnail(n["neighbour_id"]))
            label = n["neighbour_landmark_id"]
            right = not pd.isna(truth) and not pd.isna(label) and int(label) == int(truth)
            colour = CORRECT if right else WRONG
            _frame(ax, colour, 3)
            label_text = "no label" if pd.isna(label) else f"lm {int(label)}"
            ax.set_title(f"#{int(n['rank'])}  {label_text}\ncos {n['cosine']:.3f}", fontsize=6.5, color=colour)
    shown = {group for group, _ in examples}
    empty = [group for group, _ in EXAMPLE_GROUPS if group not in shown]
    note = f"\n(nothing to show for: {'; '.join(empty)})" if empty and examples else ""
    fig.suptitle(f"Test queries (left) and their top-{k} database neighbours: green = the query's landmark, "
                 f"red = another{note}", fontsize=9, y=1 - 0.12 / n_rows)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.75 / n_rows, bottom=0.02)
    _save(fig, path)


def plot_precision_vs_rank(ranked: pd.DataFrame, ranked_raw: pd.DataFrame | None, path: Path, *,
                           gap: float | None = None, gap_raw: float | None = None) -> None:
    """Precision at each rank as GAP walks the predictions (by confidence), after and before the
    non-landmark reranking; ticks along the bottom mark where wrong predictions sit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))

    def label(name, value):
        return name if value is None or pd.isna(value) else f"{name} (GAP {value:.3f})"

    if len(ranked):
        ax.plot(ranked["rank"], ranked["precision_at_rank"], color="tab:blue", lw=2,
                label=label("ranked by confidence", gap))
        if ranked_raw is not None and not np.array_equal(ranked_raw["id"].to_numpy(), ranked["id"].to_numpy()):
            ax.plot(ranked_raw["rank"], ranked_raw["precision_at_rank"], color="tab:gray", lw=1.5, ls="--",
                    label=label("ranked by raw top-1 cosine (no reranking)", gap_raw))
        if len(ranked) <= 20000:  # a rug of individual mistakes stays readable up to here
            for mask, colour, name in ((ranked["is_landmark"] & ~ranked["correct"], WRONG, "wrong landmark"),
                                       (~ranked["is_landmark"], NON_LANDMARK, "non-landmark query")):
                ranks = ranked.loc[mask, "rank"]
                if len(ranks):
                    ax.plot(ranks, np.full(len(ranks), 0.015), "|", color=colour, ms=9, mew=1,
                            label=f"{name} at this rank ({len(ranks)})")
    else:
        ax.text(0.5, 0.5, "no predictions", ha="center", transform=ax.transAxes)
    ax.set(xlabel="rank (all test predictions, most confident first)", ylabel="precision at rank",
           ylim=(0, 1.03), xlim=(0.5, max(1, len(ranked)) + 0.5), title="Precision against rank")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    _save(fig, path)


def plot_score_distributions(ranked: pd.DataFrame, path: Path) -> None:
    """Histograms of the confidence of correct / wrong landmark predictions and of predictions on
    non-landmark queries; a second panel shows the raw top-1 cosine when reranking changed it."""
    plt = _pyplot()
    reranked = "top_cosine" in ranked and not np.allclose(ranked["score"], ranked["top_cosine"], equal_nan=True)
    columns = [("top_cosine", "raw top-1 cosine (before reranking)"), ("score", "confidence after reranking")] \
        if reranked else [("score", "confidence score")]
    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 4), squeeze=False)
    groups = [("correct landmark prediction", ranked["correct"], CORRECT),
              ("wrong landmark prediction", ranked["is_landmark"] & ~ranked["correct"], WRONG),
              ("non-landmark query", ~ranked["is_landmark"], NON_LANDMARK)]
    for ax, (column, title) in zip(axes[0], columns):
        values = ranked[column].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        bins = np.linspace(finite.min(), finite.max() + 1e-9, 31) if len(finite) > 1 else 10
        for name, mask, colour in groups:
            part = values[mask.to_numpy() & np.isfinite(values)]
            if len(part):
                ax.hist(part, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=colour,
                        edgecolor=colour, lw=1.5, label=f"{name} ({len(part)})")
        ax.set(xlabel=title, ylabel="density (area of each group = 1)", title=title)
        ax.grid(alpha=0.3)
        if len(finite):
            ax.legend(fontsize=8)
    fig.suptitle("Where landmark and non-landmark queries score: GAP is high when the purple mass sits left of "
                 "the green", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def per_class_accuracy(predictions: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """landmark_id, accuracy, queries per class over the landmark queries (first truth label),
    hardest first; a query without a prediction counts as wrong."""
    landmark_truth = truth[truth["landmarks"].map(lambda x: x is not None and len(x) > 0)]
    predicted = predictions.dropna(subset=["landmark_id"]).set_index("id")["landmark_id"]
    guess = predicted.reindex(landmark_truth["id"]).to_numpy()
    correct = [not pd.isna(g) and int(g) in labels for g, labels in zip(guess, landmark_truth["landmarks"])]
    frame = pd.DataFrame({"landmark_id": [int(labels[0]) for labels in landmark_truth["landmarks"]],
                          "correct": correct})
    return (frame.groupby("landmark_id")["correct"].agg(["mean", "size"])
            .rename(columns={"mean": "accuracy", "size": "queries"})
            .reset_index().sort_values(["accuracy", "queries", "landmark_id"], ascending=[True, False, True])
            .reset_index(drop=True))


def plot_per_class_accuracy(per_class: pd.DataFrame, path: Path, max_bars: int = 60) -> None:
    """One bar per landmark (hardest first) when there are few; otherwise a histogram over classes."""
    plt = _pyplot()
    if len(per_class) <= max_bars:
        fig, ax = plt.subplots(figsize=(max(6.5, 0.2 * len(per_class) + 2), 4))
        x = np.arange(len(per_class))
        colours = [WRONG if a < 0.5 else CORRECT for a in per_class["accuracy"]]
        ax.bar(x, per_class["accuracy"], color=colours)
        ax.set_xticks(x, per_class["landmark_id"].astype(str), rotation=90, fontsize=7)
        for xi, (a, q) in enumerate(zip(per_class["accuracy"], per_class["queries"])):
            ax.text(xi, a + 0.01, str(q), ha="center", va="bottom", fontsize=6, color=NEUTRAL)
        ax.set(xlabel="landmark id (hardest first; number above a bar: test queries)", ylim=(0, 1.1))
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.hist(per_class["accuracy"], bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
        ax.set(xlabel="top-1 accuracy of a landmark", ylabel="landmarks")
    mean = per_class["accuracy"].mean() if len(per_class) else float("nan")
    ax.set_title(f"Per-class top-1 accuracy over test queries ({len(per_class)} landmarks, "
                 f"mean over classes {mean:.2f})", fontsize=10)
    if len(per_class) <= max_bars:
        ax.set_ylabel("top-1 accuracy")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)

"""Figures: the train stage's learning curves; the score stage's example queries with their neighbours,
precision against rank, score distributions, per-class accuracy, the most confused landmarks, and
saliency (where a query and its top neighbour match). Each function takes the tables (or, for saliency,
the images) its stage computed and writes one PNG atomically; matplotlib runs headless (Agg). No torch
here: train.py and score.py run the model.
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


def plot_curves(metrics: list[dict], path: Path) -> None:
    """The train stage's curves.png: training loss, and val GAP / accuracy (train accuracy of classifier
    heads beside them, and the val GAP before the learned whitening when there is one) per epoch, epoch 0
    being the untrained model."""
    plt = _pyplot()
    frame = pd.DataFrame(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if len(frame):
        axes[0].plot(frame["epoch"], frame["train_loss"], marker="o")
        axes[1].plot(frame["epoch"], frame["val_gap"], marker="o", label="val GAP")
        axes[1].plot(frame["epoch"], frame["val_accuracy"], marker="s", label="val top-1 accuracy")
        if "val_gap_unwhitened" in frame:  # train.whitening: learned; val GAP above is the whitened one
            axes[1].plot(
                frame["epoch"], frame["val_gap_unwhitened"], marker="o", linestyle=":", label="val GAP, not whitened"
            )
        if "train_accuracy" in frame and frame["train_accuracy"].notna().any():
            axes[1].plot(
                frame["epoch"], frame["train_accuracy"], marker=".", linestyle="--", label="train accuracy (head)"
            )
        axes[1].legend()
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="validation (kNN vs train)", xlabel="epoch", ylim=(0, 1))
    fig.tight_layout()
    _save(fig, path)


def pick_examples(ranked: pd.DataFrame, per_group: int = 2) -> list[tuple[str, pd.Series]]:
    """(group, prediction row) for the example figure, from `ranked` (score order, best first):
    the most and least confident correct predictions, the most confident wrong predictions on
    landmark queries, and the most confident predictions on non-landmark queries (always wrong)."""
    correct = ranked[ranked["correct"]]
    top_correct = correct.head(per_group)
    bottom_correct = correct.iloc[max(len(top_correct), len(correct) - per_group) :].iloc[::-1]
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
        ax.text(
            0.5,
            0.5,
            "image not\navailable",
            ha="center",
            va="center",
            fontsize=7,
            color=NEUTRAL,
            transform=ax.transAxes,
        )
    else:
        ax.imshow(image)


def _landmark_text(value) -> str:
    return "non-landmark" if value is None or pd.isna(value) else f"landmark {int(value)}"


def plot_examples(
    ranked: pd.DataFrame,
    neighbours: pd.DataFrame | None,
    images: ShardImages,
    path: Path,
    k: int = 5,
    per_group: int = 2,
) -> None:
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
    fig, axes = plt.subplots(
        n_rows,
        k + 1,
        figsize=(1.75 * (k + 1) + 0.4, 2.05 * n_rows),
        squeeze=False,
        gridspec_kw={"wspace": 0.08, "hspace": 0.75},
    )
    for ax in axes.flat:
        ax.axis("off")
    if not examples:
        axes[0, 0].text(0, 0.5, "no predictions to show", fontsize=10)
    previous_group = None
    for r, (group, row) in enumerate(examples):
        _draw_example_query(axes[r, 0], row, images, group if group != previous_group else None)
        previous_group = group
        _draw_example_neighbours(axes[r, 1:], by_query.get(row["id"], pd.DataFrame()), row["truth_landmark_id"], images)
    shown = {group for group, _ in examples}
    empty = [group for group, _ in EXAMPLE_GROUPS if group not in shown]
    note = f"\n(nothing to show for: {'; '.join(empty)})" if empty and examples else ""
    fig.suptitle(
        f"Test queries (left) and their top-{k} database neighbours: green = the query's landmark, red = another{note}",
        fontsize=9,
        y=1 - 0.12 / n_rows,
    )
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.75 / n_rows, bottom=0.02)
    _save(fig, path)


def _draw_example_query(ax, row: pd.Series, images: ShardImages, heading: str | None) -> None:
    """A query of plot_examples, framed by its verdict; `heading`: its group, over the group's first row."""
    ax.axis("on")
    _show(ax, images.thumbnail(row["id"]))
    verdict = CORRECT if row["correct"] else (WRONG if row["is_landmark"] else NON_LANDMARK)
    _frame(ax, verdict, 5)
    ax.set_title(
        f"query {str(row['id'])[:14]}\ntruth: {_landmark_text(row['truth_landmark_id'])}\n"
        f"predicted {int(row['landmark_id'])}, score {row['score']:.3f}",
        fontsize=6.5,
        color=verdict,
        loc="left",
    )
    if heading is not None:
        _group_heading(ax, heading.upper(), dict(EXAMPLE_GROUPS)[heading], offset=38)


def _draw_example_neighbours(axes, kept: pd.DataFrame, truth, images: ShardImages) -> None:
    """A query's kept neighbours in rank order, one per axes, framed green when they show its landmark."""
    for ax, (_, n) in zip(axes, kept.iterrows()):
        ax.axis("on")
        _show(ax, images.thumbnail(n["neighbour_id"]))
        label = n["neighbour_landmark_id"]
        right = not pd.isna(truth) and not pd.isna(label) and int(label) == int(truth)
        colour = CORRECT if right else WRONG
        _frame(ax, colour, 3)
        label_text = "no label" if pd.isna(label) else f"lm {int(label)}"
        ax.set_title(f"#{int(n['rank'])}  {label_text}\ncos {n['cosine']:.3f}", fontsize=6.5, color=colour)


def plot_precision_vs_rank(
    ranked: pd.DataFrame,
    ranked_raw: pd.DataFrame | None,
    path: Path,
    *,
    gap: float | None = None,
    gap_raw: float | None = None,
) -> None:
    """Precision at each rank as GAP walks the predictions (by confidence), after and before the
    non-landmark reranking; ticks along the bottom mark where wrong predictions sit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))

    def label(name, value):
        return name if value is None or pd.isna(value) else f"{name} (GAP {value:.3f})"

    if len(ranked):
        ax.plot(
            ranked["rank"],
            ranked["precision_at_rank"],
            color="tab:blue",
            lw=2,
            label=label("ranked by confidence", gap),
        )
        if ranked_raw is not None and not np.array_equal(ranked_raw["id"].to_numpy(), ranked["id"].to_numpy()):
            ax.plot(
                ranked_raw["rank"],
                ranked_raw["precision_at_rank"],
                color="tab:gray",
                lw=1.5,
                ls="--",
                label=label("ranked by raw top-1 cosine (no reranking)", gap_raw),
            )
        if len(ranked) <= 20000:  # a rug of individual mistakes stays readable up to here
            _plot_mistake_rug(ax, ranked)
    else:
        ax.text(0.5, 0.5, "no predictions", ha="center", transform=ax.transAxes)
    ax.set(
        xlabel="rank (all test predictions, most confident first)",
        ylabel="precision at rank",
        ylim=(0, 1.03),
        xlim=(0.5, max(1, len(ranked)) + 0.5),
        title="Precision against rank",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    _save(fig, path)


def _plot_mistake_rug(ax, ranked: pd.DataFrame) -> None:
    """Ticks along the bottom of plot_precision_vs_rank at the ranks of wrong landmarks and of
    non-landmark queries."""
    for mask, colour, name in (
        (ranked["is_landmark"] & ~ranked["correct"], WRONG, "wrong landmark"),
        (~ranked["is_landmark"], NON_LANDMARK, "non-landmark query"),
    ):
        ranks = ranked.loc[mask, "rank"]
        if len(ranks):
            ax.plot(
                ranks,
                np.full(len(ranks), 0.015),
                "|",
                color=colour,
                ms=9,
                mew=1,
                label=f"{name} at this rank ({len(ranks)})",
            )


def plot_score_distributions(ranked: pd.DataFrame, path: Path) -> None:
    """Histograms of the confidence of correct / wrong landmark predictions and of predictions on
    non-landmark queries; a second panel shows the raw top-1 cosine when reranking changed it."""
    plt = _pyplot()
    reranked = "top_cosine" in ranked and not np.allclose(ranked["score"], ranked["top_cosine"], equal_nan=True)
    columns = (
        [("top_cosine", "raw top-1 cosine (before reranking)"), ("score", "confidence after reranking")]
        if reranked
        else [("score", "confidence score")]
    )
    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 4), squeeze=False)
    groups = [
        ("correct landmark prediction", ranked["correct"], CORRECT),
        ("wrong landmark prediction", ranked["is_landmark"] & ~ranked["correct"], WRONG),
        ("non-landmark query", ~ranked["is_landmark"], NON_LANDMARK),
    ]
    for ax, (column, title) in zip(axes[0], columns):
        values = ranked[column].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        bins = np.linspace(finite.min(), finite.max() + 1e-9, 31) if len(finite) > 1 else 10
        for name, mask, colour in groups:
            part = values[mask.to_numpy() & np.isfinite(values)]
            if len(part):
                ax.hist(
                    part,
                    bins=bins,
                    density=True,
                    histtype="stepfilled",
                    alpha=0.35,
                    color=colour,
                    edgecolor=colour,
                    lw=1.5,
                    label=f"{name} ({len(part)})",
                )
        ax.set(xlabel=title, ylabel="density (area of each group = 1)", title=title)
        ax.grid(alpha=0.3)
        if len(finite):
            ax.legend(fontsize=8)
    fig.suptitle(
        "Where landmark and non-landmark queries score: GAP is high when the purple mass sits left of the green",
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, path)


def per_class_accuracy(predictions: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """landmark_id, accuracy, queries per class over the landmark queries (first truth label),
    hardest first; a query without a prediction counts as wrong."""
    landmark_truth = truth[truth["landmarks"].map(lambda x: x is not None and len(x) > 0)]
    predicted = predictions.dropna(subset=["landmark_id"]).set_index("id")["landmark_id"]
    guess = predicted.reindex(landmark_truth["id"]).to_numpy()
    correct = [not pd.isna(g) and int(g) in labels for g, labels in zip(guess, landmark_truth["landmarks"])]
    frame = pd.DataFrame(
        {"landmark_id": [int(labels[0]) for labels in landmark_truth["landmarks"]], "correct": correct}
    )
    return (
        frame.groupby("landmark_id")["correct"]
        .agg(["mean", "size"])
        .rename(columns={"mean": "accuracy", "size": "queries"})
        .reset_index()
        .sort_values(["accuracy", "queries", "landmark_id"], ascending=[True, False, True])
        .reset_index(drop=True)
    )


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
    ax.set_title(
        f"Per-class top-1 accuracy over test queries ({len(per_class)} landmarks, mean over classes {mean:.2f})",
        fontsize=10,
    )
    if len(per_class) <= max_bars:
        ax.set_ylabel("top-1 accuracy")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# Confusions between landmarks


NO_PREDICTION, OTHER_LANDMARK = "no prediction", "other landmark"


def landmark_outcomes(predictions: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """One row per landmark query (first truth label): id, truth_landmark_id, predicted_landmark_id
    (NA: no prediction) and correct (the prediction is one of the query's labels)."""
    landmark_truth = truth[truth["landmarks"].map(lambda x: x is not None and len(x) > 0)]
    predicted = predictions.dropna(subset=["landmark_id"]).set_index("id")["landmark_id"]
    guess = predicted.reindex(landmark_truth["id"]).to_numpy()
    return pd.DataFrame(
        {
            "id": landmark_truth["id"].to_numpy(),
            "truth_landmark_id": np.array([int(labels[0]) for labels in landmark_truth["landmarks"]], dtype=np.int64),
            "predicted_landmark_id": pd.array([None if pd.isna(g) else int(g) for g in guess], dtype="Int64"),
            "correct": np.array(
                [not pd.isna(g) and int(g) in labels for g, labels in zip(guess, landmark_truth["landmarks"])],
                dtype=bool,
            ),
        }
    )


def confused_pairs(outcomes: pd.DataFrame) -> pd.DataFrame:
    """(truth_landmark_id, predicted_landmark_id, queries): landmark queries given another landmark,
    most frequent pair first (ties by ids)."""
    wrong = outcomes[~outcomes["correct"] & outcomes["predicted_landmark_id"].notna()]
    pairs = wrong.groupby(["truth_landmark_id", "predicted_landmark_id"]).size().rename("queries").reset_index()
    pairs["predicted_landmark_id"] = pairs["predicted_landmark_id"].astype(np.int64)
    return pairs.sort_values(
        ["queries", "truth_landmark_id", "predicted_landmark_id"], ascending=[False, True, True]
    ).reset_index(drop=True)


def most_confused_landmarks(outcomes: pd.DataFrame, max_landmarks: int = 20) -> list[int]:
    """The landmarks involved in the most mistakes on landmark queries, at most `max_landmarks` (all of
    them when fewer are involved): a wrong prediction counts for its true and its predicted landmark, a
    query without a prediction for its true landmark. Most involved first, ties by id."""
    wrong = outcomes[~outcomes["correct"]]
    involved = pd.concat(
        [wrong["truth_landmark_id"].astype(np.int64), wrong["predicted_landmark_id"].dropna().astype(np.int64)]
    )
    counts = involved.value_counts()
    order = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [int(landmark) for landmark, _ in order[:max_landmarks]]


def confusion_matrix(outcomes: pd.DataFrame, landmarks: list[int]) -> pd.DataFrame:
    """Query counts, rows = true landmark, columns = predicted landmark, both over `landmarks` (in that
    order); then an "other landmark" column (predicted outside `landmarks`) and a "no prediction"
    column, each only when it has any query."""
    rows = outcomes[outcomes["truth_landmark_id"].isin(landmarks)]
    predicted = rows["predicted_landmark_id"]
    column = [NO_PREDICTION if pd.isna(p) else (int(p) if int(p) in landmarks else OTHER_LANDMARK) for p in predicted]
    table = pd.crosstab(
        pd.Series(rows["truth_landmark_id"].to_numpy(), name="truth"), pd.Series(column, name="predicted", dtype=object)
    )
    extra = [name for name in (OTHER_LANDMARK, NO_PREDICTION) if name in table.columns]
    return table.reindex(index=landmarks, columns=list(landmarks) + extra, fill_value=0).astype(np.int64)


def plot_confusion(outcomes: pd.DataFrame, path: Path, max_landmarks: int = 20) -> None:
    """The confusion matrix of the landmarks involved in the most mistakes (`most_confused_landmarks`):
    correct counts (the diagonal) in green, mistakes in red, darker for more queries, counts written
    in the cells. Without any mistake, a figure that says so."""
    plt = _pyplot()
    landmarks = most_confused_landmarks(outcomes, max_landmarks)
    if not landmarks:
        _plot_no_confusion(plt, outcomes, path)
        return
    matrix = confusion_matrix(outcomes, landmarks)
    counts = matrix.to_numpy()
    n_rows, n_cols = counts.shape
    rgb, intensity = _confusion_colours(matrix)
    cell = 0.42
    fig, ax = plt.subplots(figsize=(max(6.5, cell * n_cols + 2.6), max(4.2, cell * n_rows + 2.4)))
    ax.imshow(rgb, aspect="equal", interpolation="nearest")
    font = 8 if max(n_rows, n_cols) <= 12 else 6.5
    for r in range(n_rows):
        for c in range(n_cols):
            if counts[r, c]:
                ax.text(
                    c,
                    r,
                    str(counts[r, c]),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if intensity[r, c] > 0.6 else "black",
                )
    _label_confusion_axes(ax, matrix, outcomes, len(landmarks), font)
    wrong = outcomes[~outcomes["correct"]]
    involved = len(most_confused_landmarks(outcomes, max_landmarks=2 * len(wrong)))  # all of them
    shown = f"All {involved}" if involved == len(landmarks) else f"The {len(landmarks)} most confused of {involved}"
    ax.set_title(
        f"Most confused landmarks over the test landmark queries\n{shown} landmarks involved in mistakes\n"
        f"{int(wrong['predicted_landmark_id'].notna().sum())} wrong landmark, "
        f"{int(wrong['predicted_landmark_id'].isna().sum())} without a prediction, of {len(outcomes)} "
        f"queries (green: correct, red: mistake)",
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, path)


def _plot_no_confusion(plt, outcomes: pd.DataFrame, path: Path) -> None:
    """plot_confusion's figure when no landmark query was given another landmark: a sentence saying so."""
    fig, ax = plt.subplots(figsize=(6, 2.2))
    ax.axis("off")
    message = (
        f"No mistakes on the {len(outcomes)} landmark test queries:\nevery one was given its own landmark."
        if len(outcomes)
        else "No landmark test queries: no confusion matrix."
    )
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, transform=ax.transAxes)
    ax.set_title("Most confused landmarks", fontsize=11)
    _save(fig, path)


def _confusion_colours(matrix: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, intensity) of a confusion matrix: green on the diagonal, red off it, white for 0."""
    counts = matrix.to_numpy()
    correct = np.array([[row == col for col in matrix.columns] for row in matrix.index])
    # Mistakes and correct counts each scaled to their own largest count: a few mistakes beside many
    # correct queries still stand out.
    scale = np.where(correct, max(1, counts[correct].max(initial=0)), max(1, counts[~correct].max(initial=0)))
    intensity = np.where(counts > 0, 0.25 + 0.75 * counts / scale, 0.0)
    green, red = np.array([0.10, 0.60, 0.31]), np.array([0.84, 0.19, 0.15])
    colour = np.where(correct[..., None], green, red)
    rgb = 1 - intensity[..., None] * (1 - colour)  # white for 0, the full colour for the largest count
    return rgb, intensity


def _label_confusion_axes(ax, matrix: pd.DataFrame, outcomes: pd.DataFrame, n_landmarks: int, font: float) -> None:
    """Tick labels (true landmarks with their query counts; the non-landmark columns in italics, set
    apart), the cell grid and the axis labels."""
    n_rows, n_cols = matrix.shape
    queries = outcomes["truth_landmark_id"].value_counts()
    ax.set_yticks(range(n_rows), [f"{lm}  (n={int(queries.get(lm, 0))})" for lm in matrix.index], fontsize=font)
    ax.set_xticks(range(n_cols), [str(col) for col in matrix.columns], rotation=90, fontsize=font)
    for extra in range(n_landmarks, n_cols):  # the non-landmark columns, set apart
        ax.get_xticklabels()[extra].set_fontstyle("italic")
    if n_cols > n_landmarks:
        ax.axvline(n_landmarks - 0.5, color=NEUTRAL, lw=1.2)
    ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#dddddd", lw=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted landmark")
    ax.set_ylabel("true landmark (n: its queries)")


# ---------------------------------------------------------------------------------------------------
# Saliency: where the query and its top neighbour match


SALIENCY_GROUPS = (("most confident", "tab:blue"), ("least confident", "tab:orange"))


def pick_saliency_examples(ranked: pd.DataFrame, per_group: int = 4) -> list[tuple[str, pd.Series]]:
    """(group, prediction row): the `per_group` most and least confident predictions on landmark
    queries (`ranked` is in score order, best first; a query is never in both groups)."""
    landmark = ranked[ranked["is_landmark"]]
    top = landmark.head(per_group)
    bottom = landmark.iloc[max(len(top), len(landmark) - per_group) :].iloc[::-1]
    frames = zip((name for name, _ in SALIENCY_GROUPS), (top, bottom))
    return [(name, row) for name, frame in frames for _, row in frame.iterrows()]


SALIENCY_HEADERS = (
    "query (as the model sees it)",
    "query: what matches the neighbour",
    "top-1 neighbour",
    "neighbour: what matches the query",
)


def plot_saliency(panels: list[dict], path: Path, note: str = "") -> None:
    """One row per example: the query as the model sees it, where it resembles its top-1 neighbour
    (saliency overlay), the neighbour, and where the neighbour resembles the query. `panels` items:
    group, query_id, truth_landmark_id, landmark_id (predicted), score, correct, neighbour_id,
    neighbour_landmark_id, cosine, and the four images query_view, query_overlay, neighbour_view,
    neighbour_overlay (None: not available)."""
    plt = _pyplot()
    n_rows = max(1, len(panels))
    height = 2.45 * n_rows + 1.1  # inches; the top 1.0 for the suptitle and the first group's heading
    fig, axes = plt.subplots(
        n_rows, 4, figsize=(9.2, height), squeeze=False, gridspec_kw={"wspace": 0.06, "hspace": 0.42}
    )
    for ax in axes.flat:
        ax.axis("off")
    if not panels:
        axes[0, 0].text(0, 0.5, f"no landmark query with a prediction to show{note}", fontsize=10)
    previous_group = None
    for r, panel in enumerate(panels):
        _draw_saliency_row(axes[r], panel)
        if r == 0 or panel["group"] != previous_group:
            _draw_saliency_heading(axes[r], panel["group"])
            previous_group = panel["group"]
    fig.suptitle(
        "Where a query and its top-1 neighbour match (Grad-CAM on their cosine: red = pulls the "
        f"embeddings together){note}",
        fontsize=9,
        y=1 - 0.12 / height,
        va="top",
    )
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 1.0 / height, bottom=0.05 / height)
    _save(fig, path)


def _neighbour_colour(panel: dict) -> str:
    """Grey without a neighbour, green when the neighbour shows the query's true landmark, red if not."""
    if panel.get("neighbour_id") is None:
        return NEUTRAL
    label = panel.get("neighbour_landmark_id")
    right = label is not None and not pd.isna(label) and int(label) == int(panel["truth_landmark_id"])
    return CORRECT if right else WRONG


def _draw_saliency_row(axes, panel: dict) -> None:
    """One example of plot_saliency: its four images, framed, with the query's and the neighbour's titles."""
    verdict = CORRECT if panel["correct"] else WRONG
    mark = "\u2713 right" if panel["correct"] else "\u2717 wrong"
    neighbour_label, neighbour_id = panel.get("neighbour_landmark_id"), panel.get("neighbour_id")
    neighbour_colour = _neighbour_colour(panel)
    images = (
        panel.get("query_view"),
        panel.get("query_overlay"),
        panel.get("neighbour_view"),
        panel.get("neighbour_overlay"),
    )
    for c, image in enumerate(images):
        ax = axes[c]
        ax.axis("on")
        _show(ax, image)
        if image is None:
            ax.set_aspect("equal")  # square like the model's views
        _frame(ax, verdict if c < 2 else neighbour_colour, 4 if c in (0, 2) else 1.5)
    axes[0].set_title(
        f"{mark}  query {str(panel['query_id'])[:16]}\n"
        f"true {_landmark_text(panel['truth_landmark_id'])}\n"
        f"predicted {int(panel['landmark_id'])}, confidence {panel['score']:.3f}",
        fontsize=7,
        color=verdict,
        loc="left",
    )
    cosine = panel.get("cosine")
    cosine_text = "" if cosine is None or pd.isna(cosine) else f", cos {cosine:.3f}"
    axes[2].set_title(
        "no neighbour"
        if neighbour_id is None
        else f"neighbour {str(neighbour_id)[:16]}\n{_landmark_text(neighbour_label)}{cosine_text}",
        fontsize=7,
        color=neighbour_colour,
        loc="left",
    )


def _group_heading(ax, text: str, color, offset: float) -> None:
    """A group's name in bold, `offset` points above the top left corner of its first panel."""
    ax.annotate(
        text,
        xy=(0, 1),
        xycoords="axes fraction",
        xytext=(0, offset),
        textcoords="offset points",
        fontsize=8.5,
        fontweight="bold",
        color=color,
        ha="left",
        va="bottom",
        annotation_clip=False,
    )


def _draw_saliency_heading(axes, group: str) -> None:
    """Over the first row of a group: the overlay columns' headers and the group's name."""
    for c, header in enumerate(SALIENCY_HEADERS):
        if c in (1, 3):
            axes[c].set_title(header, fontsize=7, color=NEUTRAL)
    _group_heading(axes[0], f"{group.upper()} LANDMARK QUERIES", dict(SALIENCY_GROUPS).get(group, NEUTRAL), offset=34)

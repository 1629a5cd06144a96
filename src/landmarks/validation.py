"""The val GAP that picks training's epoch, and the embedding passes training makes.

Every epoch (and the untrained model, as epoch 0) is scored the same way: the val images, plus a fixed
sample of the non-landmark bank as non-landmark queries (`val_queries`), are embedded and matched
against the train images by top-1 neighbour and scored with GAP (`evaluate_val_gap`), like the test
set is later. The passes over images (`embed_index`; `embed_for_training` with training's settings,
also used for the subspace clusters and the pretrained initialisation) are divided between the
processes and run in a forked random state, so evaluating never changes what training draws next.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .distributed import Distributed
from .embedding import embed_dataset, model_input, run_model
from .loader import ShardDataset, ShardIndex, eval_transform
from .model import LandmarkModel
from .whitening import apply_whitening, fit_whitening

# Folds of val's landmarks for retrieve's threshold (`threshold_folds`): each costs retrieve one more
# database index; 2, 3 and 4 chose thresholds as good on the real-photo benchmark's runs.
THRESHOLD_FOLDS = 2


@torch.no_grad()
def embed_index(
    model: LandmarkModel,
    index: ShardIndex,
    image_size: int,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    dist: Distributed,
    amp: bool = True,
    pooled: bool = False,
) -> np.ndarray:
    """L2-normalised embeddings (len(index), dim), float32, in index order, on every process; with
    `pooled`, the backbone's pooled descriptors instead (not normalised, before the neck).

    Each process embeds a contiguous slice of the index; the slices are then summed across processes.
    Runs in a forked random state, so that evaluating never changes what training draws next.
    """
    out = np.zeros((len(index), model.channels if pooled else model.embedding_dim), np.float32)
    if len(index):
        dataset = ShardDataset(
            index,
            eval_transform(image_size, model.data_config["mean"], model.data_config["std"]),
            rank=dist.rank,
            world_size=dist.world_size,
            balance="none",
        )

        def embed_batch(images: torch.Tensor) -> np.ndarray:
            embedding = run_model(model, model_input(images, device), device, amp=amp, pooled=pooled)
            return (embedding if pooled else F.normalize(embedding, dim=1)).cpu().numpy()

        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            embed_dataset(model, dataset, embed_batch, out, batch_size=batch_size, workers=workers, device=device)
    if dist.active:
        # Chunks keep the collective's buffer on the GPU small.
        shared = torch.from_numpy(out)
        for start in range(0, len(out), 65536):
            shared[start : start + 65536] = dist.all_reduce(shared[start : start + 65536].contiguous())
    return out


def embed_for_training(
    model: LandmarkModel, index: ShardIndex, settings: dict, device, dist: Distributed, *, pooled: bool = False
) -> np.ndarray:
    """embed_index as training runs it: its image size and AMP, batches twice the training batch (no
    gradients are kept), its workers."""
    return embed_index(
        model,
        index,
        settings["image_size"],
        batch_size=settings["batch_size"] * 2,
        workers=settings["workers"],
        device=device,
        dist=dist,
        amp=settings["amp"],
        pooled=pooled,
    )


def val_queries(val_index: ShardIndex, bank_index: ShardIndex, settings: dict) -> ShardIndex:
    """The val queries: the val images, plus `val_nonlandmark_ratio` x as many non-landmark photos of the
    bank (a fixed sample) as non-landmark queries, so that val GAP, like the test's, also pays for
    confident predictions on photos that show no landmark."""
    wanted = min(len(bank_index), round(settings["val_nonlandmark_ratio"] * len(val_index)))
    if wanted == 0 or len(val_index) == 0:
        return val_index
    rows = np.sort(
        np.random.default_rng([settings["seed"] & 0xFFFFFFFF, 13]).choice(len(bank_index), wanted, replace=False)
    )
    bank = bank_index.table.iloc[rows].assign(landmark_id=pd.NA)
    table = pd.concat([val_index.table, bank], ignore_index=True)
    table["landmark_id"] = table["landmark_id"].astype("Int64")
    return ShardIndex(table)


def evaluate_val_gap(
    model, train_index: ShardIndex, val_index: ShardIndex, settings: dict, device, dist: Distributed | None = None
) -> dict:
    """GAP / accuracy of top-1 kNN on the val queries against train, as the model selection criterion
    (val_index may hold non-landmark queries: rows without a landmark_id).

    With `whitening: learned` the whitening is fitted on the train embeddings first and both sides are
    whitened, as model.pt would embed them: the result then also holds the GAP before whitening
    (`val_gap_unwhitened`) and, on the main process, the whitening model.pt would carry (`whitening`; None
    elsewhere): with `whitening_from: train+val`, fitted again on the train and the val landmark photos
    together once val has judged (every labelled photo; one train photo per landmark then gets one too)."""
    dist = dist or Distributed(device=device)
    if len(val_index) == 0 or len(train_index) == 0:
        return {"val_gap": float("nan"), "val_accuracy": float("nan"), "whitening": None}
    db = embed_for_training(model, train_index, settings, device, dist)
    queries = embed_for_training(model, val_index, settings, device, dist)
    result, whitening = None, None
    if dist.is_main:
        db_labels = train_index.table["landmark_id"].to_numpy(dtype=np.int64)
        result = top1_scores(db, db_labels, queries, val_index.table)
        if settings["whitening"] == "learned":
            whitening = fit_whitening(db, db_labels, settings["whitening_shrinkage"], settings["whitening_power"])
        if whitening is not None:
            whitened = top1_scores(
                apply_whitening(db, whitening), db_labels, apply_whitening(queries, whitening), val_index.table
            )
            result = {**whitened, "val_gap_unwhitened": result["val_gap"]}
        if settings["whitening"] == "learned" and settings["whitening_from"] == "train+val":
            whitening = fit_whitening_on_train_and_val(db, db_labels, queries, val_index, settings)
    return {**dist.broadcast_object(result), "whitening": whitening}


def fit_whitening_on_train_and_val(db, db_labels, queries, val_index: ShardIndex, settings: dict) -> dict | None:
    """The whitening of the train and val landmark photos' embeddings (val's non-landmark queries left out),
    with its `folds` (`threshold_folds`) when there is one."""
    landmark = val_index.table["landmark_id"].notna().to_numpy()
    val, val_labels = queries[landmark], val_index.table["landmark_id"][landmark].to_numpy(dtype=np.int64)
    fit = lambda embeddings, labels: fit_whitening(  # noqa: E731
        embeddings, labels, settings["whitening_shrinkage"], settings["whitening_power"]
    )
    whitening = fit(np.concatenate([db, val]), np.concatenate([db_labels, val_labels]))
    if whitening is not None:
        whitening["folds"] = threshold_folds(db, db_labels, val, val_labels, settings["seed"], fit)
    return whitening


def threshold_folds(db, db_labels, val, val_labels, seed: int, fit) -> list[dict]:
    """Whitenings that leave val photos out, for retrieve's non-landmark threshold. A whitening fitted on
    a val photo pulls it towards its train photos, so val would read every answer as surer than a new
    photo's and set the threshold too high (web few-shot: 0.44 of test decisions right against 0.58 by
    keeping every answer). val's landmarks are dealt into THRESHOLD_FOLDS folds; each fold gets the
    whitening of the train photos and the other folds' val photos (None: nothing to whiten), and
    retrieve answers each val photo with the whitening of its fold."""
    landmarks = np.unique(val_labels)
    np.random.default_rng([seed, 31]).shuffle(landmarks)
    folds = []
    for fold in range(min(THRESHOLD_FOLDS, len(landmarks))):
        held_out = np.isin(val_labels, landmarks[fold::THRESHOLD_FOLDS])
        whitening = fit(np.concatenate([db, val[~held_out]]), np.concatenate([db_labels, val_labels[~held_out]]))
        folds.append({"val_landmarks": np.sort(landmarks[fold::THRESHOLD_FOLDS]), "whitening": whitening})
    return folds


def top1_scores(db: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, query_table: pd.DataFrame) -> dict:
    """val GAP and accuracy of each query's nearest train image's landmark, ranked by its cosine, and how
    many landmark queries it answers right (`val_right`)."""
    from .index import knn
    from .metrics import score_predictions

    cosines, positions = knn(db, queries, 1)
    predictions = pd.DataFrame(
        {"id": query_table["id"], "landmark_id": db_labels[positions[:, 0]], "score": cosines[:, 0]}
    )
    truth = pd.DataFrame(
        {"id": query_table["id"], "landmarks": [[] if pd.isna(x) else [int(x)] for x in query_table["landmark_id"]]}
    )
    scores = score_predictions(predictions, truth)
    return {"val_gap": float(scores.gap), "val_accuracy": float(scores.accuracy), "val_right": scores.n_correct}

"""Several crops of each photo instead of its centred square, measured offline on finished runs.

A photo's centred square drops the ends of a wide photo (a skyline, a façade seen whole) and shows a
distant landmark small. Sub-window matching (Razavian et al., "Visual instance retrieval with deep
convolutional networks", 2016) embeds several windows of each photo and lets a pair of photos match on
their best pair of windows. Views per photo, each at the run's embedding size:
  centre  the centred square (what `embed` stores)
  start   the square at the start of the longer side (left, or top)
  end     the square at its end (right, or bottom)
  zoom    the centred square's middle 70%, enlarged

Settings (the nearest database photo's landmark, ranked by the cosine: no reranking, no verification):
  plain            centre against centre (the stored embeddings' search)
  query_max        every query view against the database centres, the best cosine
  both_max         every query view against every database view, the best cosine
  query_mean       the query's views averaged, against the database centres
  both_mean        the views averaged on both sides

    .venv/bin/python bench/multi_crop.py bench/out/*/full-seed*/results --experiments pretrained finetuned
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from neighbour_smoothing import (  # noqa: E402
    compare_settings,
    gaps_of,
    model_and_embed_size,
    nearest_neighbour,
    query_photo_ids,
)

from landmarks.common import read_table  # noqa: E402
from landmarks.embedding import embed_dataset, model_input, run_model  # noqa: E402
from landmarks.loader import ShardDataset, ShardIndex  # noqa: E402
from landmarks.score import truth_from_selection  # noqa: E402

VIEWS = ("centre", "start", "end", "zoom")
ZOOM = 0.7


class CropViews:
    """One decoded photo -> its VIEWS as normalised tensors of size x size."""

    def __init__(self, size: int, mean, std):
        self.size = size
        self.resize = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)
        self.finish = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __call__(self, image):
        image = self.resize(image)
        width, height = image.size
        s = self.size
        if width >= height:
            boxes = [(int(round((width - s) / 2)), 0), (0, 0), (width - s, 0)]
        else:  # torchvision's CenterCrop rounds the offset the same way
            boxes = [(0, int(round((height - s) / 2))), (0, 0), (0, height - s)]
        views = [image.crop((x, y, x + s, y + s)) for x, y in boxes]
        inner = int(round(s * ZOOM))
        x, y = boxes[0][0] + (s - inner) // 2, boxes[0][1] + (s - inner) // 2
        views.append(image.crop((x, y, x + inner, y + inner)).resize((s, s), 3))
        return tuple(self.finish(view) for view in views)


@torch.no_grad()
def embed_views(model, views) -> np.ndarray:
    """(batch, len(VIEWS), dim): each view's L2-normalised embedding."""
    device = torch.device("cpu")
    out = [F.normalize(run_model(model, model_input(v, device), device, amp=False), dim=1) for v in views]
    return torch.stack(out, dim=1).reshape(len(out[0]), -1).numpy()


def crop_embeddings(model, shards: Path, size: int) -> tuple[np.ndarray, pd.DataFrame]:
    index = ShardIndex.from_dirs(sorted(shards.glob("part-*")))
    dim = model.embedding_dim
    out = np.zeros((len(index), len(VIEWS) * dim), np.float32)
    dataset = ShardDataset(index, CropViews(size, model.data_config["mean"], model.data_config["std"]))
    model.to(memory_format=torch.channels_last)
    embed_dataset(
        model,
        dataset,
        lambda views: embed_views(model, views),
        out,
        batch_size=32,
        workers=0,
        device=torch.device("cpu"),
    )
    return out.reshape(len(index), len(VIEWS), dim), index.table


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def best_cosines(queries: np.ndarray, db: np.ndarray) -> np.ndarray:
    """(n_query, n_db): the best cosine over every pair of views (views on axis 1 of each)."""
    return np.einsum("qvd,nwd->qnvw", queries, db).reshape(len(queries), len(db), -1).max(axis=2)


def settings(queries: np.ndarray, db: np.ndarray) -> dict[str, np.ndarray]:
    centre_q, centre_db = queries[:, :1], db[:, :1]
    mean_q, mean_db = normalise(queries.mean(axis=1))[:, None], normalise(db.mean(axis=1))[:, None]
    return {
        "plain": best_cosines(centre_q, centre_db),
        "query_max": best_cosines(queries, centre_db),
        "both_max": best_cosines(queries, db),
        "query_mean": best_cosines(mean_q, centre_db),
        "both_mean": best_cosines(mean_q, mean_db),
    }


def run_gaps(results: Path, experiment: str) -> dict[str, float]:
    selection = read_table(results / "select" / "selection.parquet")
    truth = truth_from_selection(selection)
    model, size = model_and_embed_size(results, experiment)
    queries, query_table = crop_embeddings(model, results / "shards" / "test", size)
    db, db_table = crop_embeddings(model, results / "shards" / "train", size)
    labels = db_table["landmark_id"].to_numpy().astype(int)
    query_ids = query_photo_ids(results)
    gaps = {}
    for name, cosines in settings(queries, db).items():
        gaps |= gaps_of(name, nearest_neighbour(cosines, query_table["id"], labels), truth, query_ids)
    return gaps


def main() -> int:
    torch.set_num_threads(2)
    return compare_settings(__doc__, run_gaps, "train/model.pt")


if __name__ == "__main__":
    sys.exit(main())

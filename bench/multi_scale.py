"""Multi-scale test-time embedding (`embed.scales`) measured offline on finished runs with their own models.

Image retrieval commonly embeds each photo at several scales and averages the L2-normalised views
(Radenovic et al., PAMI 2018; the Google Landmarks winners used 1/sqrt(2), 1 and sqrt(2)): the same
landmark photographed from farther away or nearer then meets itself at a common scale. This embeds the
test and train shards of each run at every scale below with the run's own model.pt through the embed
stage's own code (`landmarks.embed.compute_embeddings`), then combines the scales as the embed stage
does (each view normalised, the views averaged, the average normalised) and searches:

  plain          1            (what the run's embed stage stored)
  small          1, 0.75      (config.schema.yaml's example)
  down           1, 0.707
  up             1, 1.414
  three          0.707, 1, 1.414

Scales above 1 are read from the run's shards, which hold the photos at the run's embedding size: they
enlarge those, where the pipeline with `embed.scales` set would shard at the largest size (and train
from those shards too). The nearest database photo's landmark is ranked by its cosine (no reranking,
no verification, as the other offline benches). With the run's `sources.csv` (`bench/real_photos.py`
writes it), GAP over the folder's query photos alone is given too (`<setting>_query`: Paris, the web
photos, the issue's few-shot regime).

    .venv/bin/python bench/multi_scale.py bench/out/*/fewshot-seed*/results --experiments pretrained finetuned
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

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
from landmarks.embed import compute_embeddings  # noqa: E402
from landmarks.loader import ShardIndex  # noqa: E402
from landmarks.score import truth_from_selection  # noqa: E402

SETTINGS = {
    "plain": (1.0,),
    "small": (1.0, 0.75),
    "down": (1.0, 0.707),
    "up": (1.0, 1.414),
    "three": (0.707, 1.0, 1.414),
}


def embeddings_by_scale(model, shards: Path, size: int, scales) -> tuple[dict[float, np.ndarray], pd.DataFrame]:
    """Each scale's L2-normalised embeddings of the shards' images (in index order), and the index table."""
    index = ShardIndex.from_dirs(sorted(shards.glob("part-*")))
    views = {
        scale: compute_embeddings(model, index, size, batch_size=32, scales=(scale,), progress=False)
        for scale in scales
    }
    return views, index.table


def combine(views: dict[float, np.ndarray], scales) -> np.ndarray:
    """The embed stage's multi-scale embedding from its single-scale views: their normalised mean."""
    total = sum(views[scale] for scale in scales)
    return total / np.maximum(np.linalg.norm(total, axis=1, keepdims=True), 1e-12)


def run_gaps(results: Path, experiment: str) -> dict[str, float]:
    truth = truth_from_selection(read_table(results / "select" / "selection.parquet"))
    model, size = model_and_embed_size(results, experiment)
    scales = sorted({scale for chosen in SETTINGS.values() for scale in chosen})
    queries, query_table = embeddings_by_scale(model, results / "shards" / "test", size, scales)
    db, db_table = embeddings_by_scale(model, results / "shards" / "train", size, scales)
    labels = db_table["landmark_id"].to_numpy().astype(int)
    query_ids = query_photo_ids(results)
    gaps = {}
    for name, chosen in SETTINGS.items():
        cosines = combine(queries, chosen) @ combine(db, chosen).T
        gaps |= gaps_of(name, nearest_neighbour(cosines, query_table["id"], labels), truth, query_ids)
    return gaps


def main() -> int:
    torch.set_num_threads(2)
    return compare_settings(__doc__, run_gaps, "train/model.pt")


if __name__ == "__main__":
    sys.exit(main())

"""Real-photo quality benchmark: the whole DAG on real landmark and non-landmark photos, as a user runs it.

The photos are `../shared/data` (beside the repository; never copied into it): 5 Paris6k landmarks
(50 Flickr photos each, some of them "junk" views, as in Google Landmarks), 26 web photos of the same
landmarks taken by other cameras, and 50 real non-landmark photos (rooms, offices, one street). They
are served from a local HTTP server on 127.0.0.1 (with one broken link), a Google Landmarks style CSV
(`id,url,landmark_id,split`) points at them, and `snakemake` runs every stage under
`bench/out/real_photos/<regime>-seed<N>/`, exactly as for a user's own CSV.

Queries (the `test` split): the web photos (landmark queries) and half of the non-landmark photos
(non-landmark queries); the other half is the non-landmark bank. Non-landmark photos of one scene (two
frames of a room, the street) go to the same side, so the bank never holds a near copy of a query.
Regimes:
  full     all 250 Paris6k photos; `select` assigns val (10% of each landmark) and train;
  fewshot  5 train photos and 1 val photo per landmark (drawn by the seed): the long tail of Google
           Landmarks, where most landmarks have a handful of photos;
  oneshot  1 train photo and 1 val photo per landmark: the database holds one photo of each landmark.
  longtail each landmark keeps a number of its photos drawn by the seed, log-uniform between 2 and all
           of them (most keep a few, some many: Google Landmarks' head and tail in one database); val
           is 10% of them, and 1 from 3 photos up (select's defaults), the rest train. Not in the
           default regimes; ask for it by name.
In fewshot, oneshot and longtail the Paris6k photos left over that show their landmark (official ground truth
`ok`; the `junk` views stay unused) are queries too: 8 times more landmark queries than the web photos
alone, by other Flickr users. The tables give GAP over each kind of landmark query (with every
non-landmark query) beside the GAP over all of them, and the gain over the untrained backbone on the
query photos alone too: the few-shot regime as if the photos left over were unused (Paris: the web
photos are then the only landmark queries, as in full).
Each regime runs once per seed (`--seeds`): the seed draws the few-shot photos, the val split, the bank
half of the non-landmark photos and the training seed. One web photo moves GAP by ~0.02, so compare
means over seeds, never one run.

Prints one table per regime: every experiment's GAP, GAP on landmark queries only, top-1 accuracy, GAP
ranked by the raw top-1 cosine (no reranking), val GAP, as mean ± standard deviation over the seeds, and
each experiment's GAP minus the untrained backbone's on the same seed. Writes the per-seed values to
`bench/out/real_photos/results-<regimes>.csv` and the tables to `results-<regimes>.md` beside it, after
every run, so a benchmark stopped part-way keeps the seeds it finished. Each run's folder also holds
`sources.csv` (id, source: query, heldout, database, nonlandmark, broken), which tells the offline
benches (`bench/multi_scale.py`) the folder's query photos from the held-out ones.

    .venv/bin/python bench/real_photos.py                          # every regime, seeds 0 1 2 (about 1.5 h on 2 cores)
    .venv/bin/python bench/real_photos.py --regimes fewshot --seeds 0 --experiments pretrained finetuned
    .venv/bin/python bench/real_photos.py --variants               # also the variants that did not win
    .venv/bin/python bench/real_photos.py --test-time --out bench/out/real_photos_test_time  # embedding sizes
    .venv/bin/python bench/real_photos.py --train '{"backbone": "tf_efficientnet_lite2", "pretrained": "efficientnet_lite2_pypi"}'
    .venv/bin/python bench/real_photos.py --embed '{"scales": [1.0, 1.414]}' --out bench/out/two_scales  # shards sized for it
    .venv/bin/python bench/real_photos.py --landmarks ../web_landmarks_asia11 --regimes fewshot full oneshot  # bench/web_landmarks.py's sets
    .venv/bin/python bench/real_photos.py --landmarks ~/my_photos   # your own: one subfolder of photos per landmark

Reruns reuse what Snakemake already computed (downloads, shards, trained models); `--fresh` starts over.
Skips, with the reason, when `../shared/data` is absent.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from landmarks.common import write_text_atomic  # noqa: E402
from landmarks.images import IMAGE_SUFFIXES  # noqa: E402
from landmarks.select import Rules, val_test_quota  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
OUT = REPO / "bench" / "out" / "real_photos"
# labels.csv split value -> role of the photo ("draw": the seed draws queries from them)
ROLES = {"paris6k": "database", "web_query": "query", "train": "database", "test": "query", "all": "draw"}
QUERY_FRACTION = 0.3  # of each landmark's photos, in a folder with no queries of its own
# regime -> (train, val) photos per landmark drawn by the seed; None: select assigns all of them;
# LONG_TAIL: how many photos each landmark keeps is drawn too, then its val and train (keep_long_tail).
LONG_TAIL = "long tail"
REGIMES = {"full": None, "fewshot": (5, 1), "oneshot": (1, 1), "longtail": LONG_TAIL}
DEFAULT_REGIMES = ["full", "fewshot", "oneshot"]
LONG_TAIL_MIN = 2  # photos a landmark keeps at the least (select's min_images_per_class below)
VAL_FRACTION, VAL_MIN_CLASS_IMAGES = Rules().val_fraction, Rules().val_min_class_images

# The experiments every run compares. Every key not set here takes the schema's default, so
# `finetuned` is what a user gets without touching the train/embed/retrieve sections.
EXPERIMENTS = {
    "pretrained": {
        "description": "ImageNet backbone + GeM, not trained",
        "train": {"epochs": 0, "whitening": "none"},
    },
    "finetuned": {"description": "the defaults: fine-tuned"},
}
# Variants measured while choosing the defaults (bench/real_photos.md, "What was tried and did not
# help"); `--variants` adds them.
# Each changes one thing of the defaults, except previous_defaults (the defaults before this benchmark).
VARIANTS: dict[str, dict] = {
    "previous_defaults": {
        "description": "the defaults before this benchmark existed: random 512-d linear neck and ArcFace head, "
        "BatchNorm statistics trained, lr 1e-3, 6 steps per epoch, no WiSE-FT, seed 004 "
        "reranking, no geometric verification",
        "train": {
            "neck": "linear",
            "head_init": "random",
            "freeze_bn": False,
            "lr": 1e-3,
            "wise_alpha": 1.0,
            "min_steps_per_epoch": 1,
            "whitening": "none",
        },
        "retrieve": {"rerank": "seed004", "verify": {"neighbours": 0}},
    },
    "pretrained_no_verify": {
        "description": "pretrained, without geometric verification",
        "train": {"epochs": 0, "whitening": "none"},
        "retrieve": {"verify": {"neighbours": 0}},
    },
    "no_whitening": {"description": "no learned whitening", "train": {"whitening": "none"}},
    "whitening_only": {
        "description": "not fine-tuned, only the learned whitening",
        "train": {"epochs": 0},
    },
    "no_verify": {"description": "without geometric verification", "retrieve": {"verify": {"neighbours": 0}}},
    "no_wise": {"description": "no WiSE-FT (the fine-tuned weights as they are)", "train": {"wise_alpha": 1.0}},
    "untrained_margin_0": {
        "description": "the untrained model kept whenever its val GAP is the best (no margin: the default "
        "before untrained_val_margin 2)",
        "train": {"untrained_val_margin": 0},
    },
    "random_head": {"description": "ArcFace class weights at random", "train": {"head_init": "random"}},
    "bn_trained": {"description": "BatchNorm statistics updated", "train": {"freeze_bn": False}},
    "frozen_backbone_2": {"description": "backbone frozen for 2 epochs", "train": {"freeze_backbone_epochs": 2}},
    "layer_decay_0.7": {"description": "layer-wise lr decay 0.7", "train": {"layer_decay": 0.7}},
    "pca_neck": {
        "description": "512-d linear neck started as a PCA whitening",
        "train": {"neck": "linear", "neck_init": "pca"},
    },
    "concat": {
        "description": "GeM descriptor beside a 512-d linear neck (PCA-started)",
        "train": {"neck": "linear", "neck_init": "pca", "descriptor": "concat"},
    },
    "lr_1e-3": {"description": "lr 1e-3", "train": {"lr": 1e-3}},
    "subcenter_arcface": {
        "description": "sub-center ArcFace, 3 sub-centers per landmark",
        "train": {"loss": "subcenter_arcface"},
    },
    "triplet": {
        "description": "batch-hard triplet loss (soft margin) on 8 x 4 batches",
        "train": {"loss": "triplet", "sampler": "pk"},
    },
    "balanced_batches": {
        "description": "class-balanced batches for the ArcFace loss: 8 landmarks x 4 photos (`sampler: pk`), so a "
        "landmark with many photos is drawn no more often than one with a single photo (for the long-tail regime)",
        "train": {"sampler": "pk"},
    },
    "inverse_log_weights": {
        "description": "the ArcFace loss of each photo weighted by 1 / log of its landmark's train photos "
        "(`class_weights: inverse_log`; for the long-tail regime)",
        "train": {"class_weights": "inverse_log"},
    },
    "dynamic_margin": {
        "description": "per-landmark ArcFace margins, 0.5 for the rarest down to 0.05 for the most common "
        "(`dynamic_margin: true`, the GLR2020 winners'; for the long-tail regime)",
        "train": {"dynamic_margin": True},
    },
    "crop_0.25": {
        "description": "stronger crops: random resized crops of 25-100% of the photo (the default 50-100%)",
        "train": {"augment": {"random_resized_crop_scale": [0.25, 1.0]}},
    },
    "crop_0.8": {
        "description": "milder crops: random resized crops of 80-100% of the photo (the default 50-100%)",
        "train": {"augment": {"random_resized_crop_scale": [0.8, 1.0]}},
    },
    "arcface_m_0.1": {
        "description": "a smaller ArcFace margin, 0.1 (the default 0.3)",
        "train": {"arcface_m": 0.1},
    },
    "arcface_m_0.5": {
        "description": "a larger ArcFace margin, 0.5 (the default 0.3)",
        "train": {"arcface_m": 0.5},
    },
    "arcface_s_64": {
        "description": "a larger ArcFace scale, 64 as in InsightFace (the default 30)",
        "train": {"arcface_s": 64.0},
    },
    "wise_alpha_0.3": {
        "description": "WiSE-FT nearer the pretrained weights: 0.3 x fine-tuned (the default 0.5)",
        "train": {"wise_alpha": 0.3},
    },
    "wise_alpha_0.7": {
        "description": "WiSE-FT nearer the fine-tuned weights: 0.7 x fine-tuned (the default 0.5)",
        "train": {"wise_alpha": 0.7},
    },
    "l2sp_300": {
        "description": "L2-SP: each step pulls the backbone back towards its pretrained weights (l2sp 300)",
        "train": {"l2sp": 300.0},
    },
    "l2sp_300_no_wise": {
        "description": "L2-SP (l2sp 300) instead of WiSE-FT (wise_alpha 1.0)",
        "train": {"l2sp": 300.0, "wise_alpha": 1.0},
    },
    "flip_tta": {"description": "each photo also embedded mirrored, the two averaged", "embed": {"flip_tta": True}},
    "whole_image": {
        "description": "each photo embedded whole, at its aspect ratio, not its centred square",
        "embed": {"whole_image": True},
    },
    "pretrained_whole_image": {
        "description": "not trained, each photo embedded whole",
        "train": {"epochs": 0, "whitening": "none"},
        "embed": {"whole_image": True},
    },
    "pretrained_flip_tta": {
        "description": "not trained, each photo also embedded mirrored",
        "train": {"epochs": 0, "whitening": "none"},
        "embed": {"flip_tta": True},
    },
}
# Test-time variants. They raise the largest size an experiment embeds at, so shard.size (null: that
# size) and every experiment of the folder would be recomputed: run them apart,
# `--test-time --out bench/out/real_photos_test_time`. They train at 224 px, the default when they were
# measured (bench/real_photos.md), to ask whether embedding larger than training helps.
TEST_TIME = {
    "pretrained_320": {
        "description": "not trained, embedded at 320 px",
        "train": {"epochs": 0, "whitening": "none", "image_size": 224},
        "embed": {"image_size": 320},
    },
    "pretrained_multiscale": {
        "description": "not trained, embedded at 224 x 0.75, 1, 1.25 (averaged)",
        "train": {"epochs": 0, "whitening": "none", "image_size": 224},
        "embed": {"scales": [0.75, 1.0, 1.25]},
    },
    "finetuned_288": {
        "description": "trained at 224 px as the defaults otherwise, embedded at 288 px",
        "train": {"image_size": 224},
        "embed": {"image_size": 288},
    },
}


class PhotoFolders(NamedTuple):
    """The real photos a run uses: landmark photos and non-landmark photos, each a folder with labels.csv."""

    landmarks: Path
    distractors: Path


def stable_rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def labels_from_subfolders(folder: Path) -> pd.DataFrame:
    """id, path, landmark_id of a folder with one subfolder of photos per landmark and no labels.csv (the
    layout most photo collections come in): landmarks numbered in the subfolders' name order, each photo
    found at any depth below its subfolder, its id a hash of its path (ids name files downstream)."""
    landmarks = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    rows = []
    for number, landmark in enumerate(landmarks):
        for photo in sorted(landmark.rglob("*")):
            if photo.is_file() and photo.suffix.lower() in IMAGE_SUFFIXES:
                path = str(photo.relative_to(folder))
                photo_id = hashlib.sha256(path.encode()).hexdigest()[:20]
                rows.append({"id": photo_id, "path": path, "landmark_id": str(number), "landmark_name": landmark.name})
    if not rows:
        raise SystemExit(f"{folder}: no labels.csv and no photos in subfolders (one subfolder per landmark)")
    return pd.DataFrame(rows)


def read_labels(folder: Path) -> pd.DataFrame:
    """The folder's labels.csv, or its subfolders as landmarks when it has none."""
    path = folder / "labels.csv"
    if not path.exists():
        return labels_from_subfolders(folder)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def read_landmarks(folder: Path, seed: int) -> pd.DataFrame:
    """A landmark photo folder's labels (`read_labels`) as id, path, landmark_id, role and shows_landmark.

    role: `database` (what the regimes train on and search) or `query` (always a test query). Paris6k
    photos are database photos and the web photos queries; a folder in the `train`/`test` format keeps
    its split; a folder of `all` photos (or of subfolders) gets QUERY_FRACTION of each landmark's photos
    as queries, drawn by the seed. shows_landmark: the official Paris6k ground truth says `ok` (True where
    there is none)."""
    path = folder / "labels.csv"
    labels = read_labels(folder)
    missing = {"id", "path", "landmark_id"} - set(labels)
    if missing:
        raise SystemExit(f"{path}: no column(s) {sorted(missing)} (needs id, path, landmark_id[, split])")
    split = labels["split"] if "split" in labels else pd.Series("all", index=labels.index)
    unknown = set(split) - set(ROLES)
    if unknown:
        raise SystemExit(f"{path}: unknown split value(s) {sorted(unknown)}; known: {sorted(ROLES)}")
    role = split.map(ROLES)
    drawn = labels.assign(rank=[stable_rank(seed, i) for i in labels["id"]]).sort_values("rank")
    drawn = drawn[role[drawn.index] == "draw"]
    place = drawn.groupby("landmark_id").cumcount()
    size = drawn.groupby("landmark_id")["id"].transform("size")
    role[drawn.index] = np.where(place < np.ceil(QUERY_FRACTION * size), "query", "database")
    shows = labels["paris6k_gt"].isin(["ok", ""]) if "paris6k_gt" in labels else True
    return labels[["id", "path", "landmark_id"]].assign(role=role, shows_landmark=shows)


def in_seed_order(photos: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each landmark's photos in an order the seed draws (the regimes keep a prefix of it)."""
    return photos.assign(rank=[stable_rank(seed, i) for i in photos["id"]]).sort_values(["landmark_id", "rank"])


def landmark_rows(folder: Path, base_url: str, regime: str, seed: int) -> pd.DataFrame:
    labels = read_landmarks(folder, seed)
    labels["url"] = f"{base_url}/{urllib.parse.quote(folder.name)}/" + labels["path"].map(urllib.parse.quote)
    queries = labels[labels["role"] == "query"].assign(split="test", source="query")
    photos = labels[labels["role"] == "database"].assign(split="", source="database")
    if REGIMES[regime] == LONG_TAIL:
        photos = keep_long_tail(photos, seed)
    elif REGIMES[regime]:
        n_train, n_val = REGIMES[regime]
        photos = in_seed_order(photos, seed)
        place = photos.groupby("landmark_id").cumcount().to_numpy()
        split = np.select(
            [place < n_train, place < n_train + n_val, photos["shows_landmark"].to_numpy()],
            ["train", "val", "test"],
            default="unused",
        )
        photos = photos.assign(split=split, source=np.where(split == "test", "heldout", "database"))
        photos = photos[photos["split"] != "unused"]
    return pd.concat([photos, queries])[["id", "url", "landmark_id", "split", "source"]]


def long_tail_count(seed: int, landmark: str, available: int) -> int:
    """How many of its `available` database photos a landmark keeps in the long-tail regime: drawn
    log-uniformly between LONG_TAIL_MIN and all of them, so most landmarks keep a few photos and some
    keep many, as in Google Landmarks (of 21: a median of 6, one landmark in six 15 or more)."""
    if available <= LONG_TAIL_MIN:
        return available
    rng = np.random.default_rng(stable_rank(seed, f"long tail:{landmark}"))
    drawn = int(np.exp(rng.uniform(np.log(LONG_TAIL_MIN), np.log(available + 1))))
    return min(max(drawn, LONG_TAIL_MIN), available)


def keep_long_tail(photos: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each landmark's first `long_tail_count` database photos in the seed's order: val as select's
    defaults would draw it from those photos alone (10%, and 1 from 3 photos up), the rest train; the
    others that show the landmark are test queries (`heldout`), as the photos few-shot leaves over.
    (Left to select, val would be 10% of the whole landmark, its queries included.)"""
    photos = in_seed_order(photos, seed)
    place = photos.groupby("landmark_id").cumcount().to_numpy()
    available = photos.groupby("landmark_id")["id"].transform("size")
    keep = np.array([long_tail_count(seed, lm, n) for lm, n in zip(photos["landmark_id"], available)])
    val = np.array([val_test_quota(k, VAL_FRACTION, 0.0, 1, VAL_MIN_CLASS_IMAGES)[0] for k in keep])
    split = np.select(
        [place < val, place < keep, photos["shows_landmark"].to_numpy()], ["val", "train", "test"], default="unused"
    )
    photos = photos.assign(split=split, source=np.where(split == "test", "heldout", "database"))
    return photos[photos["split"] != "unused"]


def nonlandmark_rows(folder: Path, base_url: str, seed: int) -> pd.DataFrame:
    """Half the scenes (by image count) are queries, the rest the bank; a scene never straddles both."""
    labels = pd.read_csv(folder / "labels.csv", dtype=str)
    if "scene" not in labels:
        labels["scene"] = labels["id"]
    scenes = labels.groupby("scene").size().rename("n").reset_index()
    scenes["rank"] = [stable_rank(seed, s) for s in scenes["scene"]]
    scenes = scenes.sort_values("rank")
    scenes["split"] = np.where(scenes["n"].cumsum() <= len(labels) / 2, "test", "nonlandmark")
    labels = labels.merge(scenes[["scene", "split"]], on="scene")
    return pd.DataFrame(
        {
            "id": labels["id"],
            "url": f"{base_url}/{folder.name}/" + labels["path"],
            "landmark_id": "",
            "split": labels["split"],
            "source": "nonlandmark",
        }
    )


def urls_table(photos: PhotoFolders, base_url: str, regime: str, seed: int) -> pd.DataFrame:
    landmarks = landmark_rows(photos.landmarks, base_url, regime, seed)
    rows = pd.concat([landmarks, nonlandmark_rows(photos.distractors, base_url, seed)])
    # One broken link, as every real CSV has: its row must end in the manifest as a failure, and nothing else.
    broken = pd.DataFrame(
        [
            {
                "id": "broken_link_0",
                "url": f"{base_url}/{photos.landmarks.name}/images/missing.jpg",
                "landmark_id": landmarks["landmark_id"].iloc[0],
                "split": "",
                "source": "broken",
            }
        ]
    )
    return pd.concat([rows, broken], ignore_index=True)


def run_config(regime: str, seed: int, urls_csv: Path, experiments: dict, train: dict, embed: dict) -> dict:
    return {
        "results_dir": "results",
        "input": {"urls_csv": str(urls_csv)},
        "split": {"partitions": 1},
        "download": {"concurrency": 8, "per_host": 8, "threads": 1},
        # Database photos are pre-assigned in the few-shot, one-shot and long-tail regimes; test always is.
        "select": {"seed": seed, "test_fraction": 0.0, "min_images_per_class": 2},
        "places365": {"workers": 0},
        "train": {"seed": seed, "workers": 1, **train},
        "embed": {"workers": 1, **embed},
        "experiments": experiments,
    }


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(photos: PhotoFolders, root: Path, port: int) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve each photo folder under its own name (a link in `root`), so the URLs stay the same from run to run."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in photos:
        link = root / folder.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(folder, target_is_directory=True)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def snakemake(workdir: Path, cores: int) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        str(cores),
        "--rerun-triggers",
        "mtime",
        "params",
        "input",
        "code",
        "--quiet",
        "rules",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(
            f"snakemake failed in {workdir} (logs under {workdir}/results/logs):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    print(f"  {workdir.name}: {time.perf_counter() - started:.0f} s", flush=True)


def gaps_by_query_source(predictions: pd.DataFrame, table: pd.DataFrame) -> dict[str, float]:
    """GAP over each kind of landmark query (with every non-landmark query), by the experiment's own
    confidence and by the raw top-1 cosine: the folder's queries (Paris: web photos by other cameras) and
    the database photos held out of the few-shot regimes."""
    from landmarks.metrics import score_predictions

    test = table[table["split"] == "test"]
    truth = pd.DataFrame(
        {"id": test["id"], "landmarks": [[int(x)] if x else [] for x in test["landmark_id"]], "source": test["source"]}
    )
    gaps = {}
    for source in ("query", "heldout"):
        if not (truth["source"] == source).any():
            continue
        subset = truth[truth["source"].isin([source, "nonlandmark"])]
        chosen = predictions[predictions["id"].isin(subset["id"])]
        gaps[f"gap_{source}"] = score_predictions(chosen, subset).gap
        gaps[f"gap_{source}_raw"] = score_predictions(chosen.assign(score=chosen["top_cosine"]), subset).gap
    return gaps


def collect(workdir: Path, regime: str, seed: int, experiments: dict, table: pd.DataFrame) -> list[dict]:
    rows = []
    for name in experiments:
        predictions = pd.read_parquet(workdir / "results" / "experiments" / name / "retrieve" / "predictions.parquet")
        metrics = json.loads((workdir / "results" / "experiments" / name / "score" / "metrics.json").read_text())
        trained = json.loads((workdir / "results" / "experiments" / name / "train" / "train.json").read_text())
        by_confidence = {
            CONFIDENCES[key]: value for key, value in metrics.get("gap_by_confidence", {}).items() if key in CONFIDENCES
        }
        verdict = {VERDICT[key]: value for key, value in (metrics.get("verdict") or {}).items() if key in VERDICT}
        rows.append(
            {
                "regime": regime,
                "seed": seed,
                "experiment": name,
                "selected": trained.get("selected"),
                **{key: metrics.get(key) for key in METRIC_COLUMNS},
                **gaps_by_query_source(predictions, table),
                **by_confidence,
                **verdict,
            }
        )
    return rows


# score's metrics.json key -> column title (bench/demo_seeds.py prints the same columns)
METRIC_COLUMNS = {
    "gap": "GAP",
    "gap_landmarks_only": "GAP landmark queries",
    "accuracy": "top-1 accuracy",
    "gap_without_rerank": "GAP raw top-1 cosine",
    "val_gap": "val GAP",
}
COLUMNS = {
    **METRIC_COLUMNS,
    "gap_query": "GAP query photos",
    "gap_query_raw": "same, raw top-1 cosine",
    "gap_heldout": "GAP held-out photos",
    "gap_heldout_raw": "same, raw top-1 cosine",
}
# score's GAP of the same labels by other confidences (metrics.json "gap_by_confidence") -> column title
CONFIDENCES = {
    "top-1 cosine − runner-up landmark's cosine": "GAP margin",
    "top-1 cosine − mean top cosine to the non-landmark bank": "GAP bank penalty",
    "geometrically verified first, then top-1 cosine": "GAP verified first",
}

# score's test of predict's landmark / non-landmark verdict (metrics.json "verdict") -> column title
VERDICT = {
    "threshold": "threshold (chosen on val)",
    "val_right_decisions": "right decisions on val",
    "right_decisions": "right decisions on test",
    "right_decisions_without_threshold": "same, keeping every answer",
    "landmark_answers_kept": "right landmark answers kept",
    "nonlandmark_rejected": "non-landmarks rejected",
}


def mean_sd(values: pd.Series) -> str:
    values = values.dropna().astype(float)
    if values.empty:
        return "n/a"
    return f"{values.mean():.3f} ± {values.std(ddof=0):.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def gain_over_pretrained(table: pd.DataFrame, rows: pd.DataFrame, key: str) -> pd.Series:
    """Each of `rows`' `key` minus the untrained backbone's on the same seed."""
    baseline = table[table["experiment"] == "pretrained"].set_index("seed")[key]
    return rows.set_index("seed")[key] - baseline.reindex(rows["seed"]).to_numpy()


def render(results: pd.DataFrame, experiments: dict) -> str:
    lines = []
    for regime, table in results.groupby("regime", sort=False):
        seeds = sorted(table["seed"].unique())
        # With held-out database photos among the queries, also the gain over the folder's own query
        # photos alone: the regime as if the photos left over were unused (Paris: the web photos)
        gains = {"gap": "GAP − pretrained"}
        if "gap_heldout" in table and table["gap_heldout"].notna().any():
            gains["gap_query"] = "GAP query photos − pretrained"
        lines += [
            f"### {regime} ({len(seeds)} seed(s): {', '.join(map(str, seeds))})",
            "",
            "| experiment | " + " | ".join([*COLUMNS.values(), *gains.values()]) + " |",
            "|---|" + "---:|" * (len(COLUMNS) + len(gains)),
        ]
        for name in experiments:
            rows = table[table["experiment"] == name]
            if rows.empty:
                continue
            cells = [mean_sd(rows[key]) if key in rows else "n/a" for key in COLUMNS] + [
                mean_sd(gain_over_pretrained(table, rows, key)) if name != "pretrained" else "" for key in gains
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        confidences = [c for c in CONFIDENCES.values() if c in table and table[c].notna().any()]
        lines += [
            "",
            "The same predicted landmarks ranked by other confidences (GAP; the table above ranks by "
            "each experiment's own confidence and by the raw top-1 cosine):",
            "",
            "| experiment | " + " | ".join(confidences) + " | model.pt is |",
            "|---|" + "---:|" * len(confidences) + "---|",
        ]
        for name in experiments:
            rows = table[table["experiment"] == name]
            if not rows.empty:
                selected = ", ".join(f"{s}" for s in rows["selected"])
                lines.append(f"| {name} | " + " | ".join(mean_sd(rows[c]) for c in confidences) + f" | {selected} |")
        verdicts = [c for c in VERDICT.values() if c in table and table[c].notna().any()]
        if verdicts:
            lines += [
                "",
                "predict's landmark / non-landmark verdict (a landmark query is decided right when its "
                "landmark is right and kept, a non-landmark query when it is rejected):",
                "",
                "| experiment | " + " | ".join(verdicts) + " |",
                "|---|" + "---:|" * len(verdicts),
            ]
            for name in experiments:
                rows = table[table["experiment"] == name]
                if not rows.empty:
                    lines.append(f"| {name} | " + " | ".join(mean_sd(rows[c]) for c in verdicts) + " |")
        lines.append("")
    lines += [
        "mean ± standard deviation over seeds. "
        + "; ".join(f"**{name}**: {spec.get('description', '')}" for name, spec in experiments.items()),
        "",
    ]
    return "\n".join(lines)


def parse_args() -> tuple[argparse.Namespace, dict]:
    """The command line, and the experiments it asks for (name -> spec; `pretrained` always first)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder with paris6k_subset/ and distractors/")
    parser.add_argument(
        "--landmarks",
        type=Path,
        default=None,
        help="another folder of landmark photos, with a labels.csv (id,path,landmark_id[,split]) or one "
        "subfolder of photos per landmark, instead of DATA/paris6k_subset; its results go to "
        "bench/out/real_photos-<folder name> unless --out says otherwise",
    )
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=DEFAULT_REGIMES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--experiments", nargs="+", default=None, help="names to run (default: all)")
    parser.add_argument("--variants", action="store_true", help="also run the variants that did not win")
    parser.add_argument(
        "--test-time",
        action="store_true",
        help="the test-time variants instead (embedding size, multi-scale); use their own --out",
    )
    parser.add_argument("--train", default="{}", help="JSON train settings for every experiment (e.g. a backbone)")
    parser.add_argument(
        "--embed", default="{}", help='JSON embed settings for every experiment (e.g. {"scales": [1, 1.414]})'
    )
    parser.add_argument("--out", type=Path, default=None, help=f"working folders and the result tables ({OUT})")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument(
        "--port", type=int, default=8766, help="port of the local photo server (fixed: the CSVs name it)"
    )
    parser.add_argument("--fresh", action="store_true", help="delete earlier runs' working folders first")
    args = parser.parse_args()
    if args.out is None:
        args.out = OUT if args.landmarks is None else OUT.with_name(f"{OUT.name}-{args.landmarks.resolve().name}")
    known = {**EXPERIMENTS, **VARIANTS, **TEST_TIME}
    catalogue = {**EXPERIMENTS, **(VARIANTS if args.variants else {})}
    if args.test_time:
        catalogue = {"pretrained": EXPERIMENTS["pretrained"], **TEST_TIME}
    if args.experiments:
        unknown = set(args.experiments) - set(known)
        if unknown:
            parser.error(f"unknown experiment(s) {sorted(unknown)}; known: {sorted(known)}")
        catalogue = {name: known[name] for name in args.experiments}
    return args, {"pretrained": EXPERIMENTS["pretrained"], **catalogue}


def photo_folders(args: argparse.Namespace) -> PhotoFolders | None:
    """The photo folders, or None (saying why) when they are not there."""
    photos = PhotoFolders(
        (args.landmarks or args.data / "paris6k_subset").resolve(), (args.data / "distractors").resolve()
    )
    if args.landmarks is not None and not photos.landmarks.is_dir():
        raise SystemExit(f"--landmarks {args.landmarks}: no such folder")
    if not (photos.distractors / "labels.csv").exists() or (
        args.landmarks is None and not (photos.landmarks / "labels.csv").exists()
    ):
        print(
            f"SKIPPED: no real photos at {args.data} (this benchmark needs ../shared/data beside the repository: "
            f"paris6k_subset/ and distractors/)"
        )
        return None
    return photos


def main() -> int:
    args, catalogue = parse_args()
    photos = photo_folders(args)
    if photos is None:
        return 0
    train, embed = json.loads(args.train), json.loads(args.embed)
    server, base_url = serve(photos, args.out / "www", args.port)
    results = []
    try:
        for regime in args.regimes:
            for seed in args.seeds:
                workdir = args.out / f"{regime}-seed{seed}"
                if args.fresh and workdir.exists():
                    shutil.rmtree(workdir)
                workdir.mkdir(parents=True, exist_ok=True)
                urls_csv = workdir / "urls.csv"
                table = urls_table(photos, base_url, regime, seed)
                write_if_changed(urls_csv, table.drop(columns="source").to_csv(index=False))
                # Which queries are the folder's query photos and which held-out database photos (offline benches)
                write_if_changed(workdir / "sources.csv", table[["id", "source"]].to_csv(index=False))
                config = run_config(regime, seed, urls_csv.resolve(), catalogue, train, embed)
                write_if_changed(workdir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
                snakemake(workdir, args.cores)
                results += collect(workdir, regime, seed, catalogue, table)
                # After every run, so a benchmark stopped part-way still has each finished seed's row.
                text = write_tables(pd.DataFrame(results), catalogue, args.out / ("results-" + "+".join(args.regimes)))
    finally:
        server.shutdown()
    print(text)
    return 0


def write_tables(frame: pd.DataFrame, catalogue: dict, stem: Path) -> str:
    """The per-seed rows (`<stem>.csv`) and the tables (`<stem>.md`), each replaced whole; returns the tables.
    The stem names the regimes: runs of other regimes may go on side by side."""
    text = render(frame, catalogue)
    write_text_atomic(stem.with_name(stem.name + ".csv"), frame.to_csv(index=False))
    write_text_atomic(stem.with_name(stem.name + ".md"), text)
    return text


def write_if_changed(path: Path, text: str) -> None:
    """Leave an unchanged file alone: a newer modification time would make Snakemake rerun from it."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())

"""Recognise new photos with a trained experiment: which landmark, how sure, and why.

    python -m landmarks.predict --experiment results/experiments/effnet_gem_arcface data/demo/new_photos
    python -m landmarks.predict --experiment results/experiments/X holiday/ one.jpg crawl.csv --out-dir out/

The predict section of config.yaml comes as `--settings` JSON (`snakemake predict` passes it);
--nonlandmark-threshold, --landmark-share, --top-landmarks, --neighbours, --batch-size and --no-saliency
override it.

INPUT: image files, folders (searched recursively for image files) and CSV files of `id,url`, whose
photos are downloaded with the download stage's code and checks (into <out-dir>/download, resumable).

A photo is treated exactly as a test photo was: checked like a download (not an image, truncated,
corrupt, too many bytes or pixels), resized and re-encoded as the shard stage does, embedded with the
experiment's embed settings (TTA included, rounded to the stored dtype), and answered against the
experiment's database by the retrieve stage's own code (`retrieve.answer_queries`: the same kNN, bank
terms, geometric verification and prediction rule), from the index retrieve saved. So a test photo gets
the label and confidence it got in predictions.parquet.

Per photo: the top landmarks with the confidence each would have as the answer, a non-landmark verdict
(confidence below the threshold retrieve chose on val, the one chosen on the same val answers for
--landmark-share, or --nonlandmark-threshold; the output says which), and the nearest database images.
Written to <out-dir>: predictions.jsonl (everything), predictions.csv (one row per photo), submission.csv
(Kaggle format) and index.html, a self-contained page with each photo, its answer, its neighbours and a
saliency map of what made it match.

A photo that cannot be read gets its error in the outputs and the others are still answered; the exit
code is 1 when any photo failed, 2 when the experiment itself cannot be used (missing or half-written).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from .common import StageError, read_table, run_cli, setup_logging, write_json_atomic, write_table, write_text_atomic
from .config import add_settings_argument, parse_settings
from .images import IMAGE_SUFFIXES
from .threshold import threshold_from_answers

log = logging.getLogger("landmarks.predict")

EXPERIMENT_FILES = (
    "train/model.pt",
    "retrieve/predictor.json",
    "retrieve/index.faiss",
    "retrieve/bank.faiss",
    "retrieve/database.parquet",
)


@dataclass
class Photo:
    """One input photo and, once answered, its result."""

    id: str  # the path as given (files, folders) or the CSV's id
    source: str  # file path or URL
    image: Image.Image | None = None  # as the model sees it: the shard stage's resize and JPEG
    error: str | None = None
    file: str | None = None  # where the photo is on disk (a downloaded CSV row: in <out-dir>/download)
    result: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the experiment


class Experiment:
    """A trained experiment's model, database and settings, loaded once."""

    def __init__(self, path: str | Path, device: torch.device, use_gpu_index: bool = False):
        from . import retrieve
        from .config import ConfigError, section_settings
        from .index import read_index, to_all_gpus
        from .model import model_from_checkpoint

        self.path = Path(path)
        if not self.path.is_dir():
            raise StageError(f"{self.path}: no such experiment folder (results/experiments/<name>)")
        missing = [name for name in EXPERIMENT_FILES if not (self.path / name).is_file()]
        if missing:
            raise StageError(
                f"{self.path}: not a finished experiment, missing {', '.join(missing)} (run "
                f"`snakemake {self.path}/retrieve/predictor.json` or the whole workflow first)"
            )
        self.predictor = _read_json(self.path / "retrieve/predictor.json")
        try:
            self.embed = section_settings("embed", self.predictor.get("embed") or {}, "predictor.json")
            self.shard = section_settings("shard", self.predictor.get("shard") or {}, "predictor.json")
            settings = section_settings("retrieve", self.predictor.get("retrieve") or {}, "predictor.json")
        except ConfigError as err:
            raise StageError(f"{self.path / 'retrieve/predictor.json'}: {err}") from err
        try:
            self.model, checkpoint = model_from_checkpoint(self.path / "train/model.pt")
        except Exception as err:
            raise StageError(
                f"{self.path / 'train/model.pt'}: cannot load the model ({type(err).__name__}: "
                f"{err}); rerun the train stage"
            ) from err
        self.model.eval().to(device)
        self.device = device
        self.image_size = self.embed["image_size"] or checkpoint["settings"]["image_size"]
        self.shard["size"] = self.shard["size"] or max(self.image_size, 16)
        index, bank_index = (read_index(self.path / f"retrieve/{name}.faiss") for name in ("index", "bank"))
        ids = _read_parquet(self.path / "retrieve/database.parquet")
        problem = _mismatch(index, bank_index, ids, self.model.embedding_dim, self.predictor)
        if problem:
            raise StageError(
                f"{self.path}: {problem}; the experiment's files do not belong together (a stage "
                "was rerun halfway?): rerun retrieve"
            )
        if use_gpu_index:
            index, bank_index = (to_all_gpus(x) for x in (index, bank_index))
        if "shard" in ids:  # stored relative to the retrieve folder
            ids["shard"] = [str((self.path / "retrieve" / shard).resolve()) for shard in ids["shard"]]
        labels = ids["landmark_id"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
        bank_terms = ids["bank_term"].to_numpy(dtype=np.float64) if ids["bank_term"].notna().all() else None
        impostor_terms = _impostor_terms(ids, settings, self.path)
        self.threshold_smoothing = settings["threshold_smoothing"]  # for another landmark share
        self.database = retrieve.Database(index, ids, labels, bank_terms, bank_index, settings, impostor_terms)
        self.shard_dirs = sorted({str(Path(shard).parent) for shard in ids.get("shard", pd.Series([], dtype=str))})
        self.images = retrieve.ImageSource(self.shard_dirs)  # database images, for verification and the page

    @property
    def threshold(self) -> dict:
        return self.predictor.get("nonlandmark_threshold") or {"threshold": None, "source": "none"}

    def threshold_for_share(self, landmark_share: float) -> dict:
        """The non-landmark threshold chosen again on the val answers retrieve chose its own on
        (calibration.parquet), for photos of which `landmark_share` show a landmark."""
        path = self.path / "retrieve/calibration.parquet"
        if not path.exists():
            raise StageError(f"{path}: missing (retrieve from before predict.landmark_share): rerun retrieve")
        val = _read_parquet(path, ("landmark_id", "predicted_landmark_id", "confidence"))
        if not val["landmark_id"].notna().any():
            raise StageError(f"{path}: no val landmark answers to choose a threshold on (was val empty?)")
        chosen = threshold_from_answers(val, landmark_share, self.threshold_smoothing)
        return {**chosen, "source": f"val, for a landmark share of {landmark_share:g} (predict.landmark_share)"}


def _impostor_terms(ids: pd.DataFrame, settings: dict, path: Path) -> np.ndarray | None:
    """The database's impostor terms when the confidence uses them; a retrieve from before them has none."""
    from .ranking import reranking

    if not settings.get("impostor_weight") or not reranking(settings["rerank"]).uses_impostor:
        return None
    terms = ids.get("impostor_term")
    if terms is None or terms.isna().any():
        raise StageError(
            f"{path / 'retrieve/database.parquet'}: no impostor terms, which retrieve.impostor_weight "
            f"{settings['impostor_weight']} needs (written by an older retrieve): rerun the retrieve stage"
        )
    return terms.to_numpy(dtype=np.float64)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StageError(f"{path}: not readable JSON ({err}); rerun the retrieve stage") from err


def _read_parquet(path: Path, columns=("id", "landmark_id", "bank_term")) -> pd.DataFrame:
    try:
        table = read_table(path)
    except Exception as err:
        raise StageError(f"{path}: not a readable Parquet table ({err}); rerun the retrieve stage") from err
    missing = set(columns) - set(table.columns)
    if missing:
        raise StageError(f"{path}: missing columns {sorted(missing)}; rerun the retrieve stage")
    return table


def _mismatch(index, bank_index, ids, dim: int, predictor: dict) -> str | None:
    if index.ntotal != len(ids):
        return f"index.faiss holds {index.ntotal} images but database.parquet lists {len(ids)}"
    for name, value in (
        ("index.faiss", index.d),
        ("bank.faiss", bank_index.d),
        ("predictor.json", predictor.get("dim")),
    ):
        if value != dim:
            return f"the model gives {dim}-d embeddings but {name} is {value}-d"
    return None


# ----------------------------------------------------------------------------- inputs


def collect_inputs(inputs, download_dir: Path, download_settings) -> list[Photo]:
    """One Photo per image file (given, or found in a given folder) and per CSV row; an input that does
    not exist becomes a Photo with its error."""
    photos: list[Photo] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                photos.append(
                    Photo(
                        str(path),
                        str(path),
                        error=f"{path}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})",
                    )
                )
            photos += [Photo(str(p), str(p)) for p in found]
        elif path.is_file() and path.suffix.lower() == ".csv":
            photos += download_csv(path, download_dir, download_settings)
        elif path.is_file():
            photos.append(Photo(str(path), str(path)))
        else:
            photos.append(Photo(str(path), str(path), error=f"{path}: no such file or folder"))
    seen: dict[str, int] = {}
    for photo in photos:  # the same file given twice (or two CSV rows with one id): answered once each
        count = seen[photo.id] = seen.get(photo.id, 0) + 1
        if count > 1:
            photo.id = f"{photo.id}#{count}"
    return photos


def download_csv(path: Path, download_dir: Path, settings) -> list[Photo]:
    """The CSV's rows downloaded by the download stage (its checks, retries and resumable journal)."""
    import pyarrow as pa

    from .download import PartDownloader

    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"id", "url"} <= set(rows[0]):
        return [
            Photo(
                str(path),
                str(path),
                error=f"{path}: a CSV of photos needs the columns id,url (found {', '.join(rows[0])})",
            )
        ]
    if not rows:
        return [Photo(str(path), str(path), error=f"{path}: no rows")]
    key = path.resolve().as_posix().replace("/", "_").strip("_")[-80:]
    part = download_dir / f"{key}.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    write_table(pa.table({"id": [r["id"] or "" for r in rows], "url": [r["url"] or "" for r in rows]}), part)
    manifest = download_dir / key / "manifest.parquet"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    PartDownloader(part, download_dir / "images", manifest, settings, 0, progress=False).run()
    photos = []
    for row in read_table(manifest).to_dict("records"):
        if row["status"] == "ok":
            photos.append(Photo(row["id"], row["url"], file=str(download_dir / "images" / row["path"])))
        else:
            photos.append(
                Photo(
                    row["id"] or f"{path} row {row['row']}",
                    row["url"],
                    error=f"{row['url']}: {row['status']} ({row['reason']})",
                )
            )
    return photos


def load_photo(path: str, shard: dict, settings) -> Image.Image:
    """The photo as the model saw test photos: the download stage's checks, then the shard stage's resize
    and JPEG encoding, decoded again. Raises StageError naming what is wrong."""
    from .download import inspect_image
    from .images import decode_rgb
    from .shard import encode_resized
    from .tables import OK

    size = os.path.getsize(path)
    if size > settings.max_bytes:
        raise StageError(f"{size:,} bytes, above download.max_bytes {settings.max_bytes:,}")
    with open(path, "rb") as fh:
        data = fh.read()
    check = inspect_image(data, settings.max_pixels, settings.max_pixels_per_byte)
    if check.status != OK:
        raise StageError(f"{check.status}: {check.reason}")
    try:
        jpeg, _, _ = encode_resized(path, shard["resize_mode"], shard["size"], shard["upscale"], shard["jpeg_quality"])
        return decode_rgb(jpeg)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise StageError(f"cannot decode: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------- embedding and answers


def embed_photos(experiment: Experiment, images: list[Image.Image], batch_size: int, progress: bool) -> np.ndarray:
    """Embeddings as the embed stage stores them (same views, rounded to its dtype), by the embed
    stage's loop over the photos held in memory."""
    from .embedding import ImageViews, MultiScaleTransform, embed_dataset, embed_views, tta_sizes

    e = experiment.embed
    transform = MultiScaleTransform(
        tta_sizes(experiment.image_size, e["scales"]),
        experiment.model.data_config["mean"],
        experiment.model.data_config["std"],
        whole_image=e["whole_image"],
    )
    out = np.zeros((len(images), experiment.model.embedding_dim), np.float32)
    embed_dataset(
        experiment.model,
        ImageViews(images, transform),
        lambda by_scale: embed_views(experiment.model, by_scale, experiment.device, flip=e["flip_tta"], amp=e["amp"]),
        out,
        batch_size=batch_size,
        workers=0,
        device=experiment.device,
        progress=progress,
        desc=f"embed {len(images)} photos",
    )
    return out.astype(e["dtype"]).astype(np.float32)


def answer(
    experiment: Experiment,
    photos: list[Photo],
    *,
    threshold: dict,
    top_landmarks: int,
    neighbours: int,
    batch_size: int,
    threads: int = 1,
    progress: bool = True,
    seconds: dict | None = None,
) -> None:
    """Fill each readable photo's `result`: landmarks, confidence, verdict, nearest database images.
    `seconds` gains the time spent embedding and retrieving (search, bank, verify, predict)."""
    from .retrieve import alternatives, answer_queries

    ready = [p for p in photos if p.image is not None]
    if not ready:
        return
    seconds = {} if seconds is None else seconds
    with _timed(seconds, "embed"):
        vectors = embed_photos(experiment, [p.image for p in ready], batch_size, progress)
    db = experiment.database
    images = experiment.images.with_extra({p.id: p.image for p in ready})
    answers = answer_queries(db, vectors, [p.id for p in ready], images=images, threads=threads, seconds=seconds)
    for row, photo in enumerate(ready):
        landmarks = alternatives(db, answers, row, top_landmarks)
        label, confidence = landmarks[0] if landmarks else (None, None)
        is_landmark = label is not None and (threshold["threshold"] is None or confidence >= threshold["threshold"])
        photo.result = {
            "landmark_id": label if is_landmark else None,
            "confidence": confidence,
            "verdict": "landmark" if is_landmark else "non-landmark",
            "top_landmarks": [{"landmark_id": lid, "confidence": round(c, 6)} for lid, c in landmarks],
            "neighbours": _neighbours(db, answers, row, neighbours),
            "predicted_landmark_id": label,
        }


def _neighbours(db, answers, row: int, count: int) -> list[dict]:
    listed = []
    for rank in range(min(count, answers.positions.shape[1])):
        position = int(answers.positions[row, rank])
        if position < 0:
            break
        entry = db.ids.iloc[position]
        label = db.labels[position]
        inliers = None
        if answers.inliers is not None and rank < answers.inliers.shape[1]:
            inliers = int(answers.inliers[row, rank])
        listed.append(
            {
                "id": str(entry["id"]),
                "landmark_id": int(label) if label >= 0 else None,
                "cosine": round(float(answers.cosines[row, rank]), 6),
                "inliers": inliers,
                "path": f"{entry['shard']}:{entry['key']}.jpg" if "shard" in entry else None,
            }
        )
    return listed


# ----------------------------------------------------------------------------- outputs


def records(photos: list[Photo], threshold: dict) -> list[dict]:
    out = []
    for photo in photos:
        record = {"id": photo.id, "source": photo.source, "error": photo.error}
        record.update(
            photo.result
            or {"landmark_id": None, "confidence": None, "verdict": None, "top_landmarks": [], "neighbours": []}
        )
        record["threshold"] = threshold["threshold"]
        record["threshold_source"] = threshold["source"]
        out.append(record)
    return out


def write_outputs(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(r, default=_plain) + "\n" for r in rows))
    table = pd.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "source": [r["source"] for r in rows],
            "verdict": [r["verdict"] for r in rows],
            "landmark_id": pd.array([r.get("predicted_landmark_id") for r in rows], dtype="Int64"),
            "confidence": [r["confidence"] for r in rows],
            "is_landmark": [r["verdict"] == "landmark" if r["verdict"] else None for r in rows],
            "top_landmarks": [
                " ".join(f"{t['landmark_id']}:{t['confidence']:.4f}" for t in r["top_landmarks"]) for r in rows
            ],
            "nearest_id": [r["neighbours"][0]["id"] if r["neighbours"] else None for r in rows],
            "nearest_cosine": [r["neighbours"][0]["cosine"] if r["neighbours"] else None for r in rows],
            "error": [r["error"] for r in rows],
        }
    )
    write_text_atomic(out_dir / "predictions.csv", table.to_csv(index=False))
    # Kaggle: every photo, its predicted landmark and confidence (the verdict is for people; GAP ranks)
    submission = pd.DataFrame(
        {
            "id": [r["id"] for r in rows],
            "landmarks": [
                "" if r.get("predicted_landmark_id") is None else f"{r['predicted_landmark_id']} {r['confidence']:.6f}"
                for r in rows
            ],
        }
    )
    write_text_atomic(out_dir / "submission.csv", submission.to_csv(index=False))


def _plain(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(type(value).__name__)


def predict(
    experiment_dir,
    inputs,
    out_dir: Path,
    *,
    device: str = "auto",
    threshold: float | None = None,
    landmark_share: float | None = None,
    top_landmarks: int = 3,
    neighbours: int = 5,
    batch_size: int = 32,
    saliency: bool = True,
    download_settings: dict | None = None,
    threads: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Answer every input photo; write the outputs into `out_dir`; returns the records (one per photo).
    The non-landmark threshold: `threshold`, else the one chosen on val for `landmark_share`, else the
    one retrieve chose."""
    from .device import pick_device
    from .download import Settings
    from .index import gpu_count
    from .predict_page import write_page

    started = time.perf_counter()
    torch_device = pick_device(device)
    experiment = Experiment(experiment_dir, torch_device, use_gpu_index=torch_device.type == "cuda" and gpu_count() > 0)
    if threshold is not None:
        chosen = {"threshold": float(threshold), "source": "config"}
    elif landmark_share is not None:
        chosen = experiment.threshold_for_share(landmark_share)
    else:
        chosen = experiment.threshold
    settings = Settings(
        **{k: v for k, v in (download_settings or {}).items() if k in Settings.__dataclass_fields__ and v is not None}
    )
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    with _timed(seconds, "read"):
        photos = read_photos(inputs, out_dir / "download", experiment.shard, settings, progress)
    _log_errors(photos)
    answer(
        experiment,
        photos,
        threshold=chosen,
        top_landmarks=top_landmarks,
        neighbours=neighbours,
        batch_size=batch_size,
        threads=threads,
        progress=progress,
        seconds=seconds,
    )
    rows = records(photos, chosen)
    with _timed(seconds, "page"):
        write_outputs(rows, out_dir)
        write_page(experiment, photos, rows, out_dir / "index.html", saliency=saliency)
    summary = run_summary(experiment, photos, rows, chosen, torch_device, seconds, started)
    write_json_atomic(out_dir / "predict.json", summary)
    log.info(
        "%d photos: %d answered (%d landmarks), %d failed, in %.1f s (%s); threshold %s (%s) -> %s",
        *(summary[key] for key in ("photos", "answered", "landmarks", "failed", "total_seconds")),
        ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
        chosen["threshold"],
        chosen["source"],
        out_dir,
    )
    return rows


def read_photos(inputs, download_dir: Path, shard: dict, settings, progress: bool) -> list[Photo]:
    """The input photos (downloaded where they are URLs), each decoded as the shard stage would store
    it, or with an error saying why it cannot be."""
    photos = collect_inputs(inputs, download_dir, settings)
    for photo in tqdm(photos, desc="read photos", unit="photo", disable=not progress):
        if photo.error is None:
            try:
                photo.image = load_photo(photo.file or photo.source, shard, settings)
            except (StageError, OSError) as err:
                photo.error = f"{photo.source}: {err}"
    return photos


def _log_errors(photos: list[Photo]) -> None:
    for photo in photos:
        if photo.error:
            log.warning("%s", photo.error)


def run_summary(experiment, photos, rows, chosen: dict, torch_device, seconds: dict, started: float) -> dict:
    """predict.json: how many photos were answered and failed, the threshold, the device, the timings."""
    failed = sum(p.error is not None for p in photos)
    return {
        "experiment": str(experiment.path),
        "photos": len(photos),
        "answered": len(photos) - failed,
        "failed": failed,
        "landmarks": sum(r["verdict"] == "landmark" for r in rows),
        "nonlandmark_threshold": chosen,
        "device": str(torch_device),
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 3),
    }


@contextlib.contextmanager
def _timed(seconds: dict, name: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    """Paths and runtime options, and the predict section: --settings (what `snakemake predict` passes)
    with the flags below, for people calling it by hand, on top."""
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, CSV files of id,url")
    parser.add_argument("--experiment", required=True, help="results/experiments/<name> (trained and retrieved)")
    parser.add_argument("--out-dir", default=None, help="default: <experiment>/predict")
    add_settings_argument(parser, "predict")
    parser.add_argument(
        "--nonlandmark-threshold",
        type=float,
        default=None,
        help="confidence below which a photo is a non-landmark (default: the one chosen on val)",
    )
    parser.add_argument(
        "--landmark-share",
        type=float,
        default=None,
        help="share of landmark photos you expect among the inputs: the threshold is chosen on val for it",
    )
    parser.add_argument("--top-landmarks", type=int, default=None, help="default 3")
    parser.add_argument("--neighbours", type=int, default=None, help="default 5")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32")
    parser.add_argument("--no-saliency", action="store_true", help="no saliency maps on the HTML page (faster)")
    parser.add_argument("--download-settings", default="{}", help="JSON: config.yaml's download section (limits)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch, faiss and verification threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = {
        "nonlandmark_threshold": args.nonlandmark_threshold,
        "landmark_share": args.landmark_share,
        "top_landmarks": args.top_landmarks,
        "neighbours": args.neighbours,
        "batch_size": args.batch_size,
        "saliency": False if args.no_saliency else None,
    }
    return args, parse_settings(args.settings, "predict", overrides=overrides)


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        download_settings = json.loads(args.download_settings)
    except ValueError as err:
        raise StageError(f"--download-settings is not valid JSON: {err}") from err
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.experiment) / "predict"
    rows = predict(
        args.experiment,
        args.inputs,
        out_dir,
        device=args.device,
        threshold=None if settings["nonlandmark_threshold"] is None else float(settings["nonlandmark_threshold"]),
        landmark_share=settings["landmark_share"],
        top_landmarks=settings["top_landmarks"],
        neighbours=settings["neighbours"],
        batch_size=settings["batch_size"],
        saliency=settings["saliency"],
        download_settings=download_settings,
        threads=args.threads or 1,
        progress=not args.no_progress,
    )
    failed = [r for r in rows if r["error"]]
    if failed:
        print(
            f"{len(failed)} of {len(rows)} photos failed (see {out_dir / 'predictions.csv'}), e.g. "
            f"{failed[0]['error']}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)

"""Generating the demo set: the photo plan, the worker tasks that draw and write the photos, and the
tables that describe the set.

`generate` draws `n_landmarks` procedural scenes (see `scenes`) and photographs every scene from several
views (see `camera`); non-landmark photos are unique everyday scenes (see `nonlandmarks`). Files vary in
size, aspect ratio and format (see `files`). Same arguments give byte-identical files, whatever the number
of worker processes: every photo is drawn from a random stream of its own. Besides the set, `generate`
writes a few new photos no model has seen, for trying `predict`: one more view of each of the first
`new_photos` landmarks (taken in turn when there are fewer) and half as many (rounded up) new non-landmark
photos, rendered like the others from random streams of their own, so adding them changes no byte of the
set. Output in `out_dir`:

    images/<id>.jpg|png   the photos the server serves
    faults.csv            id,fault for the rows whose URL is broken on purpose
    demo.json             the arguments and counts
    new_photos/photo-NN.jpg|png
                          the unseen photos, numbered in a shuffled order (names tell nothing)
    new_photos.csv        file,landmark_id: their answers (empty landmark_id for non-landmarks)
    urls.csv              id,url,landmark_id (Google Landmarks format; empty landmark_id for
                          non-landmarks), written last: its existence means the set is complete
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common import StageError, write_json_atomic
from .camera import Scene, photograph
from .canvas import seeded_rng
from .files import NEW_PHOTOS_COLUMNS, URLS_COLUMNS, write_csv, write_photo
from .nonlandmarks import NONLANDMARK_STYLES, render_nonlandmark
from .scenes import LandmarkSpec, landmark_specs
from .server import FAULT_KINDS

log = logging.getLogger("landmarks.demo")

DEFAULT_BASE_URL = "http://127.0.0.1:8765"


# File variants beyond a plain RGB JPEG: fraction of the good (unbroken) rows, at least one each.
VARIANT_SHARES = {
    "png": 0.06,
    "rgba_png": 0.03,
    "gray_jpeg": 0.04,
    "cmyk_jpeg": 0.03,
    "exif_3": 0.02,
    "exif_6": 0.03,
    "exif_8": 0.02,
}
VARIANTS = ("jpeg", "progressive_jpeg", *VARIANT_SHARES)
PROGRESSIVE_SHARE = 0.10


# The random streams of the new photos (for `predict`): tags no photo of the set uses, so they are other
# views and scenes than the set's, and the set's own streams (and bytes) do not depend on them.
NEW_VIEW_TAG = "new_photo"
NEW_NONLANDMARK_TAG = "new_photo_nonlandmark"
_SET_PHOTO_NAME = re.compile(r"[0-9a-f]{16}\.(jpg|png)")
_NEW_PHOTO_NAME = re.compile(r"photo-[0-9]+\.(jpg|png)")
NONLANDMARKS_PER_TASK = 12


def _image_id(seed: int, tag: str, *keys: int) -> str:
    """16 hex characters, like Google Landmarks v2 ids."""
    text = "/".join(str(k) for k in ("landmarks-demo", seed, tag, *keys))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The plan: which photo gets which id, label, file variant and fault
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    image_id: str
    landmark_index: int | None  # None: a non-landmark photo
    number: int  # view number of the landmark, or index of the non-landmark photo
    variant: str
    fault: str | None


def plan_photos(seed: int, n_landmarks: int, views: int, n_nonlandmarks: int, broken_fraction: float) -> list[Photo]:
    """Every photo of the set, landmarks' views first: its id, file variant and fault (if any)."""
    g = seeded_rng(seed, "plan")
    keys = [(i, v) for i in range(n_landmarks) for v in range(views)] + [(None, k) for k in range(n_nonlandmarks)]
    ids = [
        _image_id(seed, "landmark" if i is not None else "nonlandmark", i if i is not None else 0, n) for i, n in keys
    ]
    if len(set(ids)) != len(ids):
        raise StageError("image id collision; choose another seed")
    # Broken links: the same fraction of landmark and of non-landmark rows, kinds taken in turn.
    landmark_rows = [r for r, (i, _) in enumerate(keys) if i is not None]
    other_rows = [r for r, (i, _) in enumerate(keys) if i is None]
    broken: list[int] = []
    for rows in (landmark_rows, other_rows):
        count = int(round(broken_fraction * len(rows)))
        broken += [rows[j] for j in g.permutation(len(rows))[:count]]
    broken = [broken[j] for j in g.permutation(len(broken))]
    first_kind = int(g.integers(len(FAULT_KINDS)))
    faults = {row: FAULT_KINDS[(first_kind + k) % len(FAULT_KINDS)] for k, row in enumerate(broken)}
    # File variants among the good rows: fixed quotas, so each one is present in small sets too.
    good = [r for r in range(len(keys)) if r not in faults]
    good = [good[j] for j in g.permutation(len(good))]
    variants: dict[int, str] = {}
    position = 0
    for variant, share in VARIANT_SHARES.items():
        quota = max(1, int(round(share * len(good))))
        for row in good[position : position + quota]:
            variants[row] = variant
        position += quota
    rest = good[position:]
    for row in rest[: int(round(PROGRESSIVE_SHARE * len(good)))]:
        variants[row] = "progressive_jpeg"
    return [Photo(ids[r], i, n, variants.get(r, "jpeg"), faults.get(r)) for r, (i, n) in enumerate(keys)]


def plan_new_photos(seed: int, n_landmarks: int, new_photos: int) -> list[Photo]:
    """The new photos for `predict`: a new view of each of the first `new_photos` landmarks (in turn,
    view after view, when there are fewer landmarks), then ceil(new_photos / 2) new non-landmark photos.

    Their `image_id` is the file name without extension, photo-01, photo-02, ... in a shuffled order;
    `number` is the new view's number (landmarks) or the photo's index (non-landmarks). Variants are
    drawn with the set's shares, so most are plain JPEGs.
    """
    if new_photos <= 0:
        return []
    keys = [(k % n_landmarks, k // n_landmarks) for k in range(new_photos)]
    keys += [(None, k) for k in range((new_photos + 1) // 2)]
    g = seeded_rng(seed, "new_photo_plan")
    numbers = np.empty(len(keys), int)
    numbers[g.permutation(len(keys))] = np.arange(1, len(keys) + 1)
    shares = {"progressive_jpeg": PROGRESSIVE_SHARE, **VARIANT_SHARES}
    choices = ["jpeg", *shares]
    weights = np.array([1.0 - sum(shares.values()), *shares.values()])
    variants = [choices[j] for j in g.choice(len(choices), len(keys), p=weights / weights.sum())]
    width = max(2, len(str(len(keys))))
    return [Photo(f"photo-{int(numbers[r]):0{width}d}", i, n, variants[r], None) for r, (i, n) in enumerate(keys)]


# ---------------------------------------------------------------------------------------------
# Generation (in worker processes)
# ---------------------------------------------------------------------------------------------


def _landmark_task(args) -> list[dict]:
    """The views of one landmark, then its new photos (if any) while its scene is at hand."""
    seed, images_dir, spec, photos, new_dir, new_photos = args
    scene = Scene(spec)
    out = []
    for photo in photos:
        g = seeded_rng(seed, "view", spec.index, photo.number)
        out.append(write_photo(images_dir, photo, photograph(scene, g), g))
    for photo in new_photos:
        g = seeded_rng(seed, NEW_VIEW_TAG, spec.index, photo.number)
        out.append({**write_photo(new_dir, photo, photograph(scene, g), g), "new": True})
    return out


def _nonlandmark_task(args) -> list[dict]:
    """Non-landmark photos of the set, or (`new`) new ones for `predict`, from their own streams."""
    seed, images_dir, photos, new = args
    out = []
    for photo in photos:
        g = seeded_rng(seed, NEW_NONLANDMARK_TAG if new else "nonlandmark", photo.number)
        style = NONLANDMARK_STYLES[photo.number % len(NONLANDMARK_STYLES)]
        written = write_photo(images_dir, photo, render_nonlandmark(style, g), g)
        out.append({**written, "new": True} if new else written)
    return out


def _run_task(task):
    kind, args = task
    return (_landmark_task if kind == "landmark" else _nonlandmark_task)(args)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _tasks(seed: int, specs: list[LandmarkSpec], photos: list[Photo], new_plan: list[Photo], images_dir, new_dir):
    """Work for the processes: one task per landmark (its views and its new photos share one rendered
    scene), the set's non-landmark photos in chunks, and the new non-landmark photos."""
    new_by_landmark = _by_landmark(new_plan)
    tasks = [
        ("landmark", (seed, images_dir, specs[i], views, new_dir, new_by_landmark.get(i, [])))
        for i, views in _by_landmark(photos).items()
    ]
    others = [p for p in photos if p.landmark_index is None]
    chunk = NONLANDMARKS_PER_TASK
    tasks += [("nonlandmark", (seed, images_dir, others[k : k + chunk], False)) for k in range(0, len(others), chunk)]
    new_others = [p for p in new_plan if p.landmark_index is None]
    if new_others:
        tasks.append(("nonlandmark", (seed, new_dir, new_others, True)))
    return tasks


def _by_landmark(photos: list[Photo]) -> dict[int, list[Photo]]:
    grouped: dict[int, list[Photo]] = {}
    for photo in photos:
        if photo.landmark_index is not None:
            grouped.setdefault(photo.landmark_index, []).append(photo)
    return grouped


def _run_tasks(tasks: list, workers: int | None) -> list[dict]:
    """What every task wrote, in no particular order."""
    workers = min(workers or _available_cpus(), len(tasks))
    written: list[dict] = []
    if workers <= 1:
        for task in tasks:
            written += _run_task(task)
    else:
        # spawn: safe even when the caller runs threads (tests run the server in one).
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap_unordered(_run_task, tasks):
                written += result
    return written


# ---------------------------------------------------------------------------------------------
# The set: checks, folders, tables
# ---------------------------------------------------------------------------------------------


def settings_arguments(settings: dict) -> dict:
    """`generate`'s keyword arguments from config.yaml's demo section (validated, defaults filled in).
    The URLs point at the server the workflow starts on the section's host and port."""
    return {
        "seed": settings["seed"],
        "n_landmarks": settings["landmarks"],
        "views_per_landmark": settings["views_per_landmark"],
        "n_nonlandmarks": settings["nonlandmarks"],
        "broken_fraction": settings["broken_fraction"],
        "base_url": f"http://{settings['host']}:{settings['port']}",
        "new_photos": settings["new_photos"],
    }


def generate(
    out_dir,
    *,
    seed: int = 2026,
    n_landmarks: int = 48,
    views_per_landmark: int = 14,
    n_nonlandmarks: int = 240,
    broken_fraction: float = 0.08,
    base_url: str = DEFAULT_BASE_URL,
    workers: int | None = None,
    new_photos: int = 8,
) -> dict:
    """Write the demo set into out_dir (see the module docstring); returns its counts.

    `new_photos`: how many new landmark photos to write into out_dir/new_photos (plus half as many,
    rounded up, non-landmark ones); 0 writes none. They never change the set's own files.
    """
    base_url = _checked_arguments(
        seed, n_landmarks, views_per_landmark, n_nonlandmarks, broken_fraction, base_url, new_photos
    )
    arguments = {
        "seed": seed,
        "n_landmarks": n_landmarks,
        "views_per_landmark": views_per_landmark,
        "n_nonlandmarks": n_nonlandmarks,
        "broken_fraction": broken_fraction,
        "base_url": base_url,
    }
    started = time.monotonic()
    out_dir = Path(out_dir)
    images_dir, new_dir = _prepare_folders(out_dir)
    specs = landmark_specs(seed, n_landmarks)
    photos = plan_photos(seed, n_landmarks, views_per_landmark, n_nonlandmarks, broken_fraction)
    new_plan = plan_new_photos(seed, n_landmarks, new_photos)
    files, new_files = _write_photos(images_dir, new_dir, seed, specs, photos, new_plan, workers)
    counts = _write_tables(out_dir, arguments, specs, photos, new_plan, files, new_files)
    counts["seconds"] = round(time.monotonic() - started, 2)
    log.info(
        "wrote %(images)d photos (%(landmarks)d landmarks, %(nonlandmark_images)d non-landmarks, %(broken)d broken "
        "links) and %(new_photos)d new photos to %(out_dir)s in %(seconds).1f s",
        {**counts, "out_dir": out_dir},
    )
    return counts


def _write_photos(images_dir: Path, new_dir: Path, seed: int, specs, photos, new_plan, workers) -> tuple[dict, dict]:
    """Draw and write every photo into images_dir and new_dir (removing the photos an earlier run with
    other arguments left there); returns the file name of each id, for each folder."""
    written = _run_tasks(_tasks(seed, specs, photos, new_plan, images_dir, new_dir), workers)
    files = {w["id"]: w["file"] for w in written if not w.get("new")}
    new_files = {w["id"]: w["file"] for w in written if w.get("new")}
    _remove_stale(images_dir, _SET_PHOTO_NAME, set(files.values()))
    _remove_stale(new_dir, _NEW_PHOTO_NAME, set(new_files.values()))
    return files, new_files


def _write_tables(out_dir: Path, arguments: dict, specs, photos, new_plan, files: dict, new_files: dict) -> dict:
    """faults.csv, demo.json, new_photos.csv, then urls.csv (last: it marks a complete set); returns the counts."""
    seed, base_url = arguments["seed"], arguments["base_url"]
    landmark_ids = _landmark_ids(seed, len(specs))
    faults = sorted((p.image_id, p.fault) for p in photos if p.fault)
    counts = _counts(photos, specs, landmark_ids, faults, len(new_plan))
    families = {str(landmark_ids[s.index]): s.family for s in specs}
    write_csv(out_dir / "faults.csv", ("id", "fault"), faults)
    write_json_atomic(out_dir / "demo.json", {"arguments": arguments, "counts": counts, "families": families})
    write_csv(out_dir / "new_photos.csv", NEW_PHOTOS_COLUMNS, _new_photo_rows(new_plan, new_files, landmark_ids))
    write_csv(out_dir / "urls.csv", URLS_COLUMNS, _url_rows(seed, photos, files, landmark_ids, base_url))
    return counts


def _checked_arguments(
    seed: int,
    n_landmarks: int,
    views_per_landmark: int,
    n_nonlandmarks: int,
    broken_fraction: float,
    base_url: str,
    new_photos: int,
) -> str:
    """StageError for arguments no set can be made from; returns base_url without a trailing slash."""
    if n_landmarks < 1 or views_per_landmark < 1 or n_nonlandmarks < 0:
        raise StageError("need at least 1 landmark with 1 view, and a non-negative number of non-landmarks")
    if new_photos < 0:
        raise StageError(f"new_photos must be non-negative, got {new_photos}")
    if not 0 <= broken_fraction < 1:
        raise StageError(f"broken_fraction must be in [0, 1), got {broken_fraction}")
    if seed < 0:
        raise StageError(f"seed must be non-negative, got {seed}")
    base_url = base_url.rstrip("/")
    if not re.match(r"^https?://[^/]+", base_url):
        raise StageError(f"base_url must start with http:// or https://, got {base_url!r}")
    return base_url


def _prepare_folders(out_dir: Path) -> tuple[Path, Path]:
    """images/ and new_photos/ (the latter also when empty: the workflow declares it as an output)."""
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    new_dir = out_dir / "new_photos"
    new_dir.mkdir(exist_ok=True)
    # urls.csv marks a complete set: remove it first, so an interrupted run never looks complete.
    (out_dir / "urls.csv").unlink(missing_ok=True)
    return images_dir, new_dir


def _remove_stale(folder: Path, photo_name: re.Pattern, expected: set[str]) -> None:
    """Remove photos a previous generation with other arguments left behind."""
    for path in folder.iterdir():
        if photo_name.fullmatch(path.name) and path.name not in expected:
            path.unlink()


def _landmark_ids(seed: int, n_landmarks: int) -> list[int]:
    """Sparse, shuffled integers like real landmark ids: nothing may assume they are 0..n-1."""
    id_pool = np.arange(1, 200_000)
    return [int(x) for x in seeded_rng(seed, "landmark_ids").choice(id_pool, n_landmarks, replace=False)]


def _url_rows(seed: int, photos: list[Photo], files: dict, landmark_ids: list[int], base_url: str) -> list[tuple]:
    """urls.csv's rows (id, url, landmark_id) in a shuffled order; broken rows point at /fault/<kind>/."""
    rows = []
    for photo in photos:
        name = files[photo.image_id]
        url = f"{base_url}/images/{name}" if photo.fault is None else f"{base_url}/fault/{photo.fault}/{name}"
        label = "" if photo.landmark_index is None else str(landmark_ids[photo.landmark_index])
        rows.append((photo.image_id, url, label))
    order = seeded_rng(seed, "row_order").permutation(len(rows))
    return [rows[k] for k in order]


def _new_photo_rows(new_plan: list[Photo], new_files: dict, landmark_ids: list[int]) -> list[tuple]:
    """new_photos.csv's rows (file, landmark_id), by file name."""
    return sorted(
        (new_files[p.image_id], "" if p.landmark_index is None else str(landmark_ids[p.landmark_index]))
        for p in new_plan
    )


def _counts(photos: list[Photo], specs: list[LandmarkSpec], landmark_ids: list[int], faults: list, new: int) -> dict:
    return {
        "landmarks": len(specs),
        "landmark_images": sum(1 for p in photos if p.landmark_index is not None),
        "nonlandmark_images": sum(1 for p in photos if p.landmark_index is None),
        "images": len(photos),
        "broken": len(faults),
        "faults": {kind: sum(1 for _, f in faults if f == kind) for kind in FAULT_KINDS},
        "variants": {v: sum(1 for p in photos if p.variant == v) for v in VARIANTS},
        "lookalike_pairs": [[landmark_ids[s.twin_of], landmark_ids[s.index]] for s in specs if s.twin_of is not None],
        "new_photos": new,
    }

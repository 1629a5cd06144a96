"""Places365 scene classification: the top-k scene categories of every downloaded image.

The landmark photos of Google Landmarks include many indoor shots (museum interiors, food,
people at a table). Following the Places365 authors' own indoor/outdoor rule, `select` drops the
images a scene classifier calls indoor. This stage is the expensive half of that filter: it runs
the official Places365 CNN once and stores, per image, the top-k categories, their probabilities
and whether each category is an outdoor one. Every vote rule (landmarks.select_rules) can then be
decided by `select` without rerunning the network.

Weights come from a local path, the torch.hub checkpoint cache, or the official URL (downloaded
into that cache). When none of them works -- the offline case -- the stage does not fail: it
keeps every image with `scene_status = "no_weights"` and says so in its log and its output.

torch is imported inside the functions that need it, so that `select` can read this stage's
tables without paying for a torch import.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .common import StageError, read_table, run_cli, setup_logging, write_table
from .config import add_settings_argument, parse_settings
from .device import pick_device
from .select_rules import OFFICIAL_TOP_K
from .tables import OK, SCENES_SCHEMA

log = logging.getLogger("landmarks.places365")

NUM_CLASSES = 365
# The official indoor/outdoor rule votes over the top 10 categories, so we always keep at least 10.
MIN_TOP_K = OFFICIAL_TOP_K
SUPPORTED_ARCHS = ("resnet18", "resnet50", "densenet161", "wideresnet18")

WEIGHTS_URL_TEMPLATE = "http://places2.csail.mit.edu/models_places365/{arch}_places365.pth.tar"
# Pinned to the commit the label files were last changed in, so a moved `master` cannot change them.
LABELS_URL_BASE = "https://raw.githubusercontent.com/CSAILVision/places365/06218620d593de09ac4f9f39b72ea0d175990a24/"
CATEGORIES_FILE = "categories_places365.txt"
IO_FILE = "IO_places365.txt"

# Preprocessing of the official demo code (ImageNet statistics).
RESIZE, CROP = 256, 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

STATUS_SCORED, STATUS_NO_WEIGHTS, STATUS_UNREADABLE = "scored", "no_weights", "unreadable"
METADATA_KEY = b"landmarks.places365"


# --------------------------------------------------------------------------------------------
# Label files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneLabels:
    names: tuple[str, ...]  # category paths as in the file, e.g. "/a/airfield"
    outdoor: np.ndarray  # bool[365], True where IO_places365.txt says 2 (outdoor)
    source: str  # the folder they were read from
    sha256: dict[str, str]


def _label_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every line; blank lines are allowed only at the end of the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StageError(f"{path}: not a UTF-8 text file ({err})") from err
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            raise StageError(f"{path}: line {number} is blank")
        out.append((number, fields))
    return out


def parse_categories(path: str | Path) -> list[str]:
    """Parse categories_places365.txt: 365 lines `<category path> <index>`, indices 0..364 in order."""
    path = Path(path)
    lines = _label_lines(path)
    names = []
    for number, fields in lines:
        if len(fields) != 2 or not fields[0].startswith("/"):
            raise StageError(f"{path}: line {number}: expected '<category path> <index>', got {' '.join(fields)!r}")
        if fields[1] != str(len(names)):
            raise StageError(
                f"{path}: line {number}: index {fields[1]!r}, expected {len(names)} (indices must be 0..364 in order)"
            )
        names.append(fields[0])
    if len(names) != NUM_CLASSES:
        raise StageError(f"{path}: {len(names)} categories, expected {NUM_CLASSES}")
    if len(set(names)) != NUM_CLASSES:
        raise StageError(f"{path}: category names are not unique")
    return names


def parse_io(path: str | Path, names: Sequence[str]) -> np.ndarray:
    """Parse IO_places365.txt: one line per category, same order, last column 1 indoor / 2 outdoor."""
    path = Path(path)
    lines = _label_lines(path)
    if len(lines) != len(names):
        raise StageError(f"{path}: {len(lines)} lines, expected {len(names)} (one per category)")
    outdoor = np.zeros(len(names), dtype=bool)
    for index, (number, fields) in enumerate(lines):
        if len(fields) != 2 or fields[1] not in ("1", "2"):
            raise StageError(
                f"{path}: line {number}: expected '<category path> <1 indoor|2 outdoor>', got {' '.join(fields)!r}"
            )
        if fields[0] != names[index]:
            raise StageError(f"{path}: line {number}: category {fields[0]!r}, but category {index} is {names[index]!r}")
        outdoor[index] = fields[1] == "2"
    return outdoor


def load_labels(folder: str | Path) -> SceneLabels:
    folder = Path(folder)
    categories, io = folder / CATEGORIES_FILE, folder / IO_FILE
    for path in (categories, io):
        if not path.is_file():
            raise StageError(f"{path}: Places365 label file not found")
    names = parse_categories(categories)
    outdoor = parse_io(io, names)
    return SceneLabels(
        names=tuple(names),
        outdoor=outdoor,
        source=str(folder),
        sha256={p.name: sha256_file(p) for p in (categories, io)},
    )


# --------------------------------------------------------------------------------------------
# Fetching files (weights, labels) into the cache
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # torch.hub's downloader opens the URL without a timeout; the process-wide default bounds it,
    # so an unreachable host costs at most `seconds` per connect/read instead of hanging the job.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download(url: str, dest: Path, timeout: float) -> str | None:
    """Download `url` to `dest` with torch.hub's downloader; return None, or why it failed.

    torch.hub writes a temporary file and renames it on success, so a failed download leaves
    nothing at `dest`.
    """
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    try:
        with _socket_timeout(timeout):
            torch.hub.download_url_to_file(url, str(dest), progress=False)
    except (OSError, ValueError, RuntimeError) as err:  # URLError, HTTPError and timeouts are OSErrors
        return f"{type(err).__name__}: {err}"
    return None


@dataclass
class WeightsLookup:
    path: Path | None  # the checkpoint to load, None when none could be found
    url: str  # the URL tried (or that would have been tried)
    cache_path: Path
    error: str | None = None  # why the download failed


def find_weights(arch: str, weights: str, cache_dir: Path, url: str, timeout: float) -> WeightsLookup:
    """An explicit path must exist; otherwise the cache, then a download into the cache."""
    cache_path = cache_dir / f"{arch}_places365.pth.tar"
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise StageError(f"{path}: Places365 weights file not found (places365.weights)")
        return WeightsLookup(path, url, cache_path)
    if cache_path.is_file():
        return WeightsLookup(cache_path, url, cache_path)
    error = download(url, cache_path, timeout)
    if error:
        return WeightsLookup(None, url, cache_path, error)
    return WeightsLookup(cache_path, url, cache_path)


def find_labels(labels_dir: str, cache_dir: Path, base_url: str, timeout: float) -> SceneLabels:
    """Labels from `labels_dir` when given, else from the cache, downloading what is missing."""
    if labels_dir:
        return load_labels(Path(labels_dir).expanduser())
    for name in (CATEGORIES_FILE, IO_FILE):
        path = cache_dir / name
        if not path.is_file():
            error = download(base_url + name, path, timeout)
            if error:
                raise StageError(
                    f"Places365 weights were found but the label file {name} was not: not in {cache_dir} "
                    f"and downloading {base_url + name} failed ({error}). Put {CATEGORIES_FILE} and "
                    f"{IO_FILE} in a folder and set places365.labels_dir to it."
                )
    return load_labels(cache_dir)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(arch: str):
    import torch.nn as nn
    import torchvision

    if arch not in SUPPORTED_ARCHS:
        raise StageError(f"unsupported Places365 arch {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    if arch == "wideresnet18":
        # The official wideresnet.py is a ResNet-18 without the max-pool after conv1 (so the last
        # feature map is 14x14, averaged by AvgPool2d(14)); the parameter names are torchvision's.
        model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
        model.maxpool = nn.Identity()
        return model
    return getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)


# densenet161_places365 was saved before torchvision renamed `norm.1` to `norm1` (same for relu, conv).
_OLD_DENSENET_KEY = re.compile(r"\.(norm|relu|conv)\.(\d+)\.")


def normalise_state_dict_keys(state_dict: dict, arch: str) -> dict:
    """Strip DataParallel's `module.` prefix; map old densenet layer names to torchvision's."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if arch == "densenet161":
            key = _OLD_DENSENET_KEY.sub(r".\1\2.", key)
        out[key] = value
    return out


def load_checkpoint(path: Path, arch: str):
    """Load an official `<arch>_places365.pth.tar` into its network, refusing anything else."""
    import torch

    fmt = f"expected the official {arch}_places365.pth.tar: a dict with a 'state_dict' entry"
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(
            f"{path}: cannot read as a PyTorch checkpoint with weights_only=True ({first_line}); {fmt}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise StageError(f"{path}: holds a {type(checkpoint).__name__}, not a dict; {fmt}")
    if "state_dict" not in checkpoint or not isinstance(checkpoint["state_dict"], dict):
        keys = ", ".join(sorted(map(str, checkpoint))[:8])
        raise StageError(f"{path}: no 'state_dict' entry (top-level keys: {keys or 'none'}); {fmt}")
    saved_arch = checkpoint.get("arch")
    if isinstance(saved_arch, str) and saved_arch != arch:
        raise StageError(f"{path}: checkpoint is for arch {saved_arch!r}, but places365.arch is {arch!r}")

    state_dict = normalise_state_dict_keys(checkpoint["state_dict"], arch)
    model = build_model(arch)
    expected = model.state_dict()
    # Old PyTorch did not save BatchNorm's num_batches_tracked; BatchNorm fills it in on load.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and hasattr(v, "shape") and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise StageError(f"{path}: state_dict does not match {arch}(num_classes={NUM_CLASSES}): {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=False)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


class ImageFiles:
    """Map-style dataset: (image tensor, readable?, error). Unreadable images never raise."""

    def __init__(self, paths: Sequence[Path | None]):
        from torchvision import transforms

        self.paths = list(paths)
        self.transform = transforms.Compose(
            [
                transforms.Resize(RESIZE),
                transforms.CenterCrop(CROP),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch

        from .images import decode_rgb  # Pillow, only where images are decoded

        path = self.paths[index]
        try:
            if path is None:
                raise FileNotFoundError("manifest row has no path")
            image = decode_rgb(path)  # the pixels the shard stage gives the model
            return self.transform(image), True, ""
        except Exception as err:  # any decode problem marks the image unreadable, never the stage
            return torch.zeros(3, CROP, CROP), False, f"{type(err).__name__}: {err}"[:300]


def score_images(model, paths, top_k: int, batch_size: int, workers: int, device):
    """Top-k (index, probability) per image, plus readability; arrays in `paths` order."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    n = len(paths)
    topk_index = np.zeros((n, top_k), dtype=np.int16)
    topk_prob = np.zeros((n, top_k), dtype=np.float32)
    readable = np.zeros(n, dtype=bool)
    errors = [""] * n
    loader = DataLoader(
        ImageFiles(paths),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    model = model.to(device)
    start = 0
    with torch.inference_mode():
        for images, ok, error in tqdm(loader, desc="places365", unit="batch", mininterval=10):
            stop = start + len(images)
            with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
                logits = model(images.to(device, non_blocking=True))
            probs = logits.float().softmax(dim=1)
            values, indices = probs.topk(top_k, dim=1)
            topk_index[start:stop] = indices.cpu().numpy()
            topk_prob[start:stop] = values.cpu().numpy()
            readable[start:stop] = ok.numpy()
            errors[start:stop] = list(error)
            start = stop
    return topk_index, topk_prob, readable, errors


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _list_column(matrix: np.ndarray, valid: np.ndarray, value_type) -> pa.Array:
    """(n, k) matrix -> list<value_type>, null where not valid."""
    n, k = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    values = pa.array(matrix.reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(~valid))


def build_output(ids, status, errors, topk_index, topk_prob, labels, metadata) -> pa.Table:
    valid = np.asarray([s == STATUS_SCORED for s in status], dtype=bool)
    outdoor = labels.outdoor[topk_index] if labels is not None else np.zeros(topk_index.shape, dtype=bool)
    columns = {
        "id": pa.array(list(ids), type=pa.string()),
        "scene_status": pa.array(list(status), type=pa.string()),
        "topk_index": _list_column(topk_index, valid, pa.int16()),
        "topk_prob": _list_column(topk_prob, valid, pa.float32()),
        "topk_outdoor": _list_column(outdoor, valid, pa.bool_()),
        "scene_error": pa.array([e or None for e in errors], type=pa.string()),
    }
    table = pa.table(columns, schema=SCENES_SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_metadata(path: str | Path) -> dict:
    """The stage's file-level metadata (arch, weights, labels, note) of a scene table."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_scored_manifest(path: Path, images_root: Path) -> tuple[list[str], list[Path | None]]:
    manifest = read_table(path)
    missing = {"id", "status", "path"} - set(manifest.columns)
    if missing:
        raise StageError(f"{path}: not a download manifest (missing columns: {', '.join(sorted(missing))})")
    ok = manifest[manifest["status"] == OK]
    paths = [images_root / p if isinstance(p, str) and p else None for p in ok["path"]]
    return [str(i) for i in ok["id"]], paths


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m landmarks.places365",
        description="Places365 scene classification of downloaded images (top-k categories for the indoor/outdoor filter).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--manifest", required=True, type=Path, help="download manifest (Parquet) of one partition")
    p.add_argument("--images", required=True, type=Path, help="images root the manifest's `path` is relative to")
    p.add_argument("--out", required=True, type=Path, help="output scene table (Parquet)")
    add_settings_argument(p, "places365")
    p.add_argument("--weights-url", default=WEIGHTS_URL_TEMPLATE, help="URL of the weights; {arch} is replaced")
    p.add_argument("--labels-url", default=LABELS_URL_BASE, help="URL prefix the label file names are appended to")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    settings = parse_settings(args.settings, "places365")
    arch, top_k = settings["arch"], settings["top_k"]
    cache_dir = Path(settings["cache_dir"]).expanduser() if settings["cache_dir"] else default_cache_dir()
    ids, paths = read_scored_manifest(args.manifest, args.images)
    log.info("%d images with status ok in %s", len(ids), args.manifest)

    lookup = find_weights(
        arch, settings["weights"], cache_dir, args.weights_url.format(arch=arch), settings["download_timeout_s"]
    )
    metadata = {
        "stage": "places365",
        "arch": arch,
        "top_k": top_k,
        "weights_url": lookup.url,
        "cache_path": str(lookup.cache_path),
        "manifest": str(args.manifest),
    }
    n = len(ids)
    topk_index = np.zeros((n, top_k), dtype=np.int16)
    topk_prob = np.zeros((n, top_k), dtype=np.float32)

    if lookup.path is None:
        note = (
            f"kept all {n} images unscored (scene_status={STATUS_NO_WEIGHTS}) because no Places365 weights were "
            f"found: downloading {lookup.url} failed ({lookup.error}) and {lookup.cache_path} does not exist. "
            f"To filter indoor images, place {arch}_places365.pth.tar at that path or set places365.weights "
            f"(--weights) to a local copy."
        )
        log.warning("NO PLACES365 WEIGHTS: %s", note)
        metadata.update(status=STATUS_NO_WEIGHTS, note=note, weights_path=None, weights_sha256=None, labels_source=None)
        status, errors, labels = [STATUS_NO_WEIGHTS] * n, [""] * n, None
    else:
        model = load_checkpoint(lookup.path, arch)
        labels = find_labels(settings["labels_dir"], cache_dir, args.labels_url, settings["download_timeout_s"])
        log.info(
            "weights %s, labels from %s (%d indoor, %d outdoor categories)",
            lookup.path,
            labels.source,
            int((~labels.outdoor).sum()),
            int(labels.outdoor.sum()),
        )
        device = pick_device(args.device)
        if n:
            topk_index, topk_prob, readable, errors = score_images(
                model, paths, top_k, settings["batch_size"], settings["workers"], device
            )
        else:
            readable, errors = np.zeros(0, dtype=bool), []
        status = [STATUS_SCORED if ok else STATUS_UNREADABLE for ok in readable]
        unreadable = [(i, e) for i, ok, e in zip(ids, readable, errors) if not ok]
        for image_id, error in unreadable[:10]:
            log.warning("unreadable image %s: %s", image_id, error)
        note = f"scored {n - len(unreadable)} images, {len(unreadable)} unreadable"
        log.info("%s on %s", note, device)
        metadata.update(
            status=STATUS_SCORED,
            note=note,
            weights_path=str(lookup.path),
            weights_sha256=sha256_file(lookup.path),
            labels_source=labels.source,
            labels_sha256=labels.sha256,
            device=str(device),
        )

    write_table(build_output(ids, status, errors, topk_index, topk_prob, labels, metadata), args.out)
    log.info("wrote %s (%d rows)", args.out, n)
    return 0


if __name__ == "__main__":
    run_cli(main)

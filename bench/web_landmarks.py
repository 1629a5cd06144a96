"""Build a second real-photo set for bench/real_photos.py: web photos of 13 world landmarks.

The photos come from a public GitHub repository (a student project that scraped DuckDuckGo image search,
one folder per landmark): REPOSITORY at COMMIT, folder `data/<landmark>/`. They are not curated: stock
photos with watermarks along their bottom edge, drawings, posters, interiors and close-ups sit beside
ordinary views, as in Google Landmarks' own training data. The images belong to their owners (no licence
is stated for them): use them for local evaluation only, never copy them into this repository.

Per landmark the files are walked in name order and the first PER_LANDMARK kept that are real JPEGs
(many `.jpg` files there are WebP or AVIF), decode, are at most MAX_BYTES and are no near copy of one
already kept (64-bit difference hash within 3 bits). Writes OUT/images/<landmark>/<file>.jpg and
OUT/labels.csv (id, path, landmark_id, landmark_name, split `all`, source repository, commit, path);
`real_photos.py --landmarks OUT` then draws 30% of each landmark's photos as its queries.

    git clone https://github.com/Atquiya-Labiba/Historical-Architectural-Landmark-Recognizer /tmp/ddg
    .venv/bin/python bench/web_landmarks.py --git-dir /tmp/ddg/.git --out ../web_landmarks13
    .venv/bin/python bench/real_photos.py --landmarks ../web_landmarks13 --experiments pretrained finetuned

(13 landmarks, 8-30 photos each, 320 photos, about 60 MB.)
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

REPOSITORY = "Atquiya-Labiba/Historical-Architectural-Landmark-Recognizer"
COMMIT = "ac5a7f489d3c8449e3be22b7a91cf7e6176a3112"
PER_LANDMARK = 30
MAX_BYTES = 700_000
NEAR_COPY_BITS = 3


def git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, check=True).stdout


def files_by_landmark(git_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """landmark folder -> sorted (path, blob) of its .jpg/.jpeg files at COMMIT."""
    listing = git(git_dir, "ls-tree", "-r", "-z", COMMIT, "data").decode().split("\0")
    found: dict[str, list[tuple[str, str]]] = {}
    for entry in filter(None, listing):
        meta, path = entry.split("\t", 1)
        parts = path.split("/")
        if len(parts) == 3 and Path(parts[2]).suffix.lower() in (".jpg", ".jpeg"):
            found.setdefault(parts[1], []).append((path, meta.split()[2]))
    return {landmark: sorted(files) for landmark, files in sorted(found.items())}


def jpeg(data: bytes) -> Image.Image | None:
    """The decoded image when `data` is a whole JPEG of at least 64 px a side, else None."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError):
        return None
    return image if image.format == "JPEG" and min(image.size) >= 64 else None


def difference_hash(image: Image.Image) -> int:
    pixels = list(image.convert("L").resize((9, 8)).tobytes())
    return sum(1 << bit for bit in range(64) if pixels[bit // 8 * 9 + bit % 8] > pixels[bit // 8 * 9 + bit % 8 + 1])


def pick(git_dir: Path, files: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """The first PER_LANDMARK usable files of one landmark: (source path, bytes)."""
    kept, hashes = [], []
    for path, blob in files:
        if len(kept) == PER_LANDMARK:
            break
        result = subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "blob", blob], capture_output=True)
        if result.returncode or len(result.stdout) > MAX_BYTES:
            continue
        image = jpeg(result.stdout)
        if image is None:
            continue
        signature = difference_hash(image)
        if any(bin(signature ^ other).count("1") <= NEAR_COPY_BITS for other in hashes):
            continue
        hashes.append(signature)
        kept.append((path, result.stdout))
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--git-dir", type=Path, required=True, help=f"a clone of {REPOSITORY} (its .git folder)")
    parser.add_argument("--out", type=Path, required=True, help="where the photos and labels.csv go")
    args = parser.parse_args()
    if Path(__file__).resolve().parents[1] in [args.out.resolve(), *args.out.resolve().parents]:
        sys.exit(f"--out {args.out} is inside the repository: these photos must stay out of it")
    rows = []
    for landmark_id, (landmark, files) in enumerate(files_by_landmark(args.git_dir).items()):
        name = landmark.replace(" ", "_")
        (args.out / "images" / name).mkdir(parents=True, exist_ok=True)
        for path, data in pick(args.git_dir, files):
            relative = f"images/{name}/{Path(path).stem}.jpg"
            (args.out / relative).write_bytes(data)
            rows.append([Path(path).stem, relative, landmark_id, name, "all", REPOSITORY, COMMIT, path])
        print(f"{name}: {sum(row[2] == landmark_id for row in rows)} of {len(files)} files")
    columns = ["id", "path", "landmark_id", "landmark_name", "split", "source_repo", "source_commit", "source_path"]
    pd.DataFrame(rows, columns=columns).to_csv(args.out / "labels.csv", index=False)
    print(f"{len(rows)} photos of {rows[-1][2] + 1 if rows else 0} landmarks in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

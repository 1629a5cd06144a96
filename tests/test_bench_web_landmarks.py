"""bench/web_landmarks.py: builds a photo set from pinned git commits (a repository the test creates)."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_bench_method import load

REPO = Path(__file__).resolve().parents[1]


def photo(seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


def photo_repository(root: Path) -> tuple[Path, str]:
    """train/ and test/ folders with one sub-folder per landmark, the same file name in both and in two
    formats, a WebP named .jpg, a copy of another photo and a README: only real, distinct JPEGs are
    photos, each with an id of its own."""
    files = {
        "data/train/old bridge/old bridge (1).jpg": photo(1),
        "data/train/old bridge/old bridge (2).jpg": photo(2),
        "data/train/old bridge/old bridge (3).jpg": photo(1),  # a copy of (1)
        "data/train/old bridge/old bridge (4).jpg": photo(4, "WEBP"),
        "data/test/old bridge/old bridge (1).jpg": photo(5),
        "data/train/tower/tower (1).jpeg": photo(6),
        "data/train/tower/tower (1).jpg": photo(8),  # another photo of the same name
        "data/train/tower/tower (2).png": photo(7, "PNG"),
        "data/train/README.md": b"not a landmark",
    }
    return commit_files(root, files)


def commit_files(root: Path, files: dict[str, bytes]) -> tuple[Path, str]:
    """A new repository at `root` with `files` in one commit: its .git folder and the commit."""
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "photos")
    return root / ".git", git(root, "rev-parse", "HEAD").strip()


def build_set(monkeypatch, builder, sources: list, git_dir: Path, out: Path) -> pd.DataFrame:
    """The builder's command line run on `sources` as set `tiny`, each cloned at `git_dir`: its labels.csv."""
    monkeypatch.setitem(builder.SETS, "tiny", sources)
    argv = ["web_landmarks.py", "--set", "tiny", "--git-dir", *[str(git_dir)] * len(sources), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert builder.main() == 0
    return pd.read_csv(out / "labels.csv")


def test_builds_labels_from_the_pinned_commit(tmp_path, monkeypatch):
    builder = load("web_landmarks")
    git_dir, commit = photo_repository(tmp_path / "source")
    out = tmp_path / "set"
    labels = build_set(
        monkeypatch, builder, [builder.Source("someone/photos", commit, ("data/train", "data/test"))], git_dir, out
    )
    assert sorted(labels["id"]) == [
        "test_old_bridge_1",
        "train_old_bridge_1",
        "train_old_bridge_2",
        "train_tower_1",
        "train_tower_1_jpg",
    ]
    assert labels["path"].is_unique
    assert dict(zip(labels["landmark_name"], labels["landmark_id"])) == {"old_bridge": 0, "tower": 1}
    assert set(labels["split"]) == {"all"} and set(labels["source_commit"]) == {commit}
    for row in labels.itertuples():
        assert Image.open(out / row.path).format == "JPEG"
        assert (out / row.path).read_bytes() == (tmp_path / "source" / row.source_path).read_bytes()


def test_refuses_a_clone_without_the_commit_and_an_output_inside_the_repository(tmp_path, monkeypatch):
    builder = load("web_landmarks")
    git_dir, _ = photo_repository(tmp_path / "source")
    other = builder.Source("someone/photos", "0" * 40, ("data/train",))
    monkeypatch.setitem(builder.SETS, "tiny", [other])
    argv = ["web_landmarks.py", "--set", "tiny", "--git-dir", str(git_dir), "--out", str(tmp_path / "set")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=f"commit {'0' * 40} of someone/photos is not in it"):
        builder.main()
    monkeypatch.setattr(sys, "argv", [*argv[:-1], str(REPO / "bench" / "out" / "set")])
    with pytest.raises(SystemExit, match="inside the repository"):
        builder.main()


def test_a_source_can_keep_only_the_landmarks_it_names(tmp_path, monkeypatch):
    builder = load("web_landmarks")
    git_dir, commit = photo_repository(tmp_path / "source")
    only_tower = builder.Source("someone/photos", commit, ("data/train", "data/test"), ("tower",))
    out = tmp_path / "set"
    labels = build_set(monkeypatch, builder, [only_tower], git_dir, out)
    assert sorted(labels["id"]) == ["train_tower_1", "train_tower_1_jpg"]
    assert set(labels["landmark_name"]) == {"tower"} and not (out / "images" / "old_bridge").exists()


def test_a_named_landmark_missing_from_the_commit_is_an_error(tmp_path, monkeypatch):
    builder = load("web_landmarks")
    git_dir, commit = photo_repository(tmp_path / "source")
    misspelt = builder.Source("someone/photos", commit, ("data/train",), ("tower", "towr"))
    monkeypatch.setitem(builder.SETS, "tiny", [misspelt])
    argv = ["web_landmarks.py", "--set", "tiny", "--git-dir", str(git_dir), "--out", str(tmp_path / "set")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"someone/photos: no .jpg/.jpeg photos of landmark folder\(s\) \['towr'\]"):
        builder.main()


def test_a_set_of_several_sources_numbers_their_landmarks_on_and_refuses_one_landmark_twice(tmp_path, monkeypatch):
    builder = load("web_landmarks")
    git_dir, commit = photo_repository(tmp_path / "source")
    bridge = builder.Source("someone/photos", commit, ("data/train",), ("old bridge",))
    tower = builder.Source("someone/photos", commit, ("data/train",), ("tower",))
    monkeypatch.setitem(builder.SETS, "two", [tower, bridge])
    out = tmp_path / "set"
    argv = ["web_landmarks.py", "--set", "two", "--git-dir", str(git_dir), str(git_dir), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert builder.main() == 0
    labels = pd.read_csv(out / "labels.csv")
    assert dict(zip(labels["landmark_name"], labels["landmark_id"])) == {"tower": 0, "old_bridge": 1}
    assert labels["id"].is_unique

    monkeypatch.setitem(builder.SETS, "two", [tower, tower])
    monkeypatch.setattr(sys, "argv", [*argv[:-1], str(tmp_path / "again")])
    with pytest.raises(SystemExit, match=r"landmark folder\(s\) \['tower'\] in more than one source"):
        builder.main()


def test_landmark_folders_sharing_file_names_get_ids_of_their_own_and_per_landmark_caps_each(tmp_path, monkeypatch):
    """Every landmark folder of one source may hold a `10.jpg` (and a `10.jpeg`): the extension, then the
    landmark's folder tells them apart; `per_landmark` keeps the first photos of each landmark by name."""
    builder = load("web_landmarks")
    root = tmp_path / "source"
    files = {"images/gate/10.jpg": photo(1), "images/gate/11.jpg": photo(2), "images/gate/12.jpg": photo(3)}
    files |= {"images/old fort/10.jpeg": photo(4), "images/old fort/10.jpg": photo(5), "images/tower/10.jpg": photo(6)}
    git_dir, commit = commit_files(root, files)
    source = builder.Source("someone/photos", commit, ("images",), per_landmark=2)
    labels = build_set(monkeypatch, builder, [source], git_dir, tmp_path / "set")
    assert dict(zip(labels["source_path"], labels["id"])) == {
        "images/gate/10.jpg": "10",
        "images/gate/11.jpg": "11",
        "images/old fort/10.jpeg": "10_jpeg",
        "images/old fort/10.jpg": "10_jpg",
        "images/tower/10.jpg": "tower_10",
    }

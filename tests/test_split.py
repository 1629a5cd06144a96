"""The split stage: streaming CSV -> P deterministic partitions, with input errors named."""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from landmarks import split
from landmarks.common import StageError
from landmarks.tables import PART_SCHEMA


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def read_parts(out_dir: Path, partitions: int) -> list[list[dict]]:
    return [pq.read_table(out_dir / f"part-{k:03d}.parquet").to_pylist() for k in range(partitions)]


def test_rows_go_to_the_part_of_their_id_whatever_the_csv_order(tmp_path):
    rows = [(f"{i:05d}", f"http://example.org/{i}.jpg", "" if i % 4 == 0 else str(i % 9)) for i in range(300)]
    forward = write_csv(
        tmp_path / "a.csv", "id,url,landmark_id,comment\n" + "".join(f"{a},{b},{c},x\n" for a, b, c in rows)
    )
    shuffled_rows = rows[:]
    random.Random(1).shuffle(shuffled_rows)
    shuffled = write_csv(
        tmp_path / "b.csv", "id,url,landmark_id\n" + "".join(f"{a},{b},{c}\n" for a, b, c in shuffled_rows)
    )

    counts = split.split_csv(forward, 4, tmp_path / "fwd")
    split.split_csv(shuffled, 4, tmp_path / "shuf")
    assert sum(counts) == 300 and sorted(p.name for p in (tmp_path / "fwd").iterdir()) == [
        "part-000.parquet",
        "part-001.parquet",
        "part-002.parquet",
        "part-003.parquet",
    ]
    for k, (a, b) in enumerate(zip(read_parts(tmp_path / "fwd", 4), read_parts(tmp_path / "shuf", 4))):
        assert {r["id"] for r in a} == {r["id"] for r in b}
        assert all(split.partition_of(r["id"], 4) == k for r in a)
        assert [r["row"] for r in a] == sorted(r["row"] for r in a)  # CSV order kept inside a part
    first = {r["id"]: r for part in read_parts(tmp_path / "fwd", 4) for r in part}
    assert first["00000"] == {
        "id": "00000",
        "url": "http://example.org/0.jpg",
        "landmark_id": None,
        "split": None,
        "row": 1,
    }
    assert first["00007"]["landmark_id"] == 7 and first["00299"]["row"] == 300  # leading zeros kept
    schema = pq.read_schema(tmp_path / "fwd" / "part-000.parquet")
    assert schema.remove_metadata().equals(PART_SCHEMA)


def test_split_column_gz_input_and_negative_labels(tmp_path):
    text = "id,url,landmark_id,split\nq1,http://h/1.jpg,-1,test\nq2,http://h/2.jpg,  12 ,\nq3,http://h/3.jpg,,nonlandmark\n"
    path = tmp_path / "urls.csv.gz"
    path.write_bytes(gzip.compress(("\ufeff" + text).encode()))  # a BOM too, as spreadsheets write it
    split.split_csv(path, 1, tmp_path / "out")
    rows = read_parts(tmp_path / "out", 1)[0]
    assert [(r["id"], r["landmark_id"], r["split"]) for r in rows] == [
        ("q1", -1, "test"),
        ("q2", 12, None),
        ("q3", None, "nonlandmark"),
    ]


def test_compression_is_read_from_the_bytes_not_the_name(tmp_path):
    import bz2

    text = "id,url,landmark_id\nq1,http://h/1.jpg,3\nq2,http://h/2.jpg,4\n"
    for name, data in (
        ("gzip-named.csv", gzip.compress(text.encode())),
        ("bz2-named.csv", bz2.compress(text.encode())),
    ):
        (tmp_path / name).write_bytes(data)
        assert sum(split.split_csv(tmp_path / name, 1, tmp_path / name.replace(".", "-"))) == 2
    (tmp_path / "archive.csv").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(StageError, match=r"archive.csv: this is a zip archive \(unzip it first\), not a CSV"):
        split.split_csv(tmp_path / "archive.csv", 1, tmp_path / "zip")
    (tmp_path / "binary.csv").write_bytes(b"\x00\x01\x02garbage")
    with pytest.raises(StageError, match=r"binary.csv: binary data, not a CSV text file \(its first bytes"):
        split.split_csv(tmp_path / "binary.csv", 1, tmp_path / "bin")


def test_hash_is_vectorised_exactly_and_spreads_evenly():
    rng = random.Random(0)
    ids = ["", "a", "é漢字", "x" * 5000] + ["".join(rng.choices("0123456789abcdef", k=16)) for _ in range(7000)]
    array = pa.array(ids)
    assert split.hash_ids(array).tolist() == [split.stable_id_hash(i) for i in ids]
    assert split.hash_ids(array.slice(3, 5)).tolist() == [split.stable_id_hash(i) for i in ids[3:8]]
    sizes = [0] * 7
    for h in split.hash_ids(array).tolist():
        sizes[h % 7] += 1
    assert max(sizes) < 1.15 * len(ids) / 7 and min(sizes) > 0.85 * len(ids) / 7
    # Pinned: changing the formula would move ids to other parts (and refetch them) on every cluster.
    assert split.stable_id_hash("abc") == 0xA835A5B0482C837B
    assert split.partition_of("0000059fc4f5cc0b", 100) == 25


def test_fewer_partitions_remove_the_stale_parts(tmp_path):
    path = write_csv(tmp_path / "u.csv", "id,url,landmark_id\n" + "".join(f"i{i},http://h/{i},1\n" for i in range(40)))
    split.split_csv(path, 5, tmp_path / "out")
    split.split_csv(path, 2, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-000.parquet", "part-001.parquet"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"the CSV is empty"),
        ("id,url,landmark_id\n", r"has a header but no rows"),
        (
            "image,link,landmark_id\na,http://h/a,1\n",
            r"missing column\(s\) 'id', 'url'; the header has 'image', 'link'",
        ),
        ("id,landmark_id\na,1\n", r"missing column\(s\) 'url'"),
        (
            "id,url,landmark_id\na,http://h/a,1\nb,http://h/b,2\na,http://h/c,3\nc,http://h/d,4\nb,http://h/e,5\n",
            r"2 duplicate id\(s\): 'a' at rows 1, 3; 'b' at rows 2, 5",
        ),
        (
            "id,url,landmark_id\na,http://h/a,1\nb,http://h/b,church\nc,http://h/c,2.5\n",
            r"landmark_id must be an integer or empty .* row 2 \('church'\), row 3 \('2.5'\)",
        ),
        (
            "id,url,landmark_id\na,http://h/a,1\nb,http://h/b\n",
            r"cannot parse the CSV \(CSV parse error: line 3: Expected 3 columns, got 2",
        ),
    ],
    ids=["empty", "header-only", "no-id-url", "no-url", "duplicates", "bad-landmark", "ragged"],
)
def test_input_errors_name_the_file_and_write_nothing(tmp_path, content, message):
    path = write_csv(tmp_path / "bad.csv", content)
    with pytest.raises(StageError, match=message) as error:
        split.split_csv(path, 3, tmp_path / "out")
    assert str(path) in str(error.value)
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_unreadable_inputs(tmp_path):
    with pytest.raises(StageError, match="nope.csv: file not found"):
        split.split_csv(tmp_path / "nope.csv", 2, tmp_path / "out")
    with pytest.raises(StageError, match="is a folder"):
        split.split_csv(tmp_path, 2, tmp_path / "out")
    binary = tmp_path / "photo.csv"
    binary.write_bytes(b"id,url,landmark_id\n\xff\xd8\xff\xe0,\x00\x9f,1\n")
    with pytest.raises(StageError, match="photo.csv: cannot parse the CSV .*UTF8"):
        split.split_csv(binary, 2, tmp_path / "out")


def test_empty_ids_are_left_to_the_download_stage(tmp_path):
    path = write_csv(tmp_path / "u.csv", "id,url,landmark_id\n,http://h/1,1\n,http://h/2,2\nok,http://h/3,3\n")
    assert sum(split.split_csv(path, 2, tmp_path / "out")) == 3  # two empty ids are not "duplicates"


def test_cli(tmp_path):
    path = write_csv(tmp_path / "u.csv", "id,url\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "landmarks.split",
            "--csv",
            str(path),
            "--settings",
            '{"partitions": 2}',
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "error: " + str(path) + ": the CSV has a header but no rows" in result.stderr
    result = subprocess.run([sys.executable, "-m", "landmarks.split", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--settings" in result.stdout

"""Shared helpers of the stages: files written atomically get the mode a plain open() gives."""

import os
import stat

import pytest

from landmarks import split
from landmarks.common import atomic_path, current_umask, write_json_atomic


@pytest.fixture(params=[0o022, 0o002], ids=["umask-0022", "umask-0002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    assert current_umask() == umask
    (tmp_path / "plain.txt").write_text("x")
    expected = mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~umask
    with atomic_path(tmp_path / "atomic.bin") as tmp:
        tmp.write_bytes(b"x")
    write_json_atomic(tmp_path / "summary.json", {"a": 1})
    assert mode(tmp_path / "atomic.bin") == mode(tmp_path / "summary.json") == expected


def test_a_stage_writes_group_readable_files_under_the_groups_umask(tmp_path, umask):
    csv = tmp_path / "urls.csv"
    csv.write_text("id,url,landmark_id\n" + "".join(f"i{n},http://127.0.0.1:1/{n}.jpg,{n % 3}\n" for n in range(9)))
    assert split.main(["--csv", str(csv), "--settings", '{"partitions": 2}', "--out-dir", str(tmp_path / "split")]) == 0
    parts = sorted((tmp_path / "split").glob("part-*.parquet"))
    assert len(parts) == 2 and {mode(part) for part in parts} == {0o666 & ~umask}

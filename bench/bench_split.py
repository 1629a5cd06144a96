"""Peak memory and time of the split stage on a generated Google-Landmarks-like CSV.

    .venv/bin/python bench/bench_split.py --rows 5000000 --partitions 64

Writes the CSV and the parts under a temporary folder (removed afterwards), runs
`python -m landmarks.split` as a child process and reports its wall time, CPU time and peak
resident memory (ru_maxrss of the child).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """GLDv2-like rows: 16 hex-digit ids, ~100-character URLs, ~200k landmark ids."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        fh.write("id,url,landmark_id\n")
        chunk = []
        for i in range(rows):
            image_id = f"{rng.getrandbits(64):016x}"
            url = (
                f"https://upload.wikimedia.org/wikipedia/commons/{image_id[0]}/{image_id[:2]}/"
                f"Photo_{rng.getrandbits(40):x}_of_a_landmark.jpg"
            )
            landmark = "" if i % 10 == 0 else str(rng.randrange(200_000))
            chunk.append(f"{image_id},{url},{landmark}\n")
            if len(chunk) == 100_000:
                fh.writelines(chunk)
                chunk = []
        fh.writelines(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_split_"))
    try:
        csv = work / "urls.csv"
        started = time.monotonic()
        write_csv(csv, args.rows)
        print(f"generated {args.rows} rows, {csv.stat().st_size / 1e6:.0f} MB in {time.monotonic() - started:.0f} s")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "landmarks.split",
                "--csv",
                str(csv),
                "--settings",
                json.dumps({"partitions": args.partitions}),
                "--out-dir",
                str(work / "split"),
            ],
            check=True,
        )
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(
            f"split: {args.rows} rows -> {args.partitions} parts: wall {wall:.1f} s, CPU {cpu:.1f} s, "
            f"peak RSS {after.ru_maxrss / 1024:.0f} MiB"
        )
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

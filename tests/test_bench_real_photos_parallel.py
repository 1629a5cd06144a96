"""bench/real_photos_parallel.py: the merged tables, the time limit and the skip (no photos, no pipeline runs)."""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from conftest import load_bench_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "real_photos_parallel.py"


def load_driver():
    return load_bench_script("real_photos_parallel")


def run_driver(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, arguments)], capture_output=True, text=True, timeout=120
    )


def driver_args(driver, tmp_path: Path, **changes) -> argparse.Namespace:
    settings = {
        "landmarks": [tmp_path / "web", tmp_path / "asia"],
        "regimes": ["full", "fewshot"],
        "seeds": [0, 1],
        "experiments": ["pretrained", "finetuned"],
        "catalogue": {name: driver.real_photos.EXPERIMENTS[name] for name in ("pretrained", "finetuned")},
        "out": tmp_path / "out",
        "time_limit": None,
        "port": 9000,
        "cores": 2,
        **changes,
    }
    return argparse.Namespace(**settings)


def write_run_rows(out: Path, run: str, regime: str, seed: int, gaps: tuple[float, float]) -> None:
    """The results-<regime>.csv one real_photos.py process writes for its one regime and seed."""
    rows = [
        {"regime": regime, "seed": seed, "experiment": name, "selected": "epoch 1", "gap": gap, "accuracy": 0.5}
        for name, gap in zip(("pretrained", "finetuned"), gaps)
    ]
    (out / run).mkdir(parents=True)
    pd.DataFrame(rows).to_csv(out / run / f"results-{regime}.csv", index=False)


def test_each_sets_table_holds_its_finished_runs_in_regime_order_and_names_the_others(tmp_path):
    driver = load_driver()
    args = driver_args(driver, tmp_path)
    out = args.out
    write_run_rows(out, "web-fewshot-seed1", "fewshot", 1, (0.44, 0.50))
    write_run_rows(out, "web-full-seed0", "full", 0, (0.60, 0.70))
    write_run_rows(out, "web-fewshot-seed0", "fewshot", 0, (0.40, 0.52))
    write_run_rows(out, "web-full-seed1", "full", 1, (0.62, 0.99))  # stopped after writing: not in the table
    codes = {
        "web-full-seed0": 0,
        "web-full-seed1": None,
        "web-fewshot-seed0": 0,
        "web-fewshot-seed1": 0,
        "asia-full-seed0": 1,
        "asia-full-seed1": None,
        "asia-fewshot-seed0": None,
        "asia-fewshot-seed1": None,
    }

    text = driver.merge(args, codes)

    web = pd.read_csv(out / "web.csv")
    assert list(zip(web["regime"], web["seed"])) == [("full", 0)] * 2 + [("fewshot", 0)] * 2 + [("fewshot", 1)] * 2
    assert (out / "web.md").read_text() in text
    assert "| finetuned | 0.510 ± 0.010 |" in text  # few-shot: both seeds; full: seed 0 alone (0.700)
    assert "| finetuned | 0.700 |" in text and "0.99" not in text
    assert "## asia\n\nno run finished" in text and not (out / "asia.csv").exists()
    assert "web-full-seed1 (stopped)" in text and "asia-full-seed0 (exit code 1)" in text
    assert "web-full-seed0 (" not in text


def test_the_time_limit_stops_each_run_with_the_processes_it_started(tmp_path, monkeypatch):
    driver = load_driver()
    children = tmp_path / "children"
    children.mkdir()

    def fake_start(args, landmarks, regime, seed, port):
        # A run that finishes at once, and runs that would go on for minutes with a child of their own
        # (as real_photos.py's Snakemake and its jobs do).
        script = "exit 0" if regime == "fewshot" else f"sleep 300 & echo $! > {children}/{port}; wait"
        return subprocess.Popen(["bash", "-c", script], start_new_session=True)

    monkeypatch.setattr(driver, "start", fake_start)
    args = driver_args(driver, tmp_path, landmarks=[tmp_path / "web"], seeds=[0], time_limit=2)
    started = time.monotonic()

    codes = driver.run_all(args)

    assert codes == {"web-full-seed0": None, "web-fewshot-seed0": 0}
    assert time.monotonic() - started < 2 + driver.STOP_GRACE_S
    (child_file,) = children.iterdir()
    stat = Path(f"/proc/{child_file.read_text().strip()}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z"  # gone (or dead, not yet reaped)


def test_skips_with_the_reason_when_the_photos_are_absent(tmp_path):
    result = run_driver("--data", tmp_path / "absent", "--landmarks", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 0 and "SKIPPED: no real photos at" in result.stdout
    assert not (tmp_path / "out").exists()


def test_two_photo_sets_of_the_same_name_are_refused_before_anything_runs(tmp_path):
    for parent in ("a", "b"):
        (tmp_path / parent / "web").mkdir(parents=True)
    result = run_driver("--landmarks", tmp_path / "a" / "web", tmp_path / "b" / "web", "--out", tmp_path / "out")
    assert result.returncode == 2 and "two folders of the same name" in result.stderr
    assert not (tmp_path / "out").exists()

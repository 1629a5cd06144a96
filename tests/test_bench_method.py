"""bench/bench_download.py and bench/bench_gap.py: their figures pair the wall and CPU time of one run."""

import importlib.util
import math
import sys
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    sys.path.insert(0, str(REPO / "src"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_report_takes_each_median_round_whole(tmp_path):
    bench = load("bench_download")
    # ours: round 0 has the best wall time, round 2 the best CPU time, round 1 the median wall time.
    walls = {"ours": [2.0, 3.0, 4.0], "img2dataset": [9.0, 6.0, 3.0]}
    cpus = {"ours": [5.0, 4.0, 1.0], "img2dataset": [8.0, 8.0, 8.0]}
    rounds = [
        {
            **{f"{name}/full": (walls[name][r], cpus[name][r], 100) for name in walls},
            **{f"{name}/tiny": (0.5, 0.5, 20) for name in walls},
        }
        for r in range(3)
    ]
    args = Namespace(images=100, threads=2, concurrency=8, json=tmp_path / "out.json")
    summary = bench.report(rounds, args)
    assert summary["median_round"]["ours"]["wall_s"] == 3.0
    assert summary["median_round"]["ours"]["cpu_s"] == 4.0  # the same round's, not the best (1.0)
    assert summary["median_round"]["img2dataset"]["wall_s"] == 6.0
    # Ratios are taken within each round: images/s ours/other = other's wall / ours'.
    ratios = summary["ratios_ours_over_other"]["img2dataset"]["images/s"]
    assert [round(x, 6) for x in ratios] == [4.5, 2.0, 0.75]
    assert (tmp_path / "out.json").exists()


def test_download_steady_figures_are_nan_when_noise_swamps_them():
    bench = load("bench_download")
    figures = bench.figures({"x/full": (1.0, 1.0, 100), "x/tiny": (2.0, 2.0, 20)}, "x", 100)
    assert math.isnan(figures["steady_img_per_s"]) and math.isnan(figures["steady_cpu_ms_per_img"])


def test_gap_best_times_alternate_and_pair_wall_with_cpu():
    bench = load("bench_gap")
    calls = []
    best, results = bench.best_times({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b"] * 3
    assert results == {"a": 1, "b": 2}
    assert all(len(times) == 2 and times[0] >= 0 and times[1] >= 0 for times in best.values())


def test_gap_loop_inputs_from_frames_equal_the_dicts():
    bench = load("bench_gap")
    pred, truth = bench.make_data(200, seed=1)
    for pred_input, truth_input in bench.input_kinds(pred, truth).values():
        pred_dict, truth_dict = bench.loop_inputs(pred_input, truth_input)
        assert truth_dict == truth
        assert len(pred_dict) == len(pred)
        first = pred.iloc[0]
        assert pred_dict[first["id"]] == (first["landmark_id"], first["score"])

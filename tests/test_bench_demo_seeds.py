"""bench/demo_seeds.py: the config it runs (each contender once per training seed) and the table it prints."""

import importlib.util
import sys
from pathlib import Path

import pandas as pd

from landmarks.config import experiment_settings, validate_config

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    sys.path.insert(0, str(REPO / "bench"))  # it imports real_photos beside it, as `python bench/...` does
    try:
        spec = importlib.util.spec_from_file_location("demo_seeds", REPO / "bench" / "demo_seeds.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_each_contender_trains_once_per_seed_with_its_own_overrides_on_the_demo_config():
    bench = load_bench()
    contenders = {"finetuned": {}, "no_whitening": {"train": {"whitening": "none"}}}
    config = validate_config(bench.demo_config(contenders, [0, 3], port=9999))
    assert config["input"]["urls_csv"] is None and config["demo"]["port"] == 9999  # the demo, its own server
    assert sorted(config["experiments"]) == sorted(
        ["not_finetuned", "finetuned_seed0", "finetuned_seed3", "no_whitening_seed0", "no_whitening_seed3"]
    )
    plain, unwhitened = (
        experiment_settings(config, name)["train"] for name in ("finetuned_seed3", "no_whitening_seed3")
    )
    assert (plain["seed"], plain["whitening"]) == (3, "learned")
    assert (unwhitened["seed"], unwhitened["whitening"]) == (3, "none")
    assert contenders["no_whitening"] == {"train": {"whitening": "none"}}  # the caller's spec is not changed
    assert experiment_settings(config, "not_finetuned")["train"]["epochs"] == 0


def test_the_table_gives_each_contenders_gain_over_the_first_on_the_same_seed():
    bench = load_bench()
    rows = [
        {"contender": "not_finetuned", "seed": None, "gap": 0.8},
        {"contender": "finetuned", "seed": 0, "gap": 0.90},
        {"contender": "finetuned", "seed": 1, "gap": 0.95},
        {"contender": "other", "seed": 0, "gap": 0.93},
        {"contender": "other", "seed": 1, "gap": 0.94},
    ]
    other_columns = {key: 0.5 for key in bench.COLUMNS if key != "gap"}
    text = bench.render(pd.DataFrame([{**other_columns, **row} for row in rows]), {"finetuned": {}, "other": {}})
    other = next(line for line in text.splitlines() if line.startswith("| other "))
    assert "0.930 / 0.940" in other
    assert other.rstrip(" |").endswith("0.010 ± 0.020")  # +0.03 on seed 0, -0.01 on seed 1

"""configs/: one config per published experiment. Each is valid against the schema, names the data it
needs and the numbers its authors reported, dry-runs the whole DAG on a stand-in of its data, asks SLURM
for the GPUs it configures, and is listed in the README's reproduction table."""

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from snakemake_helpers import dry_run

from landmarks.config import demo_mode, experiment_settings, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PUBLISHED = [
    "seed000",
    "seed001_top10",
    "seed001_top20",
    "seed001_top30",
    "seed001_top50",
    "seed002",
    "seed003",
    "seed004",
    "glr2020",
]


def header(path: Path) -> str:
    """The comment block a config starts with: what it reproduces, the reported numbers, the data."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return "\n".join(lines)


def write_stand_in_data(config: dict, workdir: Path) -> None:
    """Tiny files at the paths the config names, so the DAG can be built without the real data."""
    urls_csv = workdir / config["input"]["urls_csv"]
    urls_csv.parent.mkdir(parents=True, exist_ok=True)
    urls_csv.write_text(
        "id,url,landmark_id,split\n0a1b2c,https://example.org/a.jpg,1,\n0d4e5f,https://example.org/b.jpg,,test\n"
    )
    if config["input"]["solution_csv"]:
        solution = workdir / config["input"]["solution_csv"]
        solution.parent.mkdir(parents=True, exist_ok=True)
        solution.write_text("id,landmarks,Usage\n0d4e5f,,Private\n")


def test_every_published_experiment_has_a_config():
    stems = [path.stem for path in CONFIGS]
    for prefix in PUBLISHED:
        assert any(stem.startswith(prefix) for stem in stems), f"no configs/{prefix}*.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_and_names_its_data_and_reported_numbers(path):
    config = load_config(path)  # raises ConfigError naming the key on anything the schema rejects
    for name in config["experiments"]:
        settings = experiment_settings(config, name, str(path))  # each experiment's merged sections are valid too
        # The published recipe, not the few-photos defaults: a trained linear neck, no WiSE-FT, no verification.
        train = settings["train"]
        assert (train["neck"], train["head_init"], train["freeze_bn"], train["wise_alpha"]) == (
            "linear",
            "random",
            False,
            1.0,
        ), name
        retrieve = settings["retrieve"]
        assert retrieve["verify"]["neighbours"] == 0, name
        if retrieve["rerank"] != "glr2020":  # the published confidence: no impostor term, no runner-up margin
            assert (retrieve["impostor_weight"], retrieve["margin_weight"]) == (0, 0), name
    assert not demo_mode(config), "a reproduction config points at the data it reproduces, not the demo"
    text = header(path)
    assert "Reported by" in text
    assert "Data it needs" in text and config["input"]["urls_csv"] in text
    if config["input"]["solution_csv"]:
        assert config["input"]["solution_csv"] in text
    assert f"--configfile configs/{path.name}" in text  # the command that runs it


@pytest.fixture(scope="module")
def planned_jobs(tmp_path_factory):
    """Every config's dry run, side by side (each is a Snakemake process that mostly imports and builds a
    DAG: on 2 cores two at a time take half as long as one after the other). Config path -> the jobs it
    plans (rule name, wildcards and resources), or the AssertionError of a failed dry run."""

    def plan(path: Path):
        workdir = tmp_path_factory.mktemp(path.stem)
        write_stand_in_data(load_config(path), workdir)
        try:
            return dry_run(workdir, configfiles=[path]).jobs
        except AssertionError as error:  # reported by the config's own test
            return error

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(CONFIGS, pool.map(plan, CONFIGS)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_dry_runs_the_whole_dag(path, planned_jobs):
    config = load_config(path)
    jobs = planned_jobs[path]
    if isinstance(jobs, AssertionError):
        raise jobs
    counts = {}
    for job in jobs:
        counts[job["rule"]] = counts.get(job["rule"], 0) + 1
    experiments = list(config["experiments"])
    partitions = config["split"]["partitions"]
    assert counts["download"] == partitions
    assert counts.get("places365", 0) == (partitions if config["places365"]["enabled"] else 0)
    assert counts["shard"] == 4 * config["shard"]["parts"]
    assert counts.get("train", 0) + counts.get("train_multinode", 0) == len(experiments)
    assert counts["embed"] == 4 * len(experiments)
    assert counts["retrieve"] == counts["score"] == len(experiments)
    assert counts["summary"] == 1
    # The GPUs each experiment configures are what its jobs ask SLURM for (`gpu` resource -> sbatch --gpus).
    for job in jobs:
        if job["rule"] in ("train", "train_multinode", "embed", "retrieve"):
            settings = experiment_settings(config, job["wildcards"]["experiment"])
            section = "train" if job["rule"].startswith("train") else job["rule"]
            wanted = settings[section]["gpus"] * (settings["train"]["nodes"] if section == "train" else 1)
            assert int(job["resources"].get("gpu", 0)) == wanted, (job, wanted)
        elif job["rule"] == "places365":
            assert int(job["resources"].get("gpu", 0)) == config["places365"]["gpus"]


def test_readme_lists_every_config_with_its_reported_numbers():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Reproduction configs", 1)
    assert len(section) == 2, "README.md has no '## Reproduction configs' section"
    table_rows = [line for line in section[1].split("\n## ", 1)[0].splitlines() if line.startswith("| `configs/")]
    listed = {re.match(r"\| `configs/([\w.-]+)\.yaml`", row).group(1) for row in table_rows}
    assert listed == {path.stem for path in CONFIGS}
    for path in CONFIGS:  # the seeds' headline numbers appear in the table as in the config
        numbers = set(re.findall(r"\b0\.\d{3,4}\b", header(path).split("Data it needs")[0]))
        row = next(row for row in table_rows if f"`configs/{path.name}`" in row)
        assert numbers <= set(re.findall(r"\b0\.\d{3,4}\b", row)), (path.name, numbers)

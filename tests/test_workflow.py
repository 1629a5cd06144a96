"""The whole Snakemake DAG on the tiny demo (.test/config.yaml): it runs end to end, a second run does
nothing, and config edits rerun exactly the stages that depend on them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import free_port
from snakemake_helpers import DAG_RULES, TEST_CONFIG, dry_run, job_stats
from snakemake_helpers import snakemake as run_snakemake

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_OF_SELECT = {"demo", "split", "download", "places365"}


def configfiles(workdir: Path) -> list[Path]:
    """The tiny demo, then the test's own settings on top: the demo server's port and any edits."""
    return [TEST_CONFIG, workdir / "config.yaml"]


# Two embed (and retrieve) jobs at once, one thread each, instead of one after the other with two: on the
# tiny demo each job is mostly Python start-up (torch, timm), so the run takes ~23% less; and jobs of one
# stage running side by side is what a cluster does anyway. After the targets: the option takes every word
# up to the next option.
ONE_THREAD_STAGES = ("--set-threads", "embed=1", "retrieve=1")


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_snakemake(workdir, *args, *ONE_THREAD_STAGES, configfiles=configfiles(workdir), cores=2, timeout=timeout)


def planned_jobs(workdir: Path, *targets: str) -> dict[str, int]:
    """Jobs a dry run would execute, per rule (from Snakemake's job stats table)."""
    return dry_run(workdir, *targets, *ONE_THREAD_STAGES, configfiles=configfiles(workdir), cores=2, timeout=600).counts


def edit_config(workdir: Path, section: str, key: str, value) -> None:
    path = workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump({"demo": {"port": free_port()}}))
    result = snakemake(workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir


@pytest.mark.slow
def test_demo_dag_runs_end_to_end(finished_run):
    results = finished_run / "results"
    summary = (results / "summary.md").read_text()
    assert "| tiny |" in summary
    manifests = pd.concat(pd.read_parquet(p) for p in sorted(results.glob("download/part-*/manifest.parquet")))
    urls = pd.read_csv(finished_run / "data" / "demo" / "urls.csv", dtype=str)
    assert len(manifests) == len(urls)  # one manifest row per URL, success or not
    faults = pd.read_csv(finished_run / "data" / "demo" / "faults.csv", dtype=str)
    failed = set(manifests.loc[manifests["status"] != "ok", "id"])
    assert failed == set(faults["id"])  # exactly the broken links failed, each for its own reason
    scenes = pd.read_parquet(results / "places365" / "part-000.parquet")
    assert set(scenes["scene_status"]) == {"no_weights"}  # offline: kept, and says why
    selection = pd.read_parquet(results / "select" / "selection.parquet")
    assert set(selection["split"]) == {"train", "val", "test", "nonlandmark"}
    test_ids = set(selection.loc[selection["split"] == "test", "id"])
    assert not test_ids & set(selection.loc[selection["split"] == "nonlandmark", "id"])
    metrics = yaml.safe_load((results / "experiments" / "tiny" / "score" / "metrics.json").read_text())
    assert metrics["queries"] == len(test_ids)
    assert metrics["verified"] is not None  # geometric verification ran (on by default)
    submission = pd.read_csv(results / "experiments" / "tiny" / "retrieve" / "submission.csv", dtype=str)
    assert set(submission["id"]) == test_ids
    # Every rule wrote its log, and the demo server's log shows it served the downloads.
    assert (results / "logs" / "train" / "tiny.log").stat().st_size > 0
    assert "GET /images/" in (results / "logs" / "demo_server.log").read_text()


@pytest.mark.slow
def test_fine_tuning_beats_the_untrained_backbone_on_the_demo(finished_run):
    experiments = finished_run / "results" / "experiments"
    tuned, untrained = (
        json.loads((experiments / name / "score" / "metrics.json").read_text()) for name in ("tiny", "baseline")
    )
    assert tuned["gap"] > untrained["gap"] and tuned["accuracy"] > untrained["accuracy"], (tuned, untrained)
    assert json.loads((experiments / "tiny" / "train" / "train.json").read_text())["selected"] != "pretrained"


@pytest.mark.slow
def test_second_run_does_nothing(finished_run):
    assert planned_jobs(finished_run) == {}
    result = snakemake(finished_run)
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_snakemake_predict_recognises_the_demo_new_photos(finished_run, tmp_path):
    """`snakemake predict` answers the demo's new photos with the cached stages; editing the predict
    section reruns predict alone."""
    result = snakemake(finished_run, "predict")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert job_stats(result.stdout + result.stderr) == {"predict": 1}  # every stage before it was cached
    out = finished_run / "results" / "experiments" / "tiny" / "predict"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    truth = pd.read_csv(finished_run / "data" / "demo" / "new_photos.csv", dtype=str, keep_default_na=False)
    assert len(rows) == len(truth) and not any(row["error"] for row in rows)
    answers = {Path(row["id"]).name: row for row in rows}
    landmarks = truth[truth["landmark_id"] != ""]
    right = sum(
        str(answers[name]["predicted_landmark_id"]) == label
        for name, label in zip(landmarks["file"], landmarks["landmark_id"])
    )
    assert right >= len(landmarks) // 2, (right, len(landmarks))
    assert all(row["threshold_source"] == "val" for row in rows)
    assert (out / "index.html").stat().st_size > 0 and (out / "submission.csv").exists()
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run, workdir, symlinks=True)
    edit_config(workdir, "predict", "top_landmarks", 2)
    assert planned_jobs(workdir, "predict") == {"predict": 1}


@pytest.mark.slow
def test_editing_train_reruns_only_train_and_downstream(finished_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run, workdir, symlinks=True)
    edit_config(workdir, "train", "lr", 0.002)
    # Both experiments inherit the train section; 4 splits embedded each.
    assert planned_jobs(workdir) == {"train": 2, "embed": 8, "retrieve": 2, "score": 2, "summary": 1}


@pytest.mark.slow
def test_editing_a_selection_threshold_reruns_from_select(finished_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run, workdir, symlinks=True)
    edit_config(workdir, "select", "min_outdoor_votes", 4)
    jobs = planned_jobs(workdir)
    assert not UPSTREAM_OF_SELECT & set(jobs), jobs
    assert jobs["select"] == 1 and jobs["train"] == 2 and jobs["summary"] == 1
    assert jobs["shard"] == 4  # train, val, test, nonlandmark


@pytest.mark.slow
def test_editing_retrieve_reruns_retrieve_score_summary(finished_run, tmp_path):
    """Planned and then really executed: the rerun leaves everything upstream untouched."""
    workdir = tmp_path / "copy"
    shutil.copytree(finished_run, workdir, symlinks=True)
    edit_config(workdir, "retrieve", "rerank", "glr2020")
    assert planned_jobs(workdir) == {"retrieve": 2, "score": 2, "summary": 1}
    results = workdir / "results"
    upstream = [
        results / "download" / "part-000" / "manifest.parquet",
        results / "select" / "selection.parquet",
        results / "experiments" / "tiny" / "train" / "model.pt",
        results / "experiments" / "tiny" / "embed" / "test.npy",
    ]
    before = [path.stat().st_mtime_ns for path in upstream]
    result = snakemake(workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [path.stat().st_mtime_ns for path in upstream] == before
    assert "glr2020" in (results / "summary.md").read_text()
    assert planned_jobs(workdir) == {}


def test_shipped_config_dry_runs_the_whole_dag(tmp_path):
    """`snakemake -n` on the shipped config.yaml lists every stage of the DAG."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    jobs = dry_run(tmp_path, configfiles=[tmp_path / "config.yaml"], cores=2, timeout=600).counts
    assert set(jobs) == DAG_RULES
    assert jobs["download"] == yaml.safe_load((REPO / "config.yaml").read_text())["split"]["partitions"]


def test_lint_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(REPO / "Snakefile")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )

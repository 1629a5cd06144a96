"""The demo DAG through a real SLURM cluster with `profiles/slurm`: every job is submitted with sbatch and
completes, sbatch asks for the resources the rules declare (GPUs only where the config sets them), a
second run submits nothing, config edits rerun exactly the stages that depend on them, and the HTML
report holds every experiment's figures.

Needs a running cluster: `sudo bash ../shared/slurm/start-local-slurm.sh` starts a single-node one on
this machine (`.ci/run` does, when it runs as root). Without one the tests skip and say why. The run
takes 4 to 6 minutes on 2 cores: Snakemake starts inside each of the ~19 jobs, and the plugin polls
`sacct` at growing intervals.
"""

import copy
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from snakemake_helpers import DAG_RULES, TEST_CONFIG, job_stats, jobs
from snakemake_helpers import snakemake as run_snakemake

from landmarks.config import deep_merge

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
START_SCRIPT = "../shared/slurm/start-local-slurm.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def tiny_config(port: int) -> dict:
    """The workflow tests' tiny demo (.test/config.yaml), smaller still (each SLURM job costs a Snakemake
    start-up), its demo server on `port`."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["experiments"] = {}  # one experiment: each SLURM job costs a Snakemake start-up
    return deep_merge(
        config,
        {
            "demo": {"port": port, "landmarks": 4, "views_per_landmark": 6, "nonlandmarks": 12},
            "split": {"partitions": 1},  # one download and one places365 job instead of two each
            "shard": {"size": 72},
            "train": {"image_size": 64, "epochs": 1, "batch_size": 8, "min_steps_per_epoch": 1},
            "download": {"threads": 1},
            "places365": {"workers": 0, "download_timeout_s": 2},
            "experiments": {"tiny": {"description": "tiny SLURM test experiment"}},
        },
    )


def write_config(path: Path, config: dict) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # keep the key order, as a user's file does


def run(cmd: list[str], timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def profile_default(key: str) -> str:
    return str(yaml.safe_load((PROFILE / "config.yaml").read_text())["default-resources"][key])


def cluster_problem() -> str | None:
    """Why no SLURM cluster here can run the profile's jobs, or None when one can."""
    for tool in ("sbatch", "sinfo", "sacct", "sacctmgr"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed"
    partition, account = profile_default("slurm_partition"), profile_default("slurm_account")
    try:
        sinfo = run(["sinfo", "-h", "-p", partition, "-o", "%T"], timeout=20)
        if sinfo.returncode != 0:
            return f"sinfo failed, no controller answers: {sinfo.stderr.strip()}"
        states = sinfo.stdout.split()
        if not any(state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for state in states):
            return f"partition {partition!r} of profiles/slurm has no usable node (states: {states or 'none'})"
        sacct = run(["sacct", "-n", "-X", "-S", "now"], timeout=20)
        if sacct.returncode != 0:  # the executor plugin polls sacct and would wait forever
            return f"sacct fails (no accounting): {sacct.stderr.strip()}"
        assoc = run(["sacctmgr", "-n", "-P", "list", "assoc", f"account={account}", "format=account"], timeout=20)
        if account not in assoc.stdout.split():
            return f"account {account!r} of profiles/slurm does not exist on this cluster"
    except subprocess.TimeoutExpired as err:
        return f"{err.cmd[0]} did not answer within {err.timeout} s"
    return None


def snakemake(
    workdir: Path,
    *args: str,
    config: str = "config.yaml",
    profile: bool = True,
    path_prefix: Path | None = None,
    timeout: float = 1500,
) -> subprocess.CompletedProcess:
    """Snakemake as a user runs it on SLURM. Test-only settings: the first status poll after 1 s instead
    of 40 s, and at most 1 core per job so that two jobs share the 2-core test node."""
    # Jobs inherit PATH (--export=ALL): the path_prefix first, then this Python's environment.
    slurm = (
        ["--profile", str(PROFILE), "--slurm-init-seconds-before-status-checks", "1", "--max-threads", "1"]
        if profile
        else []
    )
    return run_snakemake(
        workdir, *slurm, *args, configfiles=[workdir / config], path_prefix=path_prefix, timeout=timeout
    )


def job_blocks(output: str) -> dict[str, dict]:
    """Each job Snakemake scheduled, by the --comment the plugin gives it (rule_<rule>[_wildcards_<values>]):
    its rule, threads and resources as Snakemake computed them."""
    submitted = {}
    for job in jobs(output):
        if job["local"]:  # `all`: runs in the main process, never submitted
            continue
        wildcards = list(job["wildcards"].values())
        comment = f"rule_{job['rule']}" + (f"_wildcards_{'_'.join(wildcards)}" if wildcards else "")
        submitted[comment] = {"rule": job["rule"], "threads": job["threads"], "resources": job["resources"]}
    return submitted


def sbatch_calls(output: str) -> dict[str, str]:
    """The sbatch command line of each submitted job (logged with --verbose), by its --comment."""
    calls = {}
    for call in re.findall(r"^sbatch call: (sbatch .*?)(?: --wrap=.*)?$", output, re.M):
        calls[re.search(r"--comment (\S+)", call).group(1)] = call
    return calls


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    problem = cluster_problem()
    if problem:
        why = os.environ.get("LANDMARKS_SLURM_UNAVAILABLE")  # .ci/run says why it could not start one
        pytest.skip(
            f"no SLURM cluster: {problem}"
            + (f" ({why})" if why else "")
            + f"; start one with `sudo bash {START_SCRIPT}` (.ci/run does when it runs as root)"
        )
    workdir = tmp_path_factory.mktemp("slurm")
    write_config(workdir / "config.yaml", tiny_config(free_port()))
    started = time.monotonic()
    result = snakemake(workdir, "--verbose")
    output = result.stdout + result.stderr
    (workdir / "snakemake-slurm.log").write_text(output)  # kept with pytest's temporary folders, for a look
    print(f"SLURM run of the demo DAG: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, output[-6000:]
    return workdir, output


def test_every_job_went_through_sbatch_and_completed(slurm_run):
    workdir, output = slurm_run
    assert "| tiny |" in (workdir / "results" / "summary.md").read_text()
    planned = job_stats(output)
    assert set(planned) == DAG_RULES
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.$", output, re.M)
    assert len(submitted) == sum(planned.values())  # every job of the DAG, none run locally
    for job_id, log in submitted:  # the plugin's per-job log, named after the SLURM job id
        assert Path(log).is_file() and Path(log).name == f"{job_id}.log"
        assert Path(log).is_relative_to(workdir / ".snakemake" / "slurm_logs")
    ids = ",".join(job_id for job_id, _ in submitted)
    sacct = run(["sacct", "-X", "-n", "-P", "-j", ids, "-o", "JobID,Comment,State"])
    assert sacct.returncode == 0, sacct.stderr
    rows = [line.split("|") for line in sacct.stdout.splitlines()]
    assert sorted(job_id for job_id, _, _ in rows) == sorted(job_id for job_id, _ in submitted)
    assert {state for _, _, state in rows} == {"COMPLETED"}, rows
    rules = Counter(re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment).group(1) for _, comment, _ in rows)
    assert rules == planned


def test_sbatch_asks_for_what_each_rule_declares_and_no_gpu(slurm_run):
    _, output = slurm_run
    jobs, calls = job_blocks(output), sbatch_calls(output)
    assert set(calls) == {comment for comment, job in jobs.items() if job["rule"] in DAG_RULES}
    partition, account = profile_default("slurm_partition"), profile_default("slurm_account")
    for comment, call in calls.items():
        job = jobs[comment]
        assert f"-p {partition}" in call and f"-A {account}" in call
        assert f"--mem {job['resources']['mem_mb']} " in call
        assert f"-t {job['resources']['runtime']} " in call
        assert f"--cpus-per-task={job['threads']} " in call
        assert " --requeue" in call  # a preempted job goes back to the queue and resumes
        assert "--gpus" not in call and "--gres" not in call, call  # every gpus setting is 0 in this config
    # The GPU rules declare the resource (0 here), so a config with GPUs is all it takes (see below).
    assert {jobs[c]["rule"] for c in calls if "gpu" in jobs[c]["resources"]} == {
        "places365",
        "train",
        "embed",
        "retrieve",
    }


def test_second_run_submits_nothing_locally_or_on_slurm(slurm_run):
    workdir, _ = slurm_run
    again = snakemake(workdir, "--verbose", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr
    assert "sbatch call" not in again.stdout + again.stderr
    local = snakemake(workdir, "-n", profile=False, timeout=120)  # the local profile sees the same metadata
    assert "Nothing to be done" in local.stdout + local.stderr, local.stdout[-3000:]


RERUNS = [  # (section, key, value) -> rules that rerun, every job of each (README "Reruns")
    (("places365", "gpus", 1), set()),
    (("embed", "gpus", 1), {"embed", "retrieve", "score", "summary"}),
    (("input", "solution_csv", "solution.csv"), {"score", "summary"}),
    (("experiments", "tiny", {"description": "renamed"}), {"summary"}),
    (("download", "retries", 0), DAG_RULES - {"demo", "split"}),
]


@pytest.mark.parametrize(
    "edit, reruns", RERUNS, ids=lambda v: ".".join(map(str, v[:2])) if isinstance(v, tuple) else None
)
def test_config_edits_rerun_exactly_the_dependent_stages(slurm_run, edit, reruns):
    workdir, output = slurm_run
    section, key, value = edit
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config.setdefault(section, {})[key] = value
    (workdir / "solution.csv").write_text("id,landmarks,Usage\n")
    write_config(workdir / "edited.yaml", config)
    dry = snakemake(workdir, "-n", config="edited.yaml", timeout=120)
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = job_stats(output)
    assert job_stats(dry.stdout + dry.stderr) == Counter({rule: planned[rule] for rule in reruns})


def test_reordering_config_keys_reruns_nothing(slurm_run):
    workdir, _ = slurm_run
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    reordered = {
        section: dict(reversed(list(values.items()))) if isinstance(values, dict) else values
        for section, values in reversed(list(config.items()))
    }
    write_config(workdir / "reordered.yaml", reordered)
    dry = snakemake(workdir, "-n", config="reordered.yaml", timeout=120)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert job_stats(dry.stdout + dry.stderr) == Counter()


def test_report_holds_every_experiment_figure(slurm_run):
    workdir, _ = slurm_run
    result = snakemake(workdir, "--report", "report.html", profile=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (workdir / "report.html").read_text(errors="replace")
    for figure in ("curves.png", "precision_vs_rank.png", "examples.png", "summary.md"):
        assert figure in html, figure


@pytest.fixture
def submit_with_stand_in_sbatch(slurm_run, tmp_path):
    """Runs the workflow with config changes and returns the sbatch arguments of the jobs it submits
    first, by --comment, without running them: a stand-in `sbatch` first on PATH records each command
    line and refuses the job. Each run works on a copy of the finished run (a refused job leaves its
    outputs incomplete). This is how GPU requests are checked: the local test cluster has no GPUs."""
    stub = tmp_path / "bin"
    stub.mkdir()
    record = tmp_path / "sbatch-calls.txt"
    (stub / "sbatch").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{record}"\necho "sbatch: test stand-in, job not submitted" >&2\nexit 1\n'
    )
    (stub / "sbatch").chmod(0o755)
    config = yaml.safe_load((slurm_run[0] / "config.yaml").read_text())

    def submit(changes: dict, *args: str) -> dict[str, list[str]]:
        workdir = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        shutil.copytree(slurm_run[0], workdir, symlinks=True)
        record.unlink(missing_ok=True)
        edited = copy.deepcopy(config)
        for section, values in changes.items():
            edited[section] = {**edited.get(section, {}), **values}
        write_config(workdir / "gpu.yaml", edited)
        result = snakemake(workdir, "--retries", "0", *args, config="gpu.yaml", path_prefix=stub, timeout=300)
        assert result.returncode != 0  # every submission was refused
        lines = record.read_text().splitlines() if record.exists() else []
        assert lines, result.stdout[-3000:] + result.stderr[-3000:]
        return {re.search(r"--comment (\S+)", line).group(1): line.split(" --wrap=")[0].split() for line in lines}

    return submit


def sbatch_refusal(arguments: list[str]) -> str | None:
    """Why the real sbatch refuses a request's combination of options, or None. `--test-only` checks it
    against the cluster without queueing anything; GPU and memory options are left out, as the test
    node has no GPU and less memory than a training job asks for."""
    kept, skip = [], False
    for arg in arguments:
        if skip or arg.startswith(("--gpus", "--gres", "--parsable")):
            skip = False
            continue
        if arg == "--mem":
            skip = True  # and its value
            continue
        kept.append(arg)
    result = run(["sbatch", "--test-only", *kept, "--mem", "500", "--wrap", "true"], timeout=30)
    return None if result.returncode == 0 else result.stderr.strip()


def test_gpu_settings_reach_sbatch(submit_with_stand_in_sbatch):
    submit = submit_with_stand_in_sbatch
    # A new 2-GPU experiment (its train job is ready: the shards exist) and GPU embeddings for "tiny".
    calls = submit(
        {"experiments": {"tiny": {}, "ddp": {"train": {"gpus": 2}}}, "embed": {"gpus": 1}},
        "--set-resources",
        "train:gpu_model=a100",
        "--max-threads",
        "64",
    )
    ddp = calls.pop("rule_train_wildcards_ddp")
    assert "--gpus=a100:2" in ddp and "--cpus-per-task=2" in ddp  # 2 processes x (0 workers + 1 loop)
    assert set(calls) == {f"rule_embed_wildcards_tiny_{split}" for split in ("train", "val", "test", "nonlandmark")}
    assert all("--gpus=1" in call for call in calls.values())
    assert sbatch_refusal(ddp) is None

    calls = submit({"retrieve": {"gpus": 1}})
    assert list(calls) == ["rule_retrieve_wildcards_tiny"] and "--gpus=1" in calls["rule_retrieve_wildcards_tiny"]

    calls = submit({"places365": {"gpus": 1}}, "--forcerun", "places365")
    assert set(calls) == {"rule_places365_wildcards_000"}  # one partition (tiny_config)
    assert all("--gpus=1" in call for call in calls.values())
    assert sbatch_refusal(calls["rule_places365_wildcards_000"]) is None


def test_multinode_training_request_is_accepted_by_sbatch(submit_with_stand_in_sbatch):
    calls = submit_with_stand_in_sbatch(
        {"experiments": {"tiny": {}, "ddp2x2": {"train": {"gpus": 2, "nodes": 2}}}}, "--max-threads", "64"
    )
    multinode = calls["rule_train_multinode_wildcards_ddp2x2"]
    assert {"--nodes=2", "--gpus=4", "--ntasks=4", "--ntasks-per-node=2"} <= set(multinode)
    # The local cluster has a single node: ask sbatch about one node with this request's shape.
    one_node = [arg for arg in multinode if not arg.startswith(("--nodes", "--ntasks="))] + ["--nodes=1", "--ntasks=2"]
    assert sbatch_refusal(one_node) is None

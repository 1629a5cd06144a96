"""Running the workflow in a test, and reading what Snakemake planned or ran: one runner, one parser of its
job stats table and of its per-job blocks, used by every test that starts Snakemake."""

import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
TEST_CONFIG = REPO / ".test" / "config.yaml"  # the tiny demo that runs the whole DAG: --configfile .test/config.yaml
# Every rule of the default target (`all`); `predict` runs only when asked for.
DAG_RULES = frozenset(
    {"demo", "split", "download", "places365", "select", "shard", "train", "embed", "retrieve", "score", "summary"}
)


def snakemake(
    workdir: Path,
    *args: str,
    configfiles=(),
    cores: int | None = None,
    path_prefix: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python -m snakemake` on this checkout's Snakefile in `workdir`, with this Python's environment first
    on PATH (the rules run `python`; `path_prefix` goes before it), `--configfile` with each of `configfiles`
    (Snakemake merges them, later files winning) and `--cores` when given."""
    path = os.pathsep.join(str(p) for p in (path_prefix, Path(sys.executable).parent) if p)
    env = {**os.environ, "PATH": f"{path}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]
    if configfiles:  # after `args`: --configfile takes every word up to the next option, targets included
        command += ["--configfile", *map(str, configfiles)]
    if cores is not None:
        command += ["--cores", str(cores)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def job_stats(output: str) -> Counter:
    """Jobs per rule from the "Job stats" table Snakemake prints before running (or for -n); empty when
    there is nothing to be done. The local target rule `all` and the total are left out."""
    if "Nothing to be done" in output:
        return Counter()
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = Counter({rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)})
    for local in ("total", "all"):
        counts.pop(local, None)
    return counts


def jobs(output: str) -> list[dict]:
    """Every job block Snakemake printed, in order: rule, local (a `localrule`, such as `all`), wildcards,
    resources (values as printed), threads, reason, and the shell command when -p printed it."""
    found = []
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", output, flags=re.M)[1:]:
        rule = re.match(r"(local)?rule (\w+):", block)
        fields = dict(re.findall(r"^    (wildcards|resources|threads|reason): (.*)$", block, re.M))
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        found.append(
            {
                "rule": rule.group(2),
                "local": bool(rule.group(1)),
                "wildcards": dict(kv.split("=", 1) for kv in fields.get("wildcards", "").split(", ") if kv),
                "resources": dict(kv.split("=", 1) for kv in fields.get("resources", "").split(", ") if kv),
                "threads": int(fields.get("threads", 1)),
                "reason": fields.get("reason"),
                "shell": shell.group(1) if shell else None,
            }
        )
    return found


@dataclass
class DryRun:
    """What `snakemake -n` planned."""

    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def counts(self) -> Counter:
        """Jobs per rule (rule `all` left out); empty when there is nothing to be done."""
        return job_stats(self.output)

    @property
    def jobs(self) -> list[dict]:
        return jobs(self.output)


def dry_run(workdir: Path, *args: str, timeout: float = 120, **options) -> DryRun:
    """`snakemake -n` (see `snakemake` for the options); fails the test, with Snakemake's output, unless it
    succeeds."""
    result = snakemake(workdir, "-n", *args, timeout=timeout, **options)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return DryRun(result.stdout, result.stderr)

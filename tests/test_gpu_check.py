"""bench/gpu_check.py on a machine without a GPU: its arguments, its refusal without CUDA, and its code
paths at tiny sizes on the CPU (the full run needs a GPU machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_arguments_are_checked():
    assert "--quick" in run("--help").stdout
    refused = run("--device", "cpu")
    assert refused.returncode == 2 and "--device cpu runs only with --quick" in refused.stderr
    assert run("--sections", "nothing").returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without a GPU")
def test_without_cuda_it_says_what_to_do():
    result = run()
    assert result.returncode == 2
    assert "no CUDA device visible" in result.stderr and "make env GPU=1" in result.stderr


def test_quick_cpu_run_exercises_embedding_and_faiss(tmp_path):
    result = run(
        "--quick",
        "--device",
        "cpu",
        "--sections",
        "embed",
        "faiss",
        "--threads",
        "2",
        "--out",
        str(tmp_path / "out.json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [row["check"].split(" ")[:2] for row in rows] == [["embed", "64"], ["faiss", "exact"], ["faiss", "IVF-PQ"]]
    assert all(row["ok"] for row in rows)
    assert "| faiss exact search on the CPU" in result.stdout  # the printed table

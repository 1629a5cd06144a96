"""The GPU path, checked on a machine without a GPU: the GPU install (`make env GPU=1`) and the stages'
GPU-only branches, which must refuse clearly when there is no CUDA device instead of crashing."""

import re
import shutil
import subprocess
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from landmarks import index, places365, predict, retrieve, train
from landmarks.common import StageError
from landmarks.device import pick_device

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


def pins(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", path.read_text(), re.M))


def test_the_gpu_lock_swaps_faiss_cpu_for_faiss_gpu_with_its_cuda12_runtime():
    gpu, cpu = pins(REPO / "requirements-gpu.lock"), pins(REPO / "requirements.lock")
    assert gpu["faiss-gpu"] == cpu["faiss-cpu"] == "1.15.1"  # the same faiss, on either device
    for package in ("nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12", "nvidia-curand-cu12", "nvidia-cuda-nvrtc-cu12"):
        assert gpu[package].startswith(("12.", "10.")), package  # faiss-gpu's wheel is built for CUDA 12
    assert "faiss-cpu" not in gpu and "faiss-gpu" not in cpu
    assert not set(gpu) & set(cpu)  # nothing else changes: torch keeps its own CUDA 13 runtime


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_env_gpu_installs_faiss_gpu_instead_of_faiss_cpu():
    def commands(*args):
        result = subprocess.run(
            ["make", "-n", "-B", "env", *args], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    gpu = commands("GPU=1")
    assert "pip uninstall --quiet --yes faiss-cpu" in gpu
    assert 'grep -v "^faiss-cpu==" requirements.lock' in gpu and "-r requirements-gpu.lock" in gpu
    assert "faiss.get_num_gpus()" in gpu and "touch .venv/.installed-gpu" in gpu
    cpu = commands()
    assert "pip uninstall --quiet --yes faiss-gpu" in cpu and "-r requirements.lock" in cpu
    assert "requirements-gpu.lock" not in cpu.replace("requirements-gpu.lock pyproject", "")
    assert "touch .venv/.installed\n" in cpu


def test_faiss_counts_gpus_without_crashing():
    assert index.gpu_count() == faiss.get_num_gpus()
    if NO_GPU:
        assert faiss.get_num_gpus() == 0


@pytest.mark.skipif(not NO_GPU, reason="checks the refusals of a machine without a GPU")
def test_gpu_only_branches_refuse_clearly_without_cuda(tmp_path):
    with pytest.raises(StageError, match="no CUDA GPU is visible"):
        pick_device("cuda")
    vectors = np.eye(4, dtype=np.float32)
    with pytest.raises(StageError, match="GPU search requested but faiss sees no GPU"):
        index.build_index(vectors, use_gpu=True)
    with pytest.raises(StageError, match="--device gpu: faiss sees no GPU"):
        retrieve.main(["--database", "x.npy", "--queries", "y.npy", "--out-dir", str(tmp_path), "--device", "gpu"])
    with pytest.raises(StageError, match="no CUDA GPU is visible"):
        predict.predict(tmp_path, [], tmp_path / "out", device="cuda")
    with pytest.raises(StageError, match="(?i)cuda"):
        places365.pick_device("cuda")
    with pytest.raises(StageError, match="no CUDA GPU is visible"):
        train.main(["--train-shards", str(tmp_path), "--out-dir", str(tmp_path / "train"), "--device", "cuda"])

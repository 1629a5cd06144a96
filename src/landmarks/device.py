"""The torch device a stage runs on, chosen the same way by every stage (`--device auto|cpu|cuda|cuda:N`)."""

from __future__ import annotations

from .common import StageError


def pick_device(name: str = "auto"):
    """`auto`: the GPU when one is visible, else the CPU; a CUDA device asked for on a machine without
    one is refused here, clearly, rather than failing later inside torch."""
    import torch  # imported on use: stages that only read files (places365 without weights) skip it

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {name!r} requested but no CUDA GPU is visible")
    return torch.device(name)

"""What makes training preemptible and reproducible: the random state, last.ckpt, and SIGTERM.

A run is seeded once (`seed_everything`); `last.ckpt` holds, besides weights, optimiser and schedule
(which `train.Training` gathers), where the run stands (`RunState`) and every process's random state,
so a resumed run draws exactly what an uninterrupted one would. A checkpoint is only resumed when it
belongs to the run: same settings (`RESUME_NEUTRAL_KEYS` aside), same data, same number of processes
(`settings_digest`, `data_fingerprint`, `load_resume_state`). Files are written atomically; what a
killed writer left is removed on start (`remove_partial_files`). SIGTERM (`StopSignal`) is remembered
until the next optimizer step, where a checkpoint is written and `TrainingInterrupted` ends the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist

from .common import atomic_path
from .distributed import Distributed
from .loader import ShardIndex

log = logging.getLogger("landmarks.train")  # the stage this serves, as its log lines always said

CHECKPOINT_FORMAT = 3
# Settings that change how fast a run goes, not what it computes: editing them keeps a checkpoint valid.
RESUME_NEUTRAL_KEYS = ("workers", "checkpoint_every_steps")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def settings_digest(settings: dict, data: str = "", world_size: int = 1) -> str:
    """What a checkpoint must match to be resumed: the settings (but not RESUME_NEUTRAL_KEYS), the
    training data and the number of processes."""
    relevant = {k: v for k, v in settings.items() if k not in RESUME_NEUTRAL_KEYS}
    text = json.dumps({"settings": relevant, "data": data, "world_size": world_size}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_fingerprint(*indexes: ShardIndex) -> str:
    """Digest of the images (ids, labels, order) of the given indexes."""
    digest = hashlib.sha256()
    for index in indexes:
        table = index.table[["id", "landmark_id"]].astype(str)
        digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


@dataclass
class RunState:
    """What last.ckpt keeps of a run besides weights and optimiser: optimizer steps so far, every
    evaluated epoch's metrics (epoch 0: the untrained model), the best epoch so far, the subspace
    clusters in use, how neck and head were initialised, and the starting weights (for WiSE-FT)."""

    global_step: int = 0
    metrics: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    clusters: np.ndarray | None = None
    initialised: dict | None = None
    start_weights: dict | None = None


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path, suffix=".pt.part") as tmp:
        torch.save(state, tmp)


def load_resume_state(path: Path, digest: str) -> dict | None:
    """The checkpoint at `path` when it belongs to this run (same digest), else None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        log.warning("ignoring %s: not a readable checkpoint (%s)", path, err)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("digest") != digest:
        log.info("ignoring %s: it was written with other settings, data or number of processes", path)
        return None
    return state


def remove_partial_files(out_dir: Path) -> None:
    """Temporary files a killed writer left behind (atomic_path names them .<name>.*)."""
    for name in ("last.ckpt", "best.ckpt", "model.pt"):
        for leftover in out_dir.glob(f".{name}.*"):
            leftover.unlink(missing_ok=True)


class TrainingInterrupted(Exception):
    """SIGTERM arrived; a checkpoint was written and the job should end (and be restarted)."""


class StopSignal:
    """Remembers SIGTERM instead of dying at once, so the loop can checkpoint first."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if not self.received:
            log.warning("SIGTERM: writing a checkpoint at the next optimizer step, then stopping")
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, dist: Distributed) -> bool:
        """True on every process once any of them got the signal (they must stop at the same step)."""
        if not dist.active:
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0])
        return bool(dist.all_reduce(flag, torch_dist.ReduceOp.MAX).item() > 0)

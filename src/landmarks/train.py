"""Stage `train`: fine-tune backbone + GeM + embedding with a metric-learning head on the train shards.

One stage trains every model of the seed experiments and the GLR2020/2021 winners, configured by the
`train` section (config.yaml, per experiment): any timm backbone or the seeds' simple CNN; softmax,
binary cross-entropy, ArcFace, sub-center ArcFace with dynamic margins, or batch-hard triplet loss
over random, P x K or "subspace" batches (landmarks.sampler).

Each epoch ends with an evaluation on `val`: val images are embedded, matched against the train
images (top-1 neighbour) and scored with GAP; the best epoch's weights become `model.pt`.

Preemptible: `last.ckpt` (written atomically every `checkpoint_every_steps` optimizer steps and at
each epoch's end) holds the model, head, optimizer, scheduler, AMP scaler, the position in the epoch
and every process's random state. A restarted job (killed, or requeued by SLURM) resumes from it and
ends with the same weights as an uninterrupted run. SIGTERM (what SLURM sends on preemption, scancel
or at the time limit) makes the job write a checkpoint at the next optimizer step (with several
processes: within 10 steps, all at the same one) and exit with 143.
A checkpoint written with other settings, other data or another number of processes is ignored.

One process per GPU with DistributedDataParallel: launched by `torchrun` (RANK / WORLD_SIZE /
LOCAL_RANK) or `srun` (SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, rendezvous on the first
node of the step); NCCL on GPUs, gloo on CPUs. Only rank 0 writes files.

    python -m landmarks.train --train-shards results/shards/train/part-00 --val-shards results/shards/val/part-00 \\
        --out-dir results/experiments/X/train --settings '{"epochs": 3}'
    torchrun --standalone --nproc_per_node=4 -m landmarks.train ...      # 4 GPUs, one node
    srun --ntasks-per-node=4 python -m landmarks.train ...               # several nodes (SLURM)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .common import StageError, atomic_path, run_cli, setup_logging, write_json_atomic
from .config import ConfigError, section_settings
from .embed import pick_device
from .loader import ShardDataset, ShardIndex, ShardMapDataset, class_mapping, eval_transform, train_transform
from .losses import build_head
from .model import LandmarkModel
from .sampler import SeededDataset, TrainBatchSampler, cluster_classes, epoch_rng

log = logging.getLogger("landmarks.train")

CHECKPOINT_FORMAT = 2
# Settings that change how fast a run goes, not what it computes: editing them keeps a checkpoint valid.
RESUME_NEUTRAL_KEYS = ("workers", "checkpoint_every_steps")
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers expect from a job stopped by SIGTERM


# ---------------------------------------------------------------------------------------------------
# Processes: single, torchrun or srun


@dataclass
class Distributed:
    """This process's place among the training processes (rank 0 of 1 without DDP)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """In-place sum (or `op`) over the processes; the tensor is moved to the collective's device."""
        if not self.active:
            return tensor
        on_device = tensor.to(self.device)
        torch_dist.all_reduce(on_device, op=op or torch_dist.ReduceOp.SUM)
        return on_device.to(tensor.device)

    def broadcast_object(self, obj):
        """rank 0's `obj` on every process."""
        if not self.active:
            return obj
        holder = [obj]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_objects(self, obj) -> list:
        """Every process's `obj`, by rank, on every process."""
        if not self.active:
            return [obj]
        gathered = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list ("gpu[07-09,12],cpu1" -> "gpu07")."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise StageError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    if shutil.which("scontrol") and nodelist:
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   timeout=30, check=True).stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
    if not nodelist:
        raise StageError("launched by srun with several tasks, but neither SLURM_STEP_NODELIST nor "
                         "SLURM_JOB_NODELIST names the nodes (set MASTER_ADDR)")
    return first_host(nodelist)


def process_layout(env=None) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables or, under `srun`, SLURM's."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    # SLURM_STEP_NUM_TASKS is set for the tasks of an srun step only, not in the batch script itself
    # (whose SLURM_NTASKS describes the allocation, not how many processes were started).
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def setup_distributed(device_name: str = "auto") -> Distributed:
    """Join the process group when started by torchrun or srun with several processes."""
    rank, world, local_rank = process_layout()
    device = pick_device(device_name)
    if world == 1:
        return Distributed(device=device)
    if device.type == "cuda":
        # One GPU per process: SLURM may already restrict each task to its own GPU.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if "MASTER_ADDR" not in os.environ:  # srun: rendezvous on the step's first node
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
        os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(
            20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Long timeout: rank 0 alone writes checkpoints and the others wait for it in the next collective.
    torch_dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=60))
    log.info("process %d of %d (local rank %d) on %s, backend %s, rendezvous %s:%s", rank, world, local_rank,
             device, backend, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    return Distributed(rank, world, local_rank, device)


# ---------------------------------------------------------------------------------------------------
# Reproducibility


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


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to `final` (min_lr / lr)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------
# Embedding passes (validation, subspace clusters), divided between the processes


@torch.no_grad()
def embed_index(model: LandmarkModel, index: ShardIndex, image_size: int, *, batch_size: int, workers: int,
                device: torch.device, dist: Distributed, amp: bool = True) -> np.ndarray:
    """L2-normalised embeddings (len(index), dim), float32, in index order, on every process.

    Each process embeds a contiguous slice of the index; the slices are then summed across processes.
    Runs in a forked random state, so that evaluating never changes what training draws next.
    """
    out = torch.zeros(len(index), model.embedding_dim)
    if len(index):
        was_training = model.training
        model.eval()
        dataset = ShardDataset(index, eval_transform(image_size, model.data_config["mean"], model.data_config["std"]),
                               rank=dist.rank, world_size=dist.world_size, balance="none")
        channels_last = device.type == "cuda"
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
            for images, _, positions in loader:
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                    embedding = model(images)
                out[positions] = F.normalize(embedding.float(), dim=1).cpu()
        model.train(was_training)
    if dist.active:
        # Chunks keep the collective's buffer on the GPU small.
        for start in range(0, len(out), 65536):
            out[start:start + 65536] = dist.all_reduce(out[start:start + 65536].contiguous())
    return out.numpy()


def evaluate_val_gap(model, train_index: ShardIndex, val_index: ShardIndex, settings: dict, device,
                     dist: Distributed | None = None) -> dict:
    """GAP / accuracy of top-1 kNN on val against train, as the model selection criterion."""
    from .metrics import score_predictions
    from .retrieve import knn
    dist = dist or Distributed(device=device)
    if len(val_index) == 0 or len(train_index) == 0:
        return {"val_gap": float("nan"), "val_accuracy": float("nan")}
    options = dict(batch_size=settings["batch_size"] * 2, workers=settings["workers"], device=device, dist=dist,
                   amp=settings["amp"])
    db = embed_index(model, train_index, settings["image_size"], **options)
    queries = embed_index(model, val_index, settings["image_size"], **options)
    result = None
    if dist.is_main:
        cosines, positions = knn(db, queries, 1)
        db_labels = train_index.table["landmark_id"].to_numpy(dtype=np.int64)
        predictions = pd.DataFrame({"id": val_index.table["id"], "landmark_id": db_labels[positions[:, 0]],
                                    "score": cosines[:, 0]})
        truth = pd.DataFrame({"id": val_index.table["id"],
                              "landmarks": [[int(x)] for x in val_index.table["landmark_id"]]})
        scores = score_predictions(predictions, truth)
        result = {"val_gap": float(scores.gap), "val_accuracy": float(scores.accuracy)}
    return dist.broadcast_object(result)


def subspace_clusters(model, train_index: ShardIndex, class_of: np.ndarray, n_classes: int, settings: dict,
                      epoch: int, device, dist: Distributed) -> np.ndarray:
    """Seed 004's subspaces: class -> cluster by k-means over class-mean embeddings of the current model
    (from up to `subspace_images_per_class` images per class)."""
    rng = epoch_rng(settings["seed"], epoch, 7)  # a stream of its own, apart from the batch plan's
    per_class = settings["subspace_images_per_class"]
    labelled = np.flatnonzero(class_of >= 0)
    # A random order, grouped by class (stable sort), keeping the first `per_class` images of each class.
    shuffled = labelled[rng.permutation(len(labelled))]
    by_class = shuffled[np.argsort(class_of[shuffled], kind="stable")]
    classes = class_of[by_class]
    rank_in_class = np.arange(len(by_class)) - np.searchsorted(classes, classes, side="left")
    chosen = np.sort(by_class[rank_in_class < per_class])
    sub_index = ShardIndex(train_index.table.iloc[chosen].reset_index(drop=True))
    started = time.perf_counter()
    vectors = embed_index(model, sub_index, settings["image_size"], batch_size=settings["batch_size"] * 2,
                          workers=settings["workers"], device=device, dist=dist, amp=settings["amp"])
    sums = np.zeros((n_classes, vectors.shape[1]), np.float64)
    np.add.at(sums, class_of[chosen], vectors)
    present = np.bincount(class_of[chosen], minlength=n_classes) > 0
    clusters = None
    if dist.is_main:
        clusters = cluster_classes(sums.astype(np.float32), present, settings["subspaces"],
                                   settings["pk_classes"], seed=settings["seed"] + epoch)
        log.info("subspaces for epoch %d: %d clusters of %d classes (%d images embedded, %.1f s)", epoch + 1,
                 clusters.max() + 1, int(present.sum()), len(chosen), time.perf_counter() - started)
    return dist.broadcast_object(clusters)


# ---------------------------------------------------------------------------------------------------
# The training step


class TrainModule(nn.Module):
    """Model + head as one module, so DDP synchronises the head's gradients too."""

    def __init__(self, model: LandmarkModel, head: nn.Module, autocast: dict):
        super().__init__()
        self.model, self.head, self.autocast = model, head, autocast

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        with torch.autocast(**self.autocast):
            embeddings = self.model(images)
        loss, logits = self.head.loss_and_logits(embeddings.float(), targets)
        correct = (logits.argmax(1) == targets).sum() if logits is not None else torch.zeros((), device=loss.device)
        return loss, correct


def parameter_groups(model: LandmarkModel, head: nn.Module, settings: dict) -> list[dict]:
    """Backbone at `lr`, pooling/neck/head at `lr * head_lr_multiplier`; no weight decay on biases,
    norms and GeM's p (one-dimensional parameters), as usual."""
    groups = []
    backbone = list(model.backbone.parameters())
    rest = [p for m in (model.pool, model.neck, model.bn, head) for p in m.parameters()]
    for params, lr in ((backbone, settings["lr"]), (rest, settings["lr"] * settings["head_lr_multiplier"])):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "lr": lr, "weight_decay": settings["weight_decay"]},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], settings: dict) -> torch.optim.Optimizer:
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(groups, momentum=settings["momentum"])
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.AdamW(groups)


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


# ---------------------------------------------------------------------------------------------------
# Files


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path, suffix=".pt.part") as tmp:
        torch.save(state, tmp)


def load_resume_state(path: Path, digest: str) -> dict | None:
    """The checkpoint at `path` when it belongs to this run (same digest), else None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - an unreadable checkpoint means: start afresh, and say so
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


def plot_curves(metrics: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    frame = pd.DataFrame(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if len(frame):
        axes[0].plot(frame["epoch"], frame["train_loss"], marker="o")
        axes[1].plot(frame["epoch"], frame["val_gap"], marker="o", label="val GAP")
        axes[1].plot(frame["epoch"], frame["val_accuracy"], marker="s", label="val top-1 accuracy")
        if "train_accuracy" in frame and frame["train_accuracy"].notna().any():
            axes[1].plot(frame["epoch"], frame["train_accuracy"], marker=".", linestyle="--",
                         label="train accuracy (head)")
        axes[1].legend()
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="validation (kNN vs train)", xlabel="epoch", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_metrics_csv(metrics: list[dict], path: Path) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(metrics[0]) if metrics else ["epoch"])
            writer.writeheader()
            writer.writerows(metrics)


# ---------------------------------------------------------------------------------------------------
# The stage


def train(train_dirs, val_dirs, out_dir: Path, settings: dict, *, device: torch.device, threads: int | None = None,
          dist: Distributed | None = None) -> list[dict]:
    """Train (or resume) one experiment; returns the per-epoch metrics. See the module docstring."""
    dist = dist or Distributed(device=device)
    device = dist.device if dist.active else device
    out_dir = Path(out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(out_dir)
    if threads:
        torch.set_num_threads(threads)
    seed_everything(settings["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_index = ShardIndex.from_dirs(train_dirs)
    val_index = ShardIndex.from_dirs(val_dirs) if val_dirs else ShardIndex.from_dirs([])
    if len(train_index) == 0:
        raise StageError(f"no training images in {', '.join(map(str, train_dirs))}")
    labels = class_mapping(train_index.table["landmark_id"])
    class_of = np.array([-1 if pd.isna(x) else labels[int(x)] for x in train_index.table["landmark_id"]], np.int64)
    counts = np.bincount(class_of[class_of >= 0], minlength=len(labels))

    model = LandmarkModel(settings["backbone"], settings["pretrained"], settings["embedding_dim"], settings["gem_p"],
                          settings["pooling"])
    head = build_head(settings, len(labels), torch.from_numpy(counts))
    model.to(device)
    head.to(device)
    channels_last = settings["channels_last"] and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = torch.float16 if settings["amp_dtype"] == "float16" else torch.bfloat16
    autocast = dict(device_type=device.type, dtype=amp_dtype, enabled=settings["amp"] and device.type == "cuda")
    module = TrainModule(model, head, autocast)
    ddp_module = module
    if dist.active:
        ddp_module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    accumulation = settings["grad_accumulation"]
    sampler = TrainBatchSampler(class_of, mode=settings["sampler"], batch_size=settings["batch_size"],
                                classes_per_batch=settings["pk_classes"], images_per_class=settings["pk_images"],
                                seed=settings["seed"], rank=dist.rank, world_size=dist.world_size,
                                batches_multiple_of=accumulation)
    transform = train_transform(settings, model.data_config["mean"], model.data_config["std"])
    dataset = SeededDataset(ShardMapDataset(train_index, transform, labels))
    workers = settings["workers"]
    # Its own generator: creating the loader's iterator must not consume the global random state.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(settings["seed"]),
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    steps_per_epoch = sampler.batches_per_epoch // accumulation
    total_steps = steps_per_epoch * settings["epochs"]
    warmup_steps = int(settings["warmup_epochs"] * steps_per_epoch)
    optimizer = build_optimizer(parameter_groups(model, head, settings), settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, settings["min_lr"] / settings["lr"]))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast["enabled"] and amp_dtype == torch.float16)

    digest = settings_digest(settings, data_fingerprint(train_index, val_index), dist.world_size)
    last_path, best_path, model_path = out_dir / "last.ckpt", out_dir / "best.ckpt", out_dir / "model.pt"
    start_epoch, start_step, global_step, metrics = 0, 0, 0, []
    best_score, best_epoch, clusters, resumed_from = -math.inf, 0, None, None
    # This process's sums over the epoch so far: loss x images, images, correct top-1 (classifier heads).
    totals = torch.zeros(3, dtype=torch.float64)
    has_logits = settings["loss"] != "triplet"
    state = load_resume_state(last_path, digest)
    if state is not None:
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        metrics, best_score, best_epoch, clusters = state["metrics"], state["best_score"], state["best_epoch"], \
            state["clusters"]
        mine = state["ranks"][dist.rank]
        restore_rng_state(mine["rng"], device)
        totals = torch.tensor(mine["totals"], dtype=torch.float64)
        resumed_from = {"epoch": start_epoch, "step": start_step}
        log.info("resuming from %s: epoch %d, batch %d of %d", last_path, start_epoch + 1, start_step,
                 sampler.batches_per_epoch)
        del state

    def model_state(epoch: int) -> dict:
        return {"model": model.state_dict(), "settings": settings, "data_config": model.data_config,
                "classes": {str(k): v for k, v in labels.items()}, "epoch": epoch}

    def save_training_state(epoch: int, step: int) -> None:
        """Every process contributes its random state; rank 0 writes."""
        ranks = dist.gather_objects({"rng": rng_state(device), "totals": totals.tolist()})
        if dist.is_main:
            save_checkpoint(last_path, {
                "format": CHECKPOINT_FORMAT, "digest": digest, "world_size": dist.world_size,
                "epoch": epoch, "step": step, "global_step": global_step, "model": model.state_dict(),
                "head": head.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "metrics": metrics, "best_score": best_score,
                "best_epoch": best_epoch, "clusters": clusters, "ranks": ranks, "settings": settings})

    started = time.perf_counter()
    every = settings["checkpoint_every_steps"]
    last_epoch_positions: list[np.ndarray] = []
    with StopSignal() as stop:
        for epoch in range(start_epoch, settings["epochs"]):
            skip = start_step if epoch == start_epoch else 0
            if skip == 0:
                totals.zero_()
            if settings["sampler"] == "subspace" and (
                    clusters is None or (skip == 0 and epoch % settings["subspace_every_epochs"] == 0)):
                clusters = subspace_clusters(model, train_index, class_of, len(labels), settings, epoch, device, dist)
            sampler.set_epoch(epoch, skip=skip, clusters=clusters)
            module.train()
            running = torch.zeros(3, dtype=torch.float64, device=device)  # like totals, kept on the device
            last_epoch_positions, seen, epoch_started = [], 0, time.perf_counter()
            bar = tqdm(total=sampler.batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{settings['epochs']}",
                       unit="batch", mininterval=2.0 if sys.stderr.isatty() else 30.0, disable=not dist.is_main)
            optimizer.zero_grad(set_to_none=True)
            batch_number = skip
            for images, targets, positions in loader:
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                boundary = (batch_number + 1) % accumulation == 0
                sync = ddp_module.no_sync() if dist.active and not boundary else contextlib.nullcontext()
                with sync:
                    loss, correct = ddp_module(images, targets)
                    scaler.scale(loss / accumulation).backward()
                running[0] += loss.detach().double() * len(targets)
                running[1] += len(targets)
                running[2] += correct.double()
                batch_number += 1
                seen += len(targets)
                last_epoch_positions.append(positions.numpy())
                if boundary:
                    if settings["grad_clip"]:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(module.parameters(), settings["grad_clip"])
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    global_step += 1
                    # Across processes agreeing costs a synchronising all-reduce: ask every 10 steps only.
                    stopping = stop.agreed(dist) if not dist.active or global_step % 10 == 0 else False
                    end_of_epoch = batch_number == sampler.batches_per_epoch
                    if stopping or (every and global_step % every == 0 and not end_of_epoch):
                        totals += running.cpu()
                        running.zero_()
                        save_training_state(epoch, batch_number)
                    if stopping:
                        bar.close()
                        raise TrainingInterrupted(f"stopped by SIGTERM in epoch {epoch + 1} after batch "
                                                  f"{batch_number}; {last_path} resumes it")
                bar.update()
                if dist.is_main and batch_number % 10 == 0:
                    images_per_s = seen * dist.world_size / max(1e-9, time.perf_counter() - epoch_started)
                    so_far = totals + running.cpu()
                    bar.set_postfix(loss=f"{so_far[0] / max(1.0, so_far[1]):.3f}", img_s=f"{images_per_s:.1f}",
                                    refresh=False)
            bar.close()
            totals += running.cpu()
            elapsed = time.perf_counter() - epoch_started
            if dist.active:
                with torch.no_grad():
                    average_buffers(module, dist)
            epoch_totals = dist.all_reduce(totals.clone())
            val = evaluate_val_gap(model, train_index, val_index, settings, device, dist)
            row = {"epoch": epoch + 1,
                   "train_loss": float(epoch_totals[0] / epoch_totals[1]) if epoch_totals[1] else float("nan"),
                   "train_accuracy": float(epoch_totals[2] / epoch_totals[1]) if has_logits and epoch_totals[1]
                   else float("nan"),
                   "lr": scheduler.get_last_lr()[0],
                   "images_per_s": seen * dist.world_size / elapsed if seen else float("nan"),
                   **val, "seconds": round(time.perf_counter() - epoch_started, 2)}
            metrics.append(row)
            log.info("epoch %d: loss %.4f, train accuracy %.4f, val GAP %.4f, val accuracy %.4f, %.1f images/s",
                     row["epoch"], row["train_loss"], row["train_accuracy"], row["val_gap"], row["val_accuracy"],
                     row["images_per_s"])
            score = row["val_gap"] if not math.isnan(row["val_gap"]) else float(epoch)  # no val: keep the last
            if score > best_score:
                best_score, best_epoch = score, epoch + 1
                if dist.is_main:
                    save_checkpoint(best_path, model_state(epoch + 1))
            totals.zero_()
            save_training_state(epoch + 1, 0)
            if dist.is_main:  # to follow a long run (the curves are drawn at the end: matplotlib is slow)
                write_metrics_csv(metrics, out_dir / "metrics.csv")

    if settings["epochs"] == 0:
        # No training (a baseline of the pretrained or random backbone): still evaluate and save it.
        val = evaluate_val_gap(model, train_index, val_index, settings, device, dist)
        metrics = [{"epoch": 0, "train_loss": float("nan"), "train_accuracy": float("nan"), "lr": 0.0,
                    "images_per_s": float("nan"), **val, "seconds": 0.0}]
        if dist.is_main:
            save_checkpoint(best_path, model_state(0))
    audit = ddp_audit(module, last_epoch_positions, dist) if dist.active else None
    if dist.is_main:
        if not best_path.exists():  # deleted by hand after the best epoch: the final weights stand in
            save_checkpoint(best_path, model_state(settings["epochs"]))
        with atomic_path(model_path, suffix=".pt.part") as tmp:
            shutil.copyfile(best_path, tmp)
        write_metrics_csv(metrics, out_dir / "metrics.csv")
        plot_curves(metrics, out_dir / "curves.png")
        best = next((r for r in metrics if r["epoch"] == best_epoch), metrics[-1])
        write_json_atomic(out_dir / "train.json", {
            "classes": len(labels), "train_images": len(train_index), "val_images": len(val_index),
            "best_epoch": best["epoch"], "best_val_gap": best["val_gap"], "best_val_accuracy": best["val_accuracy"],
            "steps_per_epoch": steps_per_epoch, "global_steps": global_step, "resumed_from": resumed_from,
            "world_size": dist.world_size, "ddp": audit,
            "seconds": round(time.perf_counter() - started, 1), "device": str(device), "settings": settings})
    return metrics


def average_buffers(module: nn.Module, dist: Distributed) -> None:
    """Average BatchNorm running statistics over the processes. DDP broadcasts rank 0's buffers before
    each forward pass, but the last pass leaves each process with statistics of its own batch; the
    evaluation (split between processes) and the saved model need one set."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.copy_(dist.all_reduce(buffer.detach().clone()) / dist.world_size)
        else:
            torch_dist.broadcast(buffer, src=0)


def ddp_audit(module: nn.Module, positions: list[np.ndarray], dist: Distributed) -> dict:
    """Checks that DDP did its job: every process holds rank 0's weights, and in the last epoch each
    process trained on its own images."""
    flat = torch.cat([t.detach().float().flatten().cpu() for t in module.state_dict().values()])
    reference = flat.clone().to(dist.device)
    torch_dist.broadcast(reference, src=0)
    difference = dist.all_reduce((flat - reference.cpu()).abs().max().reshape(1), torch_dist.ReduceOp.MAX).item()
    mine = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    per_rank = dist.gather_objects(mine)
    every = np.concatenate(per_rank)
    audit = {"backend": torch_dist.get_backend(), "max_weight_difference_between_ranks": difference,
             "last_epoch_images_per_rank": [len(p) for p in per_rank],
             "last_epoch_images_on_several_ranks": int(len(every) - len(np.unique(every)))}
    if difference > 0:
        log.warning("DDP audit: weights differ between processes by up to %g", difference)
    return audit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m landmarks.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-shards", nargs="+", required=True, help="shard folders of the train split")
    parser.add_argument("--val-shards", nargs="*", default=[], help="shard folders of the val split")
    parser.add_argument("--out-dir", required=True,
                        help="model.pt, metrics.csv, curves.png, train.json, last.ckpt, best.ckpt go here")
    parser.add_argument("--settings", default="{}",
                        help="JSON object of train settings (config.yaml's train section); defaults fill the rest")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (each DDP process takes its LOCAL_RANK GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (per process)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        settings = section_settings("train", json.loads(args.settings), "--settings")
    except json.JSONDecodeError as err:
        raise ConfigError(f"--settings is not valid JSON: {err}") from err
    dist = setup_distributed(args.device)
    if not dist.is_main:
        logging.getLogger("landmarks").setLevel(logging.WARNING)
    try:
        train(args.train_shards, args.val_shards, Path(args.out_dir), settings, device=dist.device,
              threads=args.threads, dist=dist)
    except TrainingInterrupted as stopped:
        log.warning("%s", stopped)
        return EXIT_INTERRUPTED
    finally:
        if dist.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_cli(main)

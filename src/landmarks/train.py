"""Stage `train`: fine-tune backbone + GeM + embedding with a metric-learning head on the train shards.

One stage trains every model of the seed experiments and the GLR2020/2021 winners, configured by the
`train` section (config.yaml, per experiment): any timm backbone or the seeds' simple CNN; softmax,
binary cross-entropy, ArcFace, sub-center ArcFace with dynamic margins, or batch-hard triplet loss
over random, P x K or "subspace" batches (landmarks.sampler).

Model selection: the untrained model is evaluated as "epoch 0", and each epoch ends with the same
evaluation on `val` (val images plus a sample of the non-landmark bank as non-landmark queries,
embedded, matched against the train images by top-1 neighbour, scored with GAP). The best epoch's
weights become `model.pt`, the untrained model included (ties go to the later epoch), except that the
untrained model must also answer `untrained_val_margin` (default 2) more val landmark photos right than
the best trained epoch, which wins otherwise: one photo is noise on a small val (33-46 photos in the
real-photo benchmark's full regime), and where one photo decided, the trained epoch scored as well or
better on the test photos every time. With the margin at 0, training never ends worse on val than it
started. With `wise_alpha` < 1 every epoch's candidate is the WiSE-FT interpolation of its weights with
the starting ones.

Fine-tuning on few photos per landmark (the defaults, measured on real photos: bench/real_photos.py):
the embedding is the backbone's own GeM descriptor (`neck: none`), the ArcFace class weights start at
the class means (`head_init`), BatchNorm statistics stay as pretrained (`freeze_bn`), a small train set
is drawn several times per epoch (`min_steps_per_epoch`), and model.pt is halfway back to the pretrained
weights (`wise_alpha: 0.5`), then whitened: a linear whitening learned in closed form from the train
embeddings of each candidate (`whitening: learned`; landmarks.whitening), which val judges with it;
model.pt carries the whitening fitted again on the train and val photos together (`whitening_from`).
Also available: a PCA-started linear neck, the GeM descriptor beside a learned one, a frozen backbone
for the first epochs, layer-wise learning-rate decay, weight decay towards the pretrained weights (`l2sp`).

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

This module is the stage: loading the data, the `Training` run (set up; resume or start with epoch 0;
the epochs; model.pt and train.json), metrics.csv and the command line. Its parts live beside it:
`distributed` (the processes), `checkpoint` (random state, last.ckpt, SIGTERM), `validation` (val GAP
and the embedding passes), `finetune` (initialisation, frozen parts, learning rates, WiSE-FT),
`sampler` (batch plans), `losses` (heads), `model`.

    python -m landmarks.train --train-shards results/shards/train/part-00 --val-shards results/shards/val/part-00 \\
        --out-dir results/experiments/X/train --settings '{"epochs": 3}'
    torchrun --standalone --nproc_per_node=4 -m landmarks.train ...      # 4 GPUs, one node
    srun --ntasks-per-node=4 python -m landmarks.train ...               # several nodes (SLURM)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import (
    CHECKPOINT_FORMAT,
    RunState,
    StopSignal,
    TrainingInterrupted,
    data_fingerprint,
    load_resume_state,
    remove_partial_files,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    settings_digest,
)
from .common import StageError, atomic_path, exclusive_lock, run_cli, setup_logging, write_json_atomic
from .config import ConfigError, section_settings
from .distributed import Distributed, average_buffers, ddp_audit, setup_distributed
from .finetune import (
    build_optimizer,
    initialise_from_pretrained,
    interpolate_weights,
    parameter_groups,
    pull_towards_start,
    set_backbone_frozen,
    set_train_mode,
    warmup_cosine,
)
from .loader import ShardIndex, ShardMapDataset, class_mapping, train_transform
from .losses import build_head, head_entry
from .model import LandmarkModel, threshold_folds_state, whitening_buffers
from .report import plot_curves
from .sampler import SeededDataset, TrainBatchSampler, cluster_classes, epoch_rng, images_per_class
from .validation import embed_for_training, evaluate_val_gap, val_queries

log = logging.getLogger("landmarks.train")

EXIT_INTERRUPTED = 143  # 128 + SIGTERM, what schedulers expect from a job stopped by SIGTERM


# ---------------------------------------------------------------------------------------------------
# The data and the training step


def load_training_data(train_dirs, val_dirs, bank_dirs, settings: dict):
    """(train index, val queries, landmark id -> class number, class of each train image, images per class)."""
    train_index = ShardIndex.from_dirs(train_dirs)
    val_index = val_queries(ShardIndex.from_dirs(val_dirs or []), ShardIndex.from_dirs(bank_dirs or []), settings)
    if len(train_index) == 0:
        raise StageError(f"no training images in {', '.join(map(str, train_dirs))}")
    labels = class_mapping(train_index.table["landmark_id"])
    class_of = np.array([-1 if pd.isna(x) else labels[int(x)] for x in train_index.table["landmark_id"]], np.int64)
    counts = np.bincount(class_of[class_of >= 0], minlength=len(labels))
    return train_index, val_index, labels, class_of, counts


def subspace_clusters(
    model,
    train_index: ShardIndex,
    class_of: np.ndarray,
    n_classes: int,
    settings: dict,
    epoch: int,
    device,
    dist: Distributed,
) -> np.ndarray:
    """Seed 004's subspaces: class -> cluster by k-means over class-mean embeddings of the current model
    (from up to `subspace_images_per_class` images per class)."""
    rng = epoch_rng(settings["seed"], epoch, 7)  # a stream of its own, apart from the batch plan's
    chosen = images_per_class(class_of, settings["subspace_images_per_class"], rng)
    sub_index = ShardIndex(train_index.table.iloc[chosen].reset_index(drop=True))
    started = time.perf_counter()
    vectors = embed_for_training(model, sub_index, settings, device, dist)
    sums = np.zeros((n_classes, vectors.shape[1]), np.float64)
    np.add.at(sums, class_of[chosen], vectors)
    present = np.bincount(class_of[chosen], minlength=n_classes) > 0
    clusters = None
    if dist.is_main:
        clusters = cluster_classes(
            sums.astype(np.float32),
            present,
            settings["subspaces"],
            settings["pk_classes"],
            seed=settings["seed"] + epoch,
        )
        log.info(
            "subspaces for epoch %d: %d clusters of %d classes (%d images embedded, %.1f s)",
            epoch + 1,
            clusters.max() + 1,
            int(present.sum()),
            len(chosen),
            time.perf_counter() - started,
        )
    return dist.broadcast_object(clusters)


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


def selection_score(row: dict) -> float:
    """What model selection ranks an evaluated epoch by: its val GAP, or without val its number (the
    last epoch wins)."""
    return row["val_gap"] if not math.isnan(row["val_gap"]) else float(row["epoch"])


def write_metrics_csv(metrics: list[dict], path: Path) -> None:
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as fh:
        columns = list(dict.fromkeys(key for row in metrics for key in row)) or ["epoch"]
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(metrics)


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class EpochProgress:
    """Where the current epoch stands on this process: batches done (from the resumed batch on), images
    seen since (re)starting it, and the running sums (loss x images, images, correct top-1), kept on the
    device until a checkpoint or the epoch's end adds them to the run's totals."""

    running: torch.Tensor
    batch_number: int
    seen: int = 0
    started: float = field(default_factory=time.perf_counter)


class Training:
    """One training run: the model, its head, the data, the optimiser, and where the run stands
    (`state`, a RunState), which `last.ckpt` saves and restores. Set up here, then `resume` or
    `start_fresh`, `run_epoch` for each epoch, `finish`."""

    def __init__(
        self, train_dirs, val_dirs, bank_dirs, out_dir: Path, settings: dict, device: torch.device, dist: Distributed
    ):
        self.settings, self.device, self.dist, self.out_dir = settings, device, dist, Path(out_dir)
        self.train_index, self.val_index, self.labels, self.class_of, counts = load_training_data(
            train_dirs, val_dirs, bank_dirs, settings
        )
        self.has_logits = head_entry(settings["loss"]).has_logits  # a classifier head, not the triplet loss
        # In this order: the model's and the head's random initial weights come first from the seeded state.
        self.build_model(counts)
        self.build_loader()
        self.build_optimiser()
        self.digest = settings_digest(settings, data_fingerprint(self.train_index, self.val_index), dist.world_size)
        self.last_path, self.best_path = self.out_dir / "last.ckpt", self.out_dir / "best.ckpt"
        self.best_trained_path = self.out_dir / "best_trained.ckpt"  # with untrained_val_margin > 0
        self.state, self.resumed_from = RunState(), None
        # This process's sums over the epoch so far: loss x images, images, correct top-1 (classifier heads).
        self.totals = torch.zeros(3, dtype=torch.float64)
        self.last_epoch_positions: list[np.ndarray] = []

    def build_model(self, counts: np.ndarray) -> None:
        """Model and head on the device, joined in the module that DDP wraps."""
        settings, device = self.settings, self.device
        self.model = LandmarkModel(
            settings["backbone"],
            settings["pretrained"],
            settings["embedding_dim"],
            settings["gem_p"],
            settings["pooling"],
            settings["neck"],
            settings["descriptor"],
        )
        self.head = build_head(settings, len(self.labels), torch.from_numpy(counts), self.model.embedding_dim)
        self.model.to(device)
        self.head.to(device)
        # channels-last: on GPUs for tensor cores; on CPUs oneDNN's NHWC kernels made EfficientNet-Lite0's
        # training step 2.5-3x faster on 2 cores (the NCHW backward of depthwise convolutions is slow).
        self.channels_last = settings["channels_last"]
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        amp_dtype = torch.float16 if settings["amp_dtype"] == "float16" else torch.bfloat16
        autocast = dict(device_type=device.type, dtype=amp_dtype, enabled=settings["amp"] and device.type == "cuda")
        self.module = TrainModule(self.model, self.head, autocast)
        self.ddp_module, self.backbone_frozen = None, None  # set by prepare_epoch

    def build_loader(self) -> None:
        """The batch plan (sampler) and the loader of augmented train images."""
        settings, dist = self.settings, self.dist
        self.accumulation = settings["grad_accumulation"]
        self.sampler = TrainBatchSampler(
            self.class_of,
            mode=settings["sampler"],
            batch_size=settings["batch_size"],
            classes_per_batch=settings["pk_classes"],
            images_per_class=settings["pk_images"],
            seed=settings["seed"],
            rank=dist.rank,
            world_size=dist.world_size,
            batches_multiple_of=self.accumulation,
            min_batches=settings["min_steps_per_epoch"] * self.accumulation,
            # A triplet needs a positive; a classifier learns a landmark of one photo from its augmentations.
            min_class_images=1 if self.has_logits else 2,
        )
        transform = train_transform(settings, self.model.data_config["mean"], self.model.data_config["std"])
        dataset = SeededDataset(ShardMapDataset(self.train_index, transform, self.labels))
        workers = settings["workers"]
        # Its own generator: creating the loader's iterator must not consume the global random state.
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(settings["seed"]),
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch // self.accumulation

    def build_optimiser(self) -> None:
        """Optimiser, learning-rate schedule (warm-up, then cosine decay) and the AMP gradient scaler."""
        settings = self.settings
        total_steps = self.steps_per_epoch * settings["epochs"]
        warmup_steps = int(settings["warmup_epochs"] * self.steps_per_epoch)
        self.optimizer = build_optimizer(parameter_groups(self.model, self.head, settings), settings)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, total_steps, warmup_steps, settings["min_lr"] / settings["lr"]),
        )
        autocast = self.module.autocast  # float16 needs its gradients scaled, bfloat16 does not
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=autocast["enabled"] and autocast["dtype"] == torch.float16
        )

    # -- saving and resuming ---------------------------------------------------------------------

    def resume(self) -> tuple[int, int] | None:
        """Continue from last.ckpt when it belongs to this run: the (epoch, batch) it stopped at, or None
        when starting afresh."""
        saved = load_resume_state(self.last_path, self.digest)
        if saved is None:
            return None
        self.model.load_state_dict(saved["model"])
        self.head.load_state_dict(saved["head"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = RunState(**{f.name: saved[f.name] for f in dataclasses.fields(RunState)})
        mine = saved["ranks"][self.dist.rank]
        restore_rng_state(mine["rng"], self.device)
        self.totals = torch.tensor(mine["totals"], dtype=torch.float64)
        self.resumed_from = {"epoch": saved["epoch"], "step": saved["step"]}
        log.info(
            "resuming from %s: epoch %d, batch %d of %d",
            self.last_path,
            saved["epoch"] + 1,
            saved["step"],
            self.sampler.batches_per_epoch,
        )
        return saved["epoch"], saved["step"]

    def model_state(self, epoch: int, whitening: dict | None = None) -> dict:
        """What model.pt holds: the weights (with the whitening learned for them, when there is one)."""
        weights = self.model.state_dict()
        if whitening is not None:
            weights = {**weights, **whitening_buffers(whitening["mean"], whitening["matrix"])}
        return {
            "model": weights,
            "settings": self.settings,
            "data_config": self.model.data_config,
            "classes": {str(k): v for k, v in self.labels.items()},
            "epoch": epoch,
            "threshold_folds": threshold_folds_state((whitening or {}).get("folds", [])),
        }

    def save_training_state(self, epoch: int, step: int) -> None:
        """Every process contributes its random state; rank 0 writes."""
        ranks = self.dist.gather_objects({"rng": rng_state(self.device), "totals": self.totals.tolist()})
        if self.dist.is_main:
            save_checkpoint(
                self.last_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "digest": self.digest,
                    "world_size": self.dist.world_size,
                    "epoch": epoch,
                    "step": step,
                    "global_step": self.state.global_step,
                    "model": self.model.state_dict(),
                    "head": self.head.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "metrics": self.state.metrics,
                    "best_score": self.state.best_score,
                    "best_epoch": self.state.best_epoch,
                    "clusters": self.state.clusters,
                    "initialised": self.state.initialised,
                    "start_weights": self.state.start_weights,
                    "ranks": ranks,
                    "settings": self.settings,
                },
            )

    # -- evaluation and model selection ----------------------------------------------------------

    def start_fresh(self) -> tuple[int, int]:
        """Before the first step: initialise neck and head from the pretrained descriptors (when asked),
        then evaluate the untrained model as epoch 0, so training can never end worse than it started.
        Returns where training starts: epoch 0, batch 0."""
        self.state.initialised = initialise_from_pretrained(
            self.model,
            self.head,
            self.train_index,
            self.class_of,
            self.settings,
            self.device,
            self.dist,
        )
        if self.settings["wise_alpha"] < 1 or self.settings["l2sp"] > 0:
            self.state.start_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        nan = float("nan")
        self.evaluate(
            0, {"train_loss": nan, "train_accuracy": nan, "lr": 0.0, "images_per_s": nan}, time.perf_counter()
        )
        self.save_training_state(0, 0)
        return 0, 0

    def evaluate(self, epoch: int, row: dict, started: float) -> None:
        """Val GAP of the model this epoch would give (with wise_alpha < 1: its weights interpolated with
        the starting ones); the best so far, epoch 0 included, becomes best.ckpt. On a tie the later epoch
        wins: a small val saturates (GAP 1.0 from the start), and then says nothing against training."""
        with self.selected_weights(epoch):
            val = evaluate_val_gap(self.model, self.train_index, self.val_index, self.settings, self.device, self.dist)
            whitening = val.pop("whitening", None)
            if whitening is not None:  # the one model.pt would carry
                val["whitening_shrinkage"] = whitening["about"]["shrinkage"]
                val["whitening_images"] = whitening["about"]["images"]
                val["whitening_threshold_folds"] = len(whitening.get("folds", []))
            row = {"epoch": epoch, **row, **val, "seconds": round(time.perf_counter() - started, 2)}
            self.state.metrics.append(row)
            log.info(
                "epoch %d: loss %.4f, train accuracy %.4f, val GAP %.4f, val accuracy %.4f, %.1f images/s",
                row["epoch"],
                row["train_loss"],
                row["train_accuracy"],
                row["val_gap"],
                row["val_accuracy"],
                row["images_per_s"],
            )
            score = selection_score(row)
            if score >= self.state.best_score:
                self.state.best_score, self.state.best_epoch = score, epoch
                if self.dist.is_main:
                    save_checkpoint(self.best_path, self.model_state(epoch, whitening))
            new_best_trained = epoch > 0 and epoch == self.best_trained_epoch()
            if new_best_trained and self.settings["untrained_val_margin"] > 0 and self.dist.is_main:
                save_checkpoint(self.best_trained_path, self.model_state(epoch, whitening))

    @contextlib.contextmanager
    def selected_weights(self, epoch: int):
        """The weights an epoch's model.pt would hold, in the model for the duration: the trained ones, or
        with wise_alpha < 1 the WiSE-FT interpolation alpha x trained + (1 - alpha) x starting weights
        (Wortsman et al. 2022: keeps what the pretrained model knows, robust to overfitting a small set).
        Training then continues from the trained weights."""
        alpha = self.settings["wise_alpha"]
        if alpha >= 1 or epoch == 0:
            yield
            return
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(interpolate_weights(self.state.start_weights, trained, alpha))
        try:
            yield
        finally:
            self.model.load_state_dict(trained)

    # -- training --------------------------------------------------------------------------------

    def prepare_epoch(self, epoch: int, skip: int) -> None:
        """Clusters, batch plan, frozen or not, train mode and the DDP wrapper for this epoch."""
        s = self.settings
        if s["sampler"] == "subspace" and (
            self.state.clusters is None or (skip == 0 and epoch % s["subspace_every_epochs"] == 0)
        ):
            self.state.clusters = subspace_clusters(
                self.model, self.train_index, self.class_of, len(self.labels), s, epoch, self.device, self.dist
            )
        self.sampler.set_epoch(epoch, skip=skip, clusters=self.state.clusters)
        frozen = epoch < s["freeze_backbone_epochs"]
        if frozen != self.backbone_frozen:
            set_backbone_frozen(self.model, frozen)
            self.backbone_frozen = frozen
            self.ddp_module = self.module
            if self.dist.active:  # DDP must be rebuilt when the set of trained parameters changes
                self.ddp_module = nn.parallel.DistributedDataParallel(
                    self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None
                )
            if s["freeze_backbone_epochs"]:
                log.info("epoch %d: backbone %s", epoch + 1, "frozen (head warm-up)" if frozen else "trained")
        set_train_mode(self.module, self.model, backbone_frozen=frozen, freeze_bn=s["freeze_bn"])

    def run_epoch(self, epoch: int, skip: int, stop: StopSignal) -> None:
        """Train one epoch from batch `skip` on (a resumed epoch), then evaluate it and checkpoint."""
        if skip == 0:
            self.totals.zero_()
        self.prepare_epoch(epoch, skip)
        progress = EpochProgress(torch.zeros(3, dtype=torch.float64, device=self.device), skip)
        self.last_epoch_positions = []
        with self.progress_bar(epoch, skip) as bar:
            self.optimizer.zero_grad(set_to_none=True)
            for images, targets, positions in self.loader:
                boundary = self.train_batch(images, targets, progress)
                self.last_epoch_positions.append(positions.numpy())
                if boundary:
                    self.step_and_checkpoint(epoch, progress, stop)
                bar.update()
                self.show_progress(bar, progress)
        self.totals += progress.running.cpu()
        self.end_epoch(epoch, progress.seen, progress.started)

    def progress_bar(self, epoch: int, skip: int) -> tqdm:
        return tqdm(
            total=self.sampler.batches_per_epoch,
            initial=skip,
            desc=f"epoch {epoch + 1}/{self.settings['epochs']}",
            unit="batch",
            mininterval=2.0 if sys.stderr.isatty() else 30.0,
            disable=not self.dist.is_main,
        )

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, progress: EpochProgress) -> bool:
        """Forward and backward pass of one batch (gradients accumulate over `grad_accumulation` batches,
        synchronised between processes on the last one only); True when the batch completes a step."""
        device = self.device
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        boundary = (progress.batch_number + 1) % self.accumulation == 0
        sync = self.ddp_module.no_sync() if self.dist.active and not boundary else contextlib.nullcontext()
        with sync:
            loss, correct = self.ddp_module(images, targets)
            self.scaler.scale(loss / self.accumulation).backward()
        progress.running[0] += loss.detach().double() * len(targets)
        progress.running[1] += len(targets)
        progress.running[2] += correct.double()
        progress.batch_number += 1
        progress.seen += len(targets)
        return boundary

    def step_and_checkpoint(self, epoch: int, progress: EpochProgress, stop: StopSignal) -> None:
        """The optimizer step; then a checkpoint every `checkpoint_every_steps` steps (the epoch's last
        step is checkpointed after the evaluation) and, once SIGTERM arrived, a last one and the stop."""
        self.optimizer_step()
        # Across processes agreeing costs a synchronising all-reduce: ask every 10 steps only.
        stopping = stop.agreed(self.dist) if not self.dist.active or self.state.global_step % 10 == 0 else False
        end_of_epoch = progress.batch_number == self.sampler.batches_per_epoch
        every = self.settings["checkpoint_every_steps"]
        if stopping or (every and self.state.global_step % every == 0 and not end_of_epoch):
            self.totals += progress.running.cpu()
            progress.running.zero_()
            self.save_training_state(epoch, progress.batch_number)
        if stopping:
            raise TrainingInterrupted(
                f"stopped by SIGTERM in epoch {epoch + 1} after batch {progress.batch_number}; "
                f"{self.last_path} resumes it"
            )

    def show_progress(self, bar: tqdm, progress: EpochProgress) -> None:
        """Loss so far and images per second in the progress bar, every 10 batches (rank 0 only)."""
        if self.dist.is_main and progress.batch_number % 10 == 0:
            so_far = self.totals + progress.running.cpu()
            elapsed = max(1e-9, time.perf_counter() - progress.started)
            bar.set_postfix(
                loss=f"{so_far[0] / max(1.0, so_far[1]):.3f}",
                img_s=f"{progress.seen * self.dist.world_size / elapsed:.1f}",
                refresh=False,
            )

    def optimizer_step(self) -> None:
        if self.settings["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.settings["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.settings["l2sp"] > 0:  # at the lrs this step used, before the schedule moves them
            pull_towards_start(self.model, self.state.start_weights, self.optimizer, self.settings["l2sp"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.global_step += 1

    def end_epoch(self, epoch: int, seen: int, epoch_started: float) -> None:
        elapsed = time.perf_counter() - epoch_started
        if self.dist.active:
            with torch.no_grad():
                average_buffers(self.module, self.dist)
        totals = self.dist.all_reduce(self.totals.clone())
        self.evaluate(
            epoch + 1,
            {
                "train_loss": float(totals[0] / totals[1]) if totals[1] else float("nan"),
                "train_accuracy": float(totals[2] / totals[1]) if self.has_logits and totals[1] else float("nan"),
                "lr": self.scheduler.get_last_lr()[0],
                "images_per_s": seen * self.dist.world_size / elapsed if seen else float("nan"),
            },
            epoch_started,
        )
        self.totals.zero_()
        self.save_training_state(epoch + 1, 0)
        if self.dist.is_main:  # to follow a long run (the curves are drawn at the end: matplotlib is slow)
            write_metrics_csv(self.state.metrics, self.out_dir / "metrics.csv")

    # -- the result ------------------------------------------------------------------------------

    def finish(self, seconds: float) -> None:
        """model.pt (the best epoch, or the untrained model when no epoch beat it), curves, train.json."""
        audit = ddp_audit(self.module, self.last_epoch_positions, self.dist) if self.dist.active else None
        if not self.dist.is_main:
            return
        if not self.best_path.exists():  # deleted by hand after the best epoch: the final weights stand in
            save_checkpoint(self.best_path, self.model_state(self.settings["epochs"]))
        with atomic_path(self.out_dir / "model.pt", suffix=".pt.part") as tmp:
            shutil.copyfile(self.best_trained_path if self.untrained_within_margin() else self.best_path, tmp)
        write_metrics_csv(self.state.metrics, self.out_dir / "metrics.csv")
        plot_curves(self.state.metrics, self.out_dir / "curves.png")
        write_json_atomic(self.out_dir / "train.json", self.summary(audit, seconds))

    def untrained_within_margin(self) -> bool:
        """Whether val chose the untrained model by fewer val landmark photos answered right than
        `untrained_val_margin` over the best trained epoch: then that epoch is kept instead (on a small
        val one photo is noise, and a trained epoch that val scores that close usually scores better on
        the test: bench/real_photos.md, "How well val picks the epoch")."""
        margin, challenger = self.settings["untrained_val_margin"], self.best_trained_epoch()
        if margin <= 0 or self.state.best_epoch != 0 or challenger == 0:
            return False
        if not self.best_trained_path.exists():  # deleted by hand: keep what val chose
            return False
        right = {row["epoch"]: row.get("val_right", 0) for row in self.state.metrics}
        return right[0] - right[challenger] < margin

    def best_trained_epoch(self) -> int:
        """The best epoch after 0 by val (the later on a tie), 0 when none has ended yet."""
        trained = [row for row in self.state.metrics if row["epoch"] > 0]
        return max(trained, key=lambda row: (selection_score(row), row["epoch"]))["epoch"] if trained else 0

    def selected_epoch(self) -> int:
        return self.best_trained_epoch() if self.untrained_within_margin() else self.state.best_epoch

    def whitening_summary(self, best: dict) -> dict | str | None:
        """train.json's account of the learned whitening in model.pt."""
        if self.settings["whitening"] != "learned":
            return None
        if "whitening_shrinkage" not in best:
            return "not learned: no landmark has two photos (or there is no val split to learn it with)"
        return {
            "fitted_on": self.settings["whitening_from"],
            "images": best["whitening_images"],
            "shrinkage": best["whitening_shrinkage"],
            "val_gap_unwhitened": best.get("val_gap_unwhitened"),
            # whitenings that leave val photos out, for retrieve's threshold (validation.threshold_folds)
            "threshold_folds": best.get("whitening_threshold_folds", 0),
        }

    def summary(self, audit: dict | None, seconds: float) -> dict:
        """train.json: data sizes, the selected epoch and its val scores, steps, initialisation, resume,
        processes, time, device and settings."""
        chosen = self.selected_epoch()
        best = next((r for r in self.state.metrics if r["epoch"] == chosen), self.state.metrics[-1])
        if chosen != self.state.best_epoch:
            log.info(
                "the untrained model led on val (GAP %.4f) by fewer than %d val photos answered right: "
                "model.pt is epoch %d (val GAP %.4f)",
                self.state.metrics[0]["val_gap"],
                self.settings["untrained_val_margin"],
                chosen,
                best["val_gap"],
            )
        if chosen == 0:
            selected = "pretrained" if self.settings["epochs"] else "pretrained (epochs: 0)"
            if self.settings["epochs"]:
                log.warning(
                    "no epoch beat the untrained model on val (GAP %.4f): model.pt is the untrained model",
                    best["val_gap"],
                )
        else:
            selected = f"epoch {chosen}"
        return {
            "classes": len(self.labels),
            "train_images": len(self.train_index),
            "val_images": len(self.val_index),
            "selected": selected,
            "best_epoch": best["epoch"],
            "best_val_gap": best["val_gap"],
            "best_val_accuracy": best["val_accuracy"],
            "untrained_val_gap": self.state.metrics[0]["val_gap"],
            # val landmark photos answered right, untrained and selected (train.untrained_val_margin)
            "untrained_val_right": self.state.metrics[0].get("val_right"),
            "best_val_right": best.get("val_right"),
            "whitening": self.whitening_summary(best),
            "steps_per_epoch": self.steps_per_epoch,
            "global_steps": self.state.global_step,
            "initialised": self.state.initialised,
            "resumed_from": self.resumed_from,
            "world_size": self.dist.world_size,
            "ddp": audit,
            "seconds": round(seconds, 1),
            "device": str(self.device),
            "settings": self.settings,
        }


def train(
    train_dirs,
    val_dirs,
    out_dir: Path,
    settings: dict,
    *,
    device: torch.device,
    threads: int | None = None,
    dist: Distributed | None = None,
    bank_dirs=(),
) -> list[dict]:
    """Train (or resume) one experiment; returns the per-epoch metrics, the untrained model's as epoch 0.
    See the module docstring."""
    dist = dist or Distributed(device=device)
    device = dist.device if dist.active else device
    out_dir = Path(out_dir)
    # One training job per output folder: a second one (a rerun started by hand, a duplicate SLURM job)
    # would interleave checkpoints with the first. The main process holds the lock.
    with exclusive_lock(out_dir / ".train.lock", "another training job") if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            remove_partial_files(out_dir)
        return train_unlocked(train_dirs, val_dirs, out_dir, settings, device, threads, dist, bank_dirs)


def train_unlocked(train_dirs, val_dirs, out_dir: Path, settings: dict, device, threads, dist, bank_dirs) -> list[dict]:
    """The run: set up (seeded), resume from last.ckpt or start fresh (epoch 0), the epochs, finish."""
    if threads:
        torch.set_num_threads(threads)
    seed_everything(settings["seed"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run = Training(train_dirs, val_dirs, bank_dirs, out_dir, settings, device, dist)
    started = time.perf_counter()
    first_epoch, skip = run.resume() or run.start_fresh()
    with StopSignal() as stop:
        for epoch in range(first_epoch, settings["epochs"]):
            run.run_epoch(epoch, skip if epoch == first_epoch else 0, stop)
    run.finish(time.perf_counter() - started)
    return run.state.metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-shards", nargs="+", required=True, help="shard folders of the train split")
    parser.add_argument("--val-shards", nargs="*", default=[], help="shard folders of the val split")
    parser.add_argument(
        "--nonlandmark-shards",
        nargs="*",
        default=[],
        help="shard folders of the non-landmark bank: a sample joins val as non-landmark queries",
    )
    parser.add_argument(
        "--out-dir", required=True, help="model.pt, metrics.csv, curves.png, train.json, last.ckpt, best.ckpt go here"
    )
    parser.add_argument(
        "--settings",
        default="{}",
        help="JSON object of train settings (config.yaml's train section); defaults fill the rest",
    )
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
        train(
            args.train_shards,
            args.val_shards,
            Path(args.out_dir),
            settings,
            device=dist.device,
            threads=args.threads,
            dist=dist,
            bank_dirs=args.nonlandmark_shards,
        )
    except TrainingInterrupted as stopped:
        log.warning("%s", stopped)
        return EXIT_INTERRUPTED
    finally:
        if dist.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_cli(main)

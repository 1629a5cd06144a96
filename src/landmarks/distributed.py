"""Training's processes: one, or one per GPU under DistributedDataParallel.

Who this process is among the training processes (`Distributed`: rank, world size, device and the three
collectives training uses), found from torchrun's variables (RANK / WORLD_SIZE / LOCAL_RANK) or, under
`srun`, SLURM's (SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, rendezvous on the first node of
the step); NCCL on GPUs, gloo on CPUs. Also what DDP leaves to do after an epoch: averaging the BatchNorm
statistics, and the audit train.json reports. Nothing here knows about models or losses, so `train`,
`validation` and `checkpoint` can all share one `Distributed`.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from .common import StageError
from .device import pick_device

log = logging.getLogger("landmarks.train")  # the stage this serves, as its log lines always said


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
            hosts = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
    if not nodelist:
        raise StageError(
            "launched by srun with several tasks, but neither SLURM_STEP_NODELIST nor "
            "SLURM_JOB_NODELIST names the nodes (set MASTER_ADDR)"
        )
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
            20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
        )
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Long timeout: rank 0 alone writes checkpoints and the others wait for it in the next collective.
    torch_dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=60))
    log.info(
        "process %d of %d (local rank %d) on %s, backend %s, rendezvous %s:%s",
        rank,
        world,
        local_rank,
        device,
        backend,
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
    )
    return Distributed(rank, world, local_rank, device)


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
    audit = {
        "backend": torch_dist.get_backend(),
        "max_weight_difference_between_ranks": difference,
        "last_epoch_images_per_rank": [len(p) for p in per_rank],
        "last_epoch_images_on_several_ranks": int(len(every) - len(np.unique(every))),
    }
    if difference > 0:
        log.warning("DDP audit: weights differ between processes by up to %g", difference)
    return audit

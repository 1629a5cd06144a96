"""Reading the tar shards written by the `shard` stage, for training and embedding.

`ShardIndex` gathers the index tables of a split's shard folders. `ShardDataset` streams samples
sequentially from the tars (one open file per shard, no random seeks), with a shuffle buffer and a
new shard order every epoch when training, and in the index's stable order for embedding. Each
DataLoader worker and DDP rank reads its own slice, so an epoch sees every image exactly once.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .common import StageError, read_table

log = logging.getLogger("landmarks.loader")


@dataclass
class ShardIndex:
    """All samples of one split: a table with shard (absolute path), key, id, landmark_id, width, height."""

    table: pd.DataFrame

    @classmethod
    def from_dirs(cls, dirs) -> "ShardIndex":
        frames = []
        for folder in map(Path, dirs):
            index_path = folder / "index.parquet"
            if not index_path.exists():
                raise StageError(f"{folder}: no index.parquet (was the shard stage run for this folder?)")
            frame = read_table(index_path)
            frame["shard"] = [str(folder / name) for name in frame["shard"]]
            frames.append(frame)
        columns = ["shard", "key", "id", "landmark_id", "width", "height", "offset", "size"]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        table["landmark_id"] = table["landmark_id"].astype("Int64")
        return cls(table.reset_index(drop=True))

    def __len__(self) -> int:
        return len(self.table)

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.table["shard"]))  # file order, deduplicated


def read_sample(shard: str, key: str) -> Image.Image:
    """One image by key (for reports; training streams instead)."""
    with tarfile.open(shard) as tar:
        return Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())).convert("RGB")


class ShardMapDataset(torch.utils.data.Dataset):
    """Random access to the shards' images by index position, via the byte offsets in the index.

    For samplers that pick images by class (P x K batches); sequential passes should prefer the
    streaming ShardDataset. Each DataLoader worker keeps its own open file handles.
    """

    def __init__(self, index: ShardIndex, transform, labels: dict | None = None):
        self.index, self.transform, self.labels = index, transform, labels or {}
        table = index.table
        self._where = list(zip(table["shard"], table["offset"].astype("int64"), table["size"].astype("int64")))
        self._landmark = table["landmark_id"].tolist()
        self._files = {}

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, position: int):
        shard, offset, size = self._where[position]
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = open(shard, "rb")
        handle.seek(offset)
        image = Image.open(io.BytesIO(handle.read(size))).convert("RGB")
        landmark = self._landmark[position]
        label = -1 if pd.isna(landmark) else self.labels.get(int(landmark), -1)
        return self.transform(image), label, position

    def __getstate__(self):  # file handles don't travel to worker processes
        return {**self.__dict__, "_files": {}}


def iter_shard(path: str):
    """Yield (key, jpeg bytes) from a tar shard, reading it front to back."""
    with tarfile.open(path, mode="r|") as stream:
        for member in stream:
            if member.isfile() and member.name.endswith(".jpg"):
                yield member.name[: -len(".jpg")], stream.extractfile(member).read()


def _slot() -> tuple[int, int]:
    """(this reader's number, number of readers) across DDP ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker = get_worker_info()
    worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
    return rank * workers + worker_id, world * workers


class ShardDataset(IterableDataset):
    """Stream (image tensor, label, position) from the shards of an index.

    `labels` maps landmark ids to class numbers (missing -> -1). With `shuffle`, every epoch draws a
    new shard order and mixes samples through a buffer; without it, samples come in index order and
    `position` (the row in the index) lets the caller put outputs back in that order.

    The split between readers is by sample position (position % readers == slot), so every sample is
    read by exactly one reader whatever the number of shards; each reader still reads sequentially.
    """

    def __init__(self, index: ShardIndex, transform, labels: dict | None = None, shuffle: bool = False,
                 seed: int = 0, shuffle_buffer: int = 512):
        self.index, self.transform = index, transform
        self.labels = labels or {}
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.epoch = 0
        table = index.table
        self._landmark = table["landmark_id"].tolist()
        # Positions (rows of the index) per shard, in the order the shard stores them.
        self._shard_positions = {shard: rows.index.to_numpy() for shard, rows in table.groupby("shard", sort=False)}
        self._key_position = {(s, k): i for i, (s, k) in enumerate(zip(table["shard"], table["key"]))}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _decode(self, data: bytes, position: int):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        landmark = self._landmark[position]
        label = -1 if pd.isna(landmark) else self.labels.get(int(landmark), -1)
        return self.transform(image), label, position

    def __iter__(self):
        slot, readers = _slot()
        # Every reader derives the same shard order from (seed, epoch), then keeps every readers-th sample.
        shards = self.index.shards
        if self.shuffle:
            shards = [shards[i] for i in np.random.default_rng((self.seed, self.epoch)).permutation(len(shards))]
        epoch_order = np.concatenate([self._shard_positions[s] for s in shards]) if shards else np.array([], int)
        mine = set(epoch_order[slot::readers].tolist())
        buffer_rng = np.random.default_rng((self.seed, self.epoch, slot))
        buffer = []
        for shard in shards:
            for key, data in iter_shard(shard):
                position = self._key_position.get((shard, key))
                if position not in mine:
                    continue
                if not self.shuffle:
                    yield self._decode(data, position)
                    continue
                buffer.append((data, position))
                if len(buffer) >= self.shuffle_buffer:
                    yield self._decode(*buffer.pop(int(buffer_rng.integers(len(buffer)))))
        while buffer:
            yield self._decode(*buffer.pop(int(buffer_rng.integers(len(buffer)))))


def class_mapping(landmark_ids) -> dict[int, int]:
    """Landmark id -> contiguous class number, sorted so the mapping is reproducible."""
    unique = sorted({int(x) for x in landmark_ids if not pd.isna(x)})
    return {landmark: number for number, landmark in enumerate(unique)}

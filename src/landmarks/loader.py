"""Reading the tar shards written by the `shard` stage, for training and embedding.

`ShardIndex` gathers the index tables of a split's shard folders. `ShardDataset` streams samples from
the tars, with a shuffle buffer and a new shard order every epoch when training, and in the index's
stable order for embedding. `ShardMapDataset` gives random access by byte offset (class samplers).
`train_transform` / `eval_transform` build the augmentations from the `train` config section.

How an epoch is divided between readers (DDP ranks x DataLoader workers)
-----------------------------------------------------------------------
All readers derive the same epoch order from (seed, epoch): the shards in a (shuffled) order, each
shard's samples in file order. Rank r takes the r-th contiguous slice of that order and splits it
into contiguous slices, one per DataLoader worker. A reader therefore reads only its own byte ranges,
front to back in large chunks: the shards' bytes are read once per epoch in all, and a shard is shared
by two readers only where a slice boundary falls inside it.

DDP needs every rank to run the same number of steps (a rank that stops early leaves the others
waiting in an all-reduce forever). `balance` decides how uneven slices are evened out:
  "pad"   every rank gets ceil(N / world) samples; the order is extended cyclically from its start,
          so the last rank(s) repeat up to world - 1 samples. Every image is seen, at least once.
  "drop"  every rank gets floor(N / world); up to world - 1 samples at the end of this epoch's order
          are left out (other ones each epoch when shuffling). No image is seen twice.
  "none"  slices differ by at most one sample; every image exactly once (embedding, evaluation).
"auto" (default) is "pad" when shuffling (training) and "none" otherwise. With world size 1 all three
are the same: every image exactly once. Equal samples per rank and the same number of workers on every
rank give equal batches per rank: the workers' split of a rank's slice depends only on its length.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms

from .common import StageError, read_table
from .images import decode_rgb
from .tables import SHARD_INDEX_COLUMNS

log = logging.getLogger("landmarks.loader")

BALANCE_MODES = ("auto", "pad", "drop", "none")
# Bytes fetched per read: large sequential reads suit network file systems (Lustre, NFS, GPFS).
READ_CHUNK_BYTES = 4 << 20


@dataclass
class ShardIndex:
    """All samples of one split: a table with shard (absolute path), key, id, landmark_id, width, height,
    offset and size (where the JPEG bytes lie in the tar)."""

    table: pd.DataFrame

    @classmethod
    def from_dirs(cls, dirs) -> ShardIndex:
        frames = []
        for folder in map(Path, dirs):
            index_path = folder / "index.parquet"
            if not index_path.exists():
                raise StageError(f"{folder}: no index.parquet (was the shard stage run for this folder?)")
            frame = read_table(index_path)
            missing = set(SHARD_INDEX_COLUMNS) - set(frame.columns)
            if missing:
                raise StageError(
                    f"{index_path}: missing columns {sorted(missing)} (written by an older shard stage? rerun it)"
                )
            for name in dict.fromkeys(frame["shard"]):
                if not (folder / name).exists():
                    raise StageError(f"{index_path}: lists {name}, which is not in {folder}")
            frame["shard"] = [str(folder / name) for name in frame["shard"]]
            frames.append(frame[SHARD_INDEX_COLUMNS])
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SHARD_INDEX_COLUMNS)
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
        return decode_rgb(tar.extractfile(f"{key}.jpg").read())


class ShardImages:
    """Images by id, read from the shards by byte offset (random access: for reports, geometric
    verification and predictions; training streams instead)."""

    def __init__(self, shard_dirs=()):
        self.rows = {}
        if shard_dirs:
            table = ShardIndex.from_dirs(shard_dirs).table
            self.rows = {
                i: (s, k, o, n)
                for i, s, k, o, n in zip(table["id"], table["shard"], table["key"], table["offset"], table["size"])
            }

    def __contains__(self, image_id) -> bool:
        return image_id in self.rows

    def image(self, image_id: str) -> Image.Image | None:
        """The stored image (RGB), or None when the id is unknown or its shard unreadable (logged)."""
        row = self.rows.get(image_id)
        if row is None:
            return None
        shard, key, offset, length = row
        try:
            if offset is not None and not pd.isna(offset):
                with open(shard, "rb") as fh:
                    fh.seek(int(offset))
                    return decode_rgb(fh.read(int(length)))
            return read_sample(shard, key)
        except (OSError, KeyError) as err:
            log.warning("cannot read image %s from %s: %s", image_id, shard, err)
            return None

    def thumbnail(self, image_id: str, size: int = 128) -> Image.Image | None:
        image = self.image(image_id)
        if image is not None:
            image.thumbnail((size, size))
        return image


def iter_shard(path: str):
    """Yield (key, jpeg bytes) from a tar shard, reading it front to back with plain tarfile."""
    with tarfile.open(path, mode="r|") as stream:
        for member in stream:
            if member.isfile() and member.name.endswith(".jpg"):
                yield member.name[: -len(".jpg")], stream.extractfile(member).read()


def _class_numbers(landmarks, labels: dict) -> np.ndarray:
    return np.array([-1 if pd.isna(x) else labels.get(int(x), -1) for x in landmarks], dtype=np.int64)


class ShardMapDataset(torch.utils.data.Dataset):
    """Random access to the shards' images by index position, via the byte offsets in the index.

    For samplers that pick images by class (P x K batches); sequential passes should prefer the
    streaming ShardDataset. Each DataLoader worker keeps its own open file handles, at most
    `max_open_files` of them (least recently used closed first: a split has thousands of shards and a
    process may hold only ~1024 files).
    """

    def __init__(self, index: ShardIndex, transform, labels: dict | None = None, max_open_files: int = 64):
        self.index, self.transform, self.labels = index, transform, labels or {}
        table = index.table
        self._shard = table["shard"].to_numpy(dtype=object)
        self._offset = table["offset"].to_numpy(dtype=np.int64)
        self._size = table["size"].to_numpy(dtype=np.int64)
        self._key = table["key"].to_numpy(dtype=object)
        self._label = _class_numbers(table["landmark_id"], self.labels)
        self.max_open_files = max_open_files
        self._files: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._offset)

    def _handle(self, shard: str):
        handle = self._files.pop(shard, None)
        if handle is None:
            handle = open(shard, "rb")
            while len(self._files) >= self.max_open_files:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = handle  # most recently used last
        return handle

    def read(self, position: int) -> bytes:
        """The JPEG bytes at `position`, after checking the tar header in front of them."""
        shard, offset, size = self._shard[position], self._offset[position], self._size[position]
        handle = self._handle(shard)
        handle.seek(offset - tarfile.BLOCKSIZE)
        data = handle.read(tarfile.BLOCKSIZE + size)
        if len(data) != tarfile.BLOCKSIZE + size:
            raise StageError(
                f"{shard}: file ends before byte {offset + size} where index.parquet has a sample "
                "(truncated shard? rerun the shard stage)"
            )
        _check_header(data[: tarfile.BLOCKSIZE], self._key[position], offset, size, shard)
        return data[tarfile.BLOCKSIZE :]

    def __getitem__(self, position: int):
        image = decode_rgb(self.read(position))
        return (self.transform(image) if self.transform else image), int(self._label[position]), position

    def __getstate__(self):  # file handles don't travel to worker processes
        return {**self.__dict__, "_files": OrderedDict()}

    def __del__(self):
        for handle in getattr(self, "_files", {}).values():
            handle.close()


def _check_header(block: bytes, key: str, offset: int, size: int, path: str) -> None:
    """The tar header in front of a JPEG must name its sample: catches an index that no longer matches
    its shard (a shard rewritten without its index) before it trains on wrong labels. Reads the ustar
    name and size fields directly (tarfile's parser costs more than the read itself)."""
    expected = f"{key}.jpg"
    name = block[:100].split(b"\0", 1)[0]
    try:
        stored_size = int(block[124:136].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        stored_size = -1
    if stored_size != size or name != expected.encode("utf-8")[:100]:
        raise StageError(
            f"{path}: no {expected} at byte {offset} as index.parquet says; the shard and its "
            "index do not match (rerun the shard stage)"
        )


# ---------------------------------------------------------------------------------------------------
# Dividing an epoch between readers


def split_range(count: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of `part` when `count` items are cut into `parts` contiguous, near-equal slices."""
    return part * count // parts, (part + 1) * count // parts


def rank_share(order: np.ndarray, rank: int, world: int, balance: str) -> np.ndarray:
    """The slice of the epoch order that `rank` of `world` reads (see the module docstring)."""
    count = len(order)
    if world == 1 or count == 0:
        return order
    if balance == "pad":
        per_rank = -(-count // world)
        return np.resize(order, per_rank * world)[rank * per_rank : (rank + 1) * per_rank]  # resize repeats cyclically
    if balance == "drop":
        per_rank = count // world
        return order[rank * per_rank : (rank + 1) * per_rank]
    start, stop = split_range(count, world, rank)
    return order[start:stop]


def rank_count(count: int, rank: int, world: int, balance: str) -> int:
    """len(rank_share(...)) without building the order."""
    if world == 1 or count == 0:
        return count
    if balance == "pad":
        return -(-count // world)
    if balance == "drop":
        return count // world
    start, stop = split_range(count, world, rank)
    return stop - start


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """Stream (image tensor, label, position) from the shards of an index.

    `labels` maps landmark ids to class numbers (missing -> -1). With `shuffle`, every epoch
    (`set_epoch`) draws a new shard order and mixes samples through a `shuffle_buffer`; without it,
    samples come in index order per reader and `position` (the row in the index) lets the caller put
    outputs back in that order. How readers divide an epoch, and `balance`: see the module docstring.
    `rank`/`world_size` default to torch.distributed's (given explicitly, they simulate DDP ranks).
    """

    def __init__(
        self,
        index: ShardIndex,
        transform,
        labels: dict | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 512,
        *,
        balance: str = "auto",
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if balance not in BALANCE_MODES:
            raise StageError(f"ShardDataset: balance must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise StageError(f"ShardDataset: rank {rank} of world size {world_size} is not a valid pair")
        if shuffle_buffer < 1:
            raise StageError(f"ShardDataset: shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.index, self.transform = index, transform
        self.labels = labels or {}
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.balance = ("pad" if shuffle else "none") if balance == "auto" else balance
        self.rank, self.world_size = rank, world_size
        # Shared memory: workers kept alive across epochs (persistent_workers) still see set_epoch.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._main_rank_world = distributed_rank_world()

        table = index.table
        shard_codes, self._shard_paths = pd.factorize(table["shard"], sort=False)
        self._shard_code = shard_codes.astype(np.int64)
        self._offset = table["offset"].to_numpy(dtype=np.int64)
        self._size = table["size"].to_numpy(dtype=np.int64)
        self._key = table["key"].to_numpy(dtype=object)
        self._label = _class_numbers(table["landmark_id"], self.labels)
        # Positions of each shard's samples, in the order they lie in the file.
        order = np.lexsort((self._offset, self._shard_code))
        bounds = np.searchsorted(self._shard_code[order], np.arange(len(self._shard_paths) + 1))
        self._shard_positions = [order[bounds[s] : bounds[s + 1]] for s in range(len(self._shard_paths))]

    # -- epochs and division -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (in the main process): the shard order and buffer depend on it."""
        self._epoch.fill_(epoch)
        self._main_rank_world = distributed_rank_world()

    def _rank_world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        live = distributed_rank_world()
        # Spawned workers have no process group: fall back to what the main process saw.
        return live if live[1] > 1 else self._main_rank_world

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """Every position once, in the order this epoch reads them (the same in every reader)."""
        epoch = self.epoch if epoch is None else epoch
        shards = np.arange(len(self._shard_paths))
        if self.shuffle:
            shards = np.random.default_rng((self.seed, epoch)).permutation(shards)
        parts = [self._shard_positions[s] for s in shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def reader_positions(
        self, rank: int, world: int, worker: int = 0, workers: int = 1, epoch: int | None = None
    ) -> np.ndarray:
        """Positions that worker `worker` of `workers` on rank `rank` of `world` reads this epoch."""
        mine = rank_share(self.epoch_order(epoch), rank, world, self.balance)
        start, stop = split_range(len(mine), workers, worker)
        return mine[start:stop]

    def __len__(self) -> int:
        """Samples this rank yields per epoch (all its DataLoader workers together)."""
        rank, world = self._rank_world()
        return rank_count(len(self.index), rank, world, self.balance)

    def batches_per_epoch(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> int:
        """Batches a DataLoader over this dataset yields on this rank per epoch: each worker batches
        its own slice, so a worker's last batch may be short (or dropped with drop_last)."""
        per_rank, workers = len(self), max(1, num_workers)
        counts = [stop - start for start, stop in (split_range(per_rank, workers, w) for w in range(workers))]
        return sum(c // batch_size if drop_last else -(-c // batch_size) for c in counts)

    # -- reading --------------------------------------------------------------------------------------

    def _open(self, path: str):
        return open(path, "rb")

    def read_samples(self, positions):
        """Yield (position, JPEG bytes) for `positions`, reading runs of neighbouring samples of a shard
        in one sequential read of up to READ_CHUNK_BYTES."""
        handle, handle_shard = None, -1
        positions = np.asarray(positions, dtype=np.int64)
        try:
            i, count = 0, len(positions)
            while i < count:
                first = positions[i]
                shard = self._shard_code[first]
                start = self._offset[first] - tarfile.BLOCKSIZE  # include the first sample's header
                end = self._offset[first] + self._size[first]
                j = i + 1
                while j < count:
                    nxt = positions[j]
                    nxt_end = self._offset[nxt] + self._size[nxt]
                    if (
                        self._shard_code[nxt] != shard
                        or self._offset[nxt] - tarfile.BLOCKSIZE < end
                        or nxt_end - start > READ_CHUNK_BYTES
                    ):
                        break
                    end, j = nxt_end, j + 1
                path = self._shard_paths[shard]
                if shard != handle_shard:
                    if handle is not None:
                        handle.close()
                    handle, handle_shard = self._open(path), shard
                handle.seek(start)
                chunk = handle.read(end - start)
                if len(chunk) != end - start:
                    raise StageError(
                        f"{path}: file ends at byte {start + len(chunk)}, but index.parquet has a "
                        f"sample up to byte {end} (truncated shard? rerun the shard stage)"
                    )
                for position in positions[i:j]:
                    at = self._offset[position] - start
                    _check_header(
                        chunk[at - tarfile.BLOCKSIZE : at],
                        self._key[position],
                        self._offset[position],
                        self._size[position],
                        path,
                    )
                    yield int(position), chunk[at : at + self._size[position]]
                i = j
        finally:
            if handle is not None:
                handle.close()

    @staticmethod
    def _shuffled(samples, buffer_size: int, rng: np.random.Generator):
        """Yield `samples` in a random order drawn through a buffer of `buffer_size` items."""
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= buffer_size:
                pick = int(rng.integers(len(buffer)))
                buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, data: bytes, position: int):
        image = decode_rgb(data)
        return (self.transform(image) if self.transform else image), int(self._label[position]), position

    def __iter__(self):
        rank, world = self._rank_world()
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        epoch = self.epoch
        samples = self.read_samples(self.reader_positions(rank, world, worker_id, workers, epoch))
        if self.shuffle:
            samples = self._shuffled(
                samples, self.shuffle_buffer, np.random.default_rng((self.seed, epoch, rank, worker_id))
            )
        for position, data in samples:
            yield self._decode(data, position)


def _seed_worker(worker_id: int) -> None:
    """Augmentation randomness per worker and per DDP rank: DataLoader's own worker seeds are the same
    on every rank when the ranks seed torch alike, so rank 1 would repeat rank 0's crops."""
    rank, _ = distributed_rank_world()
    seed = int(np.random.SeedSequence([torch.initial_seed() % 2**63, rank]).generate_state(1)[0])
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset,
    batch_size: int,
    *,
    workers: int = 0,
    device: str | torch.device | None = None,
    drop_last: bool = False,
    prefetch_factor: int = 4,
    persistent_workers: bool = True,
) -> DataLoader:
    """A DataLoader that keeps a GPU fed: batches in pinned memory when `device` is CUDA (so
    `.to(device, non_blocking=True)` overlaps the copy), `prefetch_factor` batches queued per worker,
    workers kept across epochs (ShardDataset.set_epoch still reaches them), per-rank worker seeds."""
    pin = device is not None and torch.device(device).type == "cuda"
    options = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin, drop_last=drop_last)
    if workers > 0:
        options.update(
            prefetch_factor=prefetch_factor, persistent_workers=persistent_workers, worker_init_fn=_seed_worker
        )
    return DataLoader(dataset, **options)


# ---------------------------------------------------------------------------------------------------
# Transforms


def train_transform(settings: dict, mean, std):
    """Train-time augmentation from the `train` config section: random resized crop to
    `image_size` (scale `augment.random_resized_crop_scale`), horizontal flip, small rotations,
    random shifts (`augment.translate`), colour jitter (brightness, contrast, saturation), then normalisation. A 0/false turns a step off."""
    aug = settings["augment"]
    steps = [
        transforms.RandomResizedCrop(
            settings["image_size"],
            scale=tuple(aug["random_resized_crop_scale"]),
            interpolation=transforms.InterpolationMode.BICUBIC,
        )
    ]
    if aug["hflip"]:
        steps.append(transforms.RandomHorizontalFlip())
    if aug["rotation_degrees"]:
        steps.append(transforms.RandomRotation(aug["rotation_degrees"]))
    if aug["translate"]:
        shift = aug["translate"]
        steps.append(transforms.RandomAffine(degrees=0, translate=(shift, shift)))
    if aug["color_jitter"]:
        j = aug["color_jitter"]
        steps.append(transforms.ColorJitter(j, j, j))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def eval_transform(image_size: int, mean, std, *, whole_image: bool = False):
    """Shorter side to `image_size`, then the centred square (or, with `whole_image`, the whole photo at
    its own aspect ratio), normalise: no augmentation at evaluation time."""
    steps = [transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC)]
    if not whole_image:
        steps.append(transforms.CenterCrop(image_size))
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def class_mapping(landmark_ids) -> dict[int, int]:
    """Landmark id -> contiguous class number, sorted so the mapping is reproducible."""
    unique = sorted({int(x) for x in landmark_ids if not pd.isna(x)})
    return {landmark: number for number, landmark in enumerate(unique)}

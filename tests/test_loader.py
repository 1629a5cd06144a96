"""Reading shards: exact coverage across DDP ranks x DataLoader workers, equal batches per rank, disjoint
reads, per-epoch shard order, stable evaluation order, index/shard mismatches, transforms."""

import numpy as np
import pytest
import torch
from conftest import write_image_set, write_shards
from PIL import Image
from torch.utils.data import DataLoader

from landmarks import loader
from landmarks.common import StageError
from landmarks.loader import ShardDataset, ShardIndex

IMAGES = 37  # prime: no world size or batch size divides it


def _colour(n: int) -> tuple[int, int, int]:
    return (n * 6) % 256, 255 - (n * 6) % 256, (n * 53) % 256


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory):
    """37 flat-colour images (colour = function of the image number) in two parts of 4-image shards."""
    root = tmp_path_factory.mktemp("loader")
    photos = [(f"im{n}", Image.new("RGB", (24, 16), _colour(n)), 500 + n % 5, "train") for n in range(IMAGES)]
    selection = write_image_set(root, photos, selection_file=None, quality=95)
    return write_shards(
        selection, root / "images", root, ("train",), layout="part-{part:02d}", parts=2, size=16, images_per_shard=4
    )


@pytest.fixture(scope="module")
def index(shard_dirs):
    return ShardIndex.from_dirs(shard_dirs)


def _nothing(image):
    return 0


def _run_rank(index, rank, world, workers, balance, batch_size=4, epoch=0):
    dataset = ShardDataset(
        index, _nothing, shuffle=True, seed=7, shuffle_buffer=3, balance=balance, rank=rank, world_size=world
    )
    dataset.set_epoch(epoch)
    batches = list(DataLoader(dataset, batch_size=batch_size, num_workers=workers))
    positions = [int(p) for _, _, batch in batches for p in batch]
    return positions, len(batches), dataset


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_pad_covers_every_image_with_equal_batches_per_rank(index, world, workers):
    seen, batch_counts = [], []
    for rank in range(world):
        positions, batches, dataset = _run_rank(index, rank, world, workers, "pad")
        assert len(positions) == len(dataset) == -(-IMAGES // world)
        assert batches == dataset.batches_per_epoch(4, workers)
        seen += positions
        batch_counts.append(batches)
    assert len(set(batch_counts)) == 1  # DDP: every rank runs the same number of steps
    assert set(seen) == set(range(IMAGES))  # none missed
    repeats = len(seen) - IMAGES
    assert repeats == -(-IMAGES // world) * world - IMAGES < world  # only the padding repeats
    if world == 1:
        assert sorted(seen) == list(range(IMAGES))  # one rank: every image exactly once, whatever the workers


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_drop_and_none_balances(index, world, workers):
    dropped, counts = [], []
    for rank in range(world):
        positions, batches, _ = _run_rank(index, rank, world, workers, "drop")
        dropped += positions
        counts.append(batches)
    assert len(set(counts)) == 1
    assert len(dropped) == len(set(dropped)) == IMAGES // world * world  # none twice; fewer than world left out
    exact = []
    for rank in range(world):
        exact += _run_rank(index, rank, world, workers, "none")[0]
    assert sorted(exact) == list(range(IMAGES))  # every image exactly once


def test_rank_share_pads_even_when_ranks_outnumber_images():
    order = np.array([4, 9])
    shares = [loader.rank_share(order, rank, 3, "pad").tolist() for rank in range(3)]
    assert shares == [[4], [9], [4]]
    assert [loader.rank_share(order, rank, 3, "drop").tolist() for rank in range(3)] == [[], [], []]
    assert [loader.rank_share(order, rank, 3, "none").tolist() for rank in range(3)] == [[], [4], [9]]
    for balance in ("pad", "drop", "none"):
        assert all(
            loader.rank_count(2, r, 3, balance) == len(s)
            for r, s in enumerate(loader.rank_share(order, r, 3, balance) for r in range(3))
        )


class CountingDataset(ShardDataset):
    """Counts the bytes each reader pulls from each shard file."""

    def _open(self, path):
        handle = open(path, "rb")
        counts = self.bytes_read

        class Counting:
            def seek(self, offset):
                handle.seek(offset)

            def read(self, size):
                data = handle.read(size)
                counts[path] = counts.get(path, 0) + len(data)
                return data

            def close(self):
                handle.close()

        return Counting()


def test_readers_read_disjoint_byte_ranges(index, shard_dirs):
    total = sum(p.stat().st_size for d in shard_dirs for p in d.glob("*.tar"))
    readers = []
    for rank in range(3):
        for worker in range(2):
            dataset = CountingDataset(index, _nothing, shuffle=True, seed=1, balance="none", rank=rank, world_size=3)
            dataset.bytes_read = {}
            list(dataset.read_samples(dataset.reader_positions(rank, 3, worker, 2)))
            readers.append(dataset.bytes_read)
    all_bytes = sum(sum(r.values()) for r in readers)
    assert all_bytes < total  # once in all (the old position split read every shard 6 times: 6x total)
    shards_opened = sum(len(r) for r in readers)
    assert shards_opened <= len(index.shards) + len(readers) - 1  # only slice boundaries share a shard


def test_new_shard_order_each_epoch_reaches_persistent_workers(index):
    def order(epoch, dataset=None):
        dataset = dataset or ShardDataset(index, _nothing, shuffle=True, seed=3, shuffle_buffer=2)
        dataset.set_epoch(epoch)
        return [int(p) for _, _, b in DataLoader(dataset, batch_size=5, num_workers=2) for p in b]

    first, second = order(0), order(1)
    assert sorted(first) == sorted(second) == list(range(IMAGES))
    assert first != second and order(1) == second  # new each epoch, reproducible for a seed
    dataset = ShardDataset(index, _nothing, shuffle=True, seed=3, shuffle_buffer=2)
    persistent = loader.make_loader(dataset, 5, workers=2)
    epochs = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        epochs.append([int(p) for _, _, b in persistent for p in b])
    assert epochs == [first, second]


def test_embedding_order_is_stable_and_positions_match_ids(index):
    ordered = ShardDataset(index, _nothing)
    assert [p for _, _, p in ordered] == list(range(IMAGES))

    def mean_colour(image):
        return torch.tensor(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0))

    expected = np.array([_colour(int(i[2:])) for i in index.table["id"]])
    for workers in (0, 2):
        batches = DataLoader(ShardDataset(index, mean_colour), batch_size=6, num_workers=workers)
        colours, positions = np.zeros((IMAGES, 3)), []
        for colour, _, position in batches:
            colours[position.numpy()] = colour.numpy()
            positions += position.tolist()
        assert sorted(positions) == list(range(IMAGES))
        assert np.abs(colours - expected).max() < 6  # each row's pixels are its id's image


def test_labels_follow_the_class_mapping(index):
    labels = loader.class_mapping(index.table["landmark_id"])
    assert labels == {500: 0, 501: 1, 502: 2, 503: 3, 504: 4}
    samples = {p: label for _, label, p in ShardDataset(index, _nothing, labels={500: 0, 503: 3})}
    expected = index.table["landmark_id"].map({500: 0, 503: 3}).fillna(-1).astype(int)
    assert [samples[p] for p in range(IMAGES)] == expected.tolist()


def test_index_that_no_longer_matches_its_shard_is_an_error(shard_dirs, tmp_path):
    index = ShardIndex.from_dirs(shard_dirs)
    index.table.loc[5, "offset"] += 512
    with pytest.raises(StageError, match="index.parquet says"):
        list(ShardDataset(index, _nothing))
    index = ShardIndex.from_dirs(shard_dirs)
    index.table.loc[5, "key"] = "im999"
    with pytest.raises(StageError, match="im999.jpg"):
        list(ShardDataset(index, _nothing))
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shard_dirs[0].iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    last = sorted(copy.glob("*.tar"))[-1]
    last.write_bytes(last.read_bytes()[:600])
    with pytest.raises(StageError, match="truncated shard"):
        list(ShardDataset(ShardIndex.from_dirs([copy]), _nothing))
    last.unlink()
    with pytest.raises(StageError, match=f"lists {last.name}"):
        ShardIndex.from_dirs([copy])
    with pytest.raises(StageError, match="no index.parquet"):
        ShardIndex.from_dirs([tmp_path])


def test_random_access_matches_streaming_and_bounds_open_files(shard_dirs):
    index = ShardIndex.from_dirs(shard_dirs)
    streamed = dict(ShardDataset(index, None).read_samples(range(IMAGES)))
    mapped = loader.ShardMapDataset(index, None, labels={500: 0}, max_open_files=2)
    for position in np.random.default_rng(0).permutation(IMAGES):
        assert mapped.read(position) == streamed[position]
        assert len(mapped._files) <= 2
    image, label, position = mapped[5]
    assert image.mode == "RGB" and position == 5 and label == (0 if index.table["landmark_id"][5] == 500 else -1)
    index.table.loc[7, "offset"] += 512
    with pytest.raises(StageError, match="index.parquet says"):
        loader.ShardMapDataset(index, None)[7]


def test_invalid_dataset_arguments(index):
    with pytest.raises(StageError, match="balance"):
        ShardDataset(index, _nothing, balance="even")
    with pytest.raises(StageError, match="rank 3 of world size 3"):
        ShardDataset(index, _nothing, rank=3, world_size=3)


AUGMENT = {
    "random_resized_crop_scale": [0.5, 1.0],
    "hflip": True,
    "rotation_degrees": 10,
    "translate": 0.1,
    "color_jitter": 0.2,
}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_train_transform_augments_from_config_and_eval_does_not():
    from landmarks.train import train_transform as reexported

    assert reexported is loader.train_transform
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    train = loader.train_transform({"image_size": 32, "augment": AUGMENT}, MEAN, STD)
    names = [type(step).__name__ for step in train.transforms]
    assert names == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandomRotation",
        "RandomAffine",
        "ColorJitter",
        "ToTensor",
        "Normalize",
    ]
    shift = train.transforms[3]
    assert shift.translate == (0.1, 0.1) and shift.degrees == [0.0, 0.0]
    torch.manual_seed(0)
    a, b = train(image), train(image)
    torch.manual_seed(0)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b) and torch.equal(train(image), a)
    plain = loader.train_transform(
        {
            "image_size": 32,
            "augment": {**AUGMENT, "hflip": False, "rotation_degrees": 0, "translate": 0, "color_jitter": 0},
        },
        MEAN,
        STD,
    )
    assert [type(step).__name__ for step in plain.transforms] == ["RandomResizedCrop", "ToTensor", "Normalize"]
    evaluate = loader.eval_transform(32, MEAN, STD)
    x = evaluate(image)
    assert x.shape == (3, 32, 32) and torch.equal(x, evaluate(image))
    centre = np.asarray(image.resize((44, 32), Image.Resampling.BICUBIC), np.float32)[:, 6:38] / 255  # 70x50 -> 44x32
    assert torch.allclose(x * 0.25 + 0.5, torch.from_numpy(centre).permute(2, 0, 1), atol=0.02)
    whole = loader.eval_transform(32, MEAN, STD, whole_image=True)(image)  # embed.whole_image: nothing cut off
    everything = np.asarray(image.resize((44, 32), Image.Resampling.BICUBIC), np.float32) / 255
    assert whole.shape == (3, 32, 44)
    assert torch.allclose(whole * 0.25 + 0.5, torch.from_numpy(everything).permute(2, 0, 1), atol=0.02)


def test_loader_pins_memory_only_for_cuda(index):
    dataset = ShardDataset(index, _nothing)
    assert loader.make_loader(dataset, 4, device="cuda").pin_memory
    assert not loader.make_loader(dataset, 4, device="cpu").pin_memory
    batches = loader.make_loader(dataset, 4, workers=1, device="cpu")
    assert batches.persistent_workers and sum(len(p) for _, _, p in batches) == IMAGES

"""The train stage: samplers, exact resume after a kill or SIGTERM, DDP on CPU (gloo), the launcher rule."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from landmarks import shard, train
from landmarks.sampler import SeededDataset, TrainBatchSampler, cluster_classes

REPO = Path(__file__).resolve().parents[1]
# A tiny timm model at 32 px: these tests are about the loop, not about accuracy.
TINY = {"backbone": "test_efficientnet", "pretrained": "none", "image_size": 32, "embedding_dim": 16,
        "batch_size": 4, "workers": 0, "lr": 0.01, "warmup_epochs": 0.5, "arcface_s": 8.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 landmarks x 6 photos (5 train, 1 val), sharded at 48 px, 8 images per tar."""
    root = tmp_path_factory.mktemp("train_shards")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for landmark in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        for view in range(6):
            image = Image.new("RGB", (60 + 4 * view, 50), colour)
            x, y = rng.integers(5, 25, 2)
            ImageDraw.Draw(image).ellipse([x, y, x + 20, y + 16], fill=tuple(255 - c for c in colour))
            image_id = f"lm{landmark}v{view}"
            image.save(images / f"{image_id}.jpg")
            rows.append({"id": image_id, "landmark_id": 500 + landmark, "split": "train" if view < 5 else "val",
                         "path": f"{image_id}.jpg"})
    selection = pd.DataFrame(rows)
    selection["landmark_id"] = selection["landmark_id"].astype("Int64")
    selection.to_parquet(root / "selection.parquet")
    for split in ("train", "val"):
        assert shard.main(["--selection", str(root / "selection.parquet"), "--images", str(images), "--split", split,
                           "--out-dir", str(root / split), "--size", "48", "--images-per-shard", "8"]) == 0
    return root


def run_args(shards, out_dir, settings):
    return ["--train-shards", str(shards / "train"), "--val-shards", str(shards / "val"), "--out-dir", str(out_dir),
            "--settings", json.dumps(settings), "--device", "cpu", "--threads", "1"]


# ---------------------------------------------------------------------------------------------------
# Samplers


def test_pk_sampler_yields_p_classes_times_k_images():
    # Class sizes 9, 6, 5, 2 (fewer than K: repeated), 1 (cannot have a positive: never drawn); -1 unlabelled.
    class_of = np.array([0] * 9 + [1] * 6 + [2] * 5 + [3] * 2 + [4] + [-1] * 3)
    sampler = TrainBatchSampler(class_of, mode="pk", classes_per_batch=3, images_per_class=4, seed=5)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 23 // 12
    drawn = []
    for batch in batches:
        positions = [p for p, _ in batch]
        classes = class_of[positions]
        assert len(batch) == 12 and len(set(classes)) == 3
        assert all((classes == c).sum() == 4 for c in set(classes))
        drawn += positions
    assert 4 not in class_of[drawn] and -1 not in class_of[drawn]
    # Over many batches every usable class comes up, each class's images in rounds.
    many = TrainBatchSampler(class_of, mode="pk", classes_per_batch=3, images_per_class=4, seed=5)
    many.batches_per_epoch = 12
    many.set_epoch(1)
    counts = np.bincount(class_of[many.epoch_batches().ravel()], minlength=5)
    assert counts[4] == 0 and counts[:4].min() > 0
    with pytest.raises(Exception, match="pk_classes = 5, but only 4 classes"):
        bad = TrainBatchSampler(class_of, mode="pk", classes_per_batch=5, images_per_class=2)
        bad.set_epoch(0)
        bad.epoch_batches()


def test_batches_depend_on_seed_and_epoch_and_ranks_get_disjoint_images():
    class_of = np.repeat(np.arange(10), 5)
    def plan(rank, epoch, skip=0, seed=0):
        sampler = TrainBatchSampler(class_of, batch_size=4, seed=seed, rank=rank, world_size=2)
        sampler.set_epoch(epoch, skip=skip)
        return [batch for batch in sampler]
    rank0, rank1 = plan(0, 0), plan(1, 0)
    assert len(rank0) == len(rank1) == 50 // 8
    images0 = {p for batch in rank0 for p, _ in batch}
    images1 = {p for batch in rank1 for p, _ in batch}
    assert not images0 & images1 and len(images0) == len(images1) == 24
    assert plan(0, 0) == rank0  # deterministic, augmentation seeds included
    assert plan(0, 1) != rank0 and plan(0, 0, seed=1) != rank0
    assert plan(0, 0, skip=2) == rank0[2:]  # a resumed epoch continues with the same batches


def test_seeded_dataset_makes_augmentation_a_function_of_the_item_only():
    class RandomCrop:
        def __getitem__(self, position):
            return position, torch.rand(1).item()
        def __len__(self):
            return 10
    dataset = SeededDataset(RandomCrop())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = dataset[(3, 99)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    torch.rand(5)
    assert dataset[(3, 99)] == first and dataset[(3, 98)] != first


def test_subspace_clusters_group_similar_classes():
    rng = np.random.default_rng(0)
    directions = np.eye(8)[:3]
    means = np.concatenate([directions[g] + rng.normal(0, 0.05, (6, 8)) for g in range(3)])  # 3 groups of 6
    means = np.concatenate([means, directions[2:3] * -1])  # a lone class, far from everything
    clusters = cluster_classes(means, np.ones(len(means), bool), n_clusters=4, min_classes=3, seed=0)
    groups = [set(clusters[g * 6:(g + 1) * 6]) for g in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    assert clusters[-1] in set.union(*groups)  # merged into a cluster big enough for a batch
    sampler = TrainBatchSampler(np.repeat(np.arange(19), 3), mode="subspace", classes_per_batch=3,
                                images_per_class=2, seed=1)
    sampler.set_epoch(0, clusters=clusters)
    for batch in sampler:
        classes = {p // 3 for p, _ in batch}
        assert len(classes) == 3 and len({clusters[c] for c in classes}) == 1


def test_learning_rate_warms_up_then_decays_to_min_lr():
    factors = [train.warmup_cosine(step, total_steps=100, warmup_steps=10, final=0.01) for step in range(101)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.505)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.01)  # seed 002: 1e-3 -> 1e-5
    assert train.warmup_cosine(100, total_steps=100, warmup_steps=0) == pytest.approx(0.0)


def test_slurm_and_torchrun_process_layout():
    assert train.process_layout({}) == (0, 1, 0)
    assert train.process_layout({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == (2, 4, 0)
    srun = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert train.process_layout(srun) == (5, 8, 1)
    # Inside the batch script (no srun step) SLURM_NTASKS describes the allocation: still one process.
    assert train.process_layout({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == (0, 1, 0)
    assert train.first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert train.first_host("node3,node4") == "node3"


# ---------------------------------------------------------------------------------------------------
# Training runs

KILLER = textwrap.dedent("""
    # Runs the train stage and SIGKILLs it while it writes its N-th mid-epoch checkpoint: after the
    # temporary file is complete, before it is renamed into place.
    import os, signal, sys, torch
    from landmarks import train
    at, real_save, seen = int(sys.argv[1]), torch.save, []
    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if os.path.basename(str(path)).startswith(".last.ckpt.") and obj.get("step"):
            seen.append(obj["step"])
            if len(seen) == at:
                os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save
    sys.exit(train.main(sys.argv[2:]))
""")


def killed_run(shards, out_dir, settings, at):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", KILLER, str(at), *run_args(shards, out_dir, settings)],
                          env=env, capture_output=True, text=True, timeout=300)


def sigterm_at_checkpoint(monkeypatch, at):
    """SIGTERM to this process during its `at`-th mid-epoch checkpoint, as SLURM sends on preemption."""
    real_save, seen = torch.save, []

    def save(obj, path, *args, **kwargs):
        if Path(path).name.startswith(".last.ckpt.") and obj.get("step"):
            seen.append(obj["step"])
            if len(seen) == at:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_killed_and_resumed_training_ends_with_the_same_weights(shards, tmp_path, monkeypatch):
    # 30 train images, batches of 4, accumulation 2: 6 batches = 3 optimizer steps per epoch; a
    # checkpoint after every step (the end-of-epoch one comes after the validation pass).
    settings = {**TINY, "epochs": 2, "grad_accumulation": 2, "checkpoint_every_steps": 1}
    assert train.main(run_args(shards, tmp_path / "straight", settings)) == 0

    resumed = tmp_path / "resumed"
    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        sigterm_at_checkpoint(patch, 1)  # SIGTERM during step 1's checkpoint
        assert train.main(run_args(shards, resumed, settings)) == train.EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) == handler  # the stage put the previous handler back
    state = checkpoint(resumed / "last.ckpt")
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 4, 2)  # stopped after the next step
    assert not (resumed / "model.pt").exists()

    second = killed_run(shards, resumed, settings, 2)  # resumes, then SIGKILL mid-write
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert "resuming from" in second.stderr
    assert list(resumed.glob(".last.ckpt.*"))  # the half-done write stayed a temporary file ...
    state = checkpoint(resumed / "last.ckpt")  # ... and last.ckpt is the checkpoint before it
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 2, 4)

    assert train.main(run_args(shards, resumed, settings)) == 0
    assert not list(resumed.glob(".last.ckpt.*"))
    summary = json.loads((resumed / "train.json").read_text())
    assert summary["resumed_from"] == {"epoch": 1, "step": 2} and summary["global_steps"] == 6

    straight_state, resumed_state = checkpoint(tmp_path / "straight" / "last.ckpt"), checkpoint(resumed / "last.ckpt")
    for part in ("model", "head"):
        for key, value in straight_state[part].items():
            assert torch.allclose(resumed_state[part][key].float(), value.float(), atol=1e-6), key
    best_straight, best_resumed = checkpoint(tmp_path / "straight" / "model.pt"), checkpoint(resumed / "model.pt")
    assert best_straight["epoch"] == best_resumed["epoch"]
    for key, value in best_straight["model"].items():
        assert torch.allclose(best_resumed["model"][key].float(), value.float(), atol=1e-6), key
    straight_metrics, resumed_metrics = (pd.read_csv(d / "metrics.csv") for d in (tmp_path / "straight", resumed))
    assert np.allclose(straight_metrics["train_loss"], resumed_metrics["train_loss"], rtol=1e-5)
    assert straight_metrics["val_gap"].tolist() == resumed_metrics["val_gap"].tolist()

    # Other settings never resume a stale run: the same folder trains afresh.
    assert train.main(run_args(shards, resumed, {**settings, "epochs": 1})) == 0
    summary = json.loads((resumed / "train.json").read_text())
    assert summary["resumed_from"] is None and summary["global_steps"] == 3


def test_triplet_loss_on_subspace_batches_and_an_untrained_baseline(shards, tmp_path):
    settings = {**TINY, "epochs": 2, "loss": "triplet", "sampler": "subspace", "pk_classes": 2, "pk_images": 2,
                "subspaces": 2, "subspace_images_per_class": 2, "optimizer": "sgd", "lr": 0.05}
    metrics = train.train([shards / "train"], [shards / "val"], tmp_path / "triplet", settings_for(settings),
                          device=torch.device("cpu"))
    assert [row["epoch"] for row in metrics] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) and np.isnan(row["train_accuracy"]) for row in metrics)
    clusters = checkpoint(tmp_path / "triplet" / "last.ckpt")["clusters"]  # saved for an exact resume
    assert clusters.shape == (6,) and (clusters >= 0).all()
    baseline = train.train([shards / "train"], [shards / "val"], tmp_path / "baseline", settings_for({**TINY, "epochs": 0}),
                           device=torch.device("cpu"))
    assert [row["epoch"] for row in baseline] == [0] and 0 <= baseline[0]["val_gap"] <= 1
    assert checkpoint(tmp_path / "baseline" / "model.pt")["epoch"] == 0


def settings_for(values):
    from landmarks.config import section_settings
    return section_settings("train", values)


def test_ddp_with_two_gloo_processes_via_torchrun(shards, tmp_path):
    settings = {**TINY, "epochs": 1, "loss": "softmax"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "landmarks.train", *run_args(shards, tmp_path, settings)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp"]["backend"] == "gloo"
    # 30 images, 4 per batch and process: 3 batches each, no image on both processes, identical weights.
    assert summary["ddp"]["last_epoch_images_per_rank"] == [12, 12]
    assert summary["ddp"]["last_epoch_images_on_several_ranks"] == 0
    assert summary["ddp"]["max_weight_difference_between_ranks"] == 0.0
    assert summary["steps_per_epoch"] == 3
    assert checkpoint(tmp_path / "model.pt")["epoch"] == 1


def test_the_rule_picks_the_launcher_from_gpus_and_nodes(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"experiments": {
        "cpu": {}, "one_gpu": {"train": {"gpus": 1}}, "four_gpus": {"train": {"gpus": 4}},
        "two_nodes": {"train": {"gpus": 4, "nodes": 2}}}}))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--snakefile", str(REPO / "Snakefile"),
                             "--directory", str(tmp_path), "--configfile", str(config), "--cores", "16"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    commands = {}
    for line in result.stdout.splitlines():
        if "landmarks.train" in line:
            experiment = line.split("--out-dir results/experiments/")[1].split("/")[0]
            commands[experiment] = line.split(" --train-shards")[0].removeprefix("Shell command: ")
    assert commands == {
        "cpu": "python -m landmarks.train",
        "one_gpu": "python -m landmarks.train",
        "four_gpus": "torchrun --standalone --nproc_per_node=4 -m landmarks.train",
        "two_nodes": "srun --nodes=2 --ntasks-per-node=4 --kill-on-bad-exit=1 python -m landmarks.train",
    }
    assert "nodes=2, gpu=8, tasks=8, tasks_per_gpu=0" in result.stdout

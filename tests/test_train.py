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
from conftest import write_image_set, write_shards
from PIL import Image, ImageDraw
from snakemake_helpers import dry_run

from landmarks import distributed, finetune, train, validation
from landmarks.common import StageError
from landmarks.loader import ShardIndex
from landmarks.sampler import SeededDataset, TrainBatchSampler, cluster_classes

REPO = Path(__file__).resolve().parents[1]
# A tiny timm model at 32 px: these tests are about the loop, not about accuracy. A plain recipe (a
# linear neck, one pass over the data per epoch, no WiSE-FT, BatchNorm statistics updated, no learned
# whitening) so that
# each test turns on the option it is about.
TINY = {
    "backbone": "test_efficientnet",
    "pretrained": "none",
    "image_size": 32,
    "embedding_dim": 16,
    "batch_size": 4,
    "workers": 0,
    "lr": 0.01,
    "warmup_epochs": 0.5,
    "arcface_s": 8.0,
    "neck": "linear",
    "head_init": "random",
    "freeze_bn": False,
    "wise_alpha": 1.0,
    "min_steps_per_epoch": 1,
    "whitening": "none",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 landmarks x 6 photos (5 train, 1 val) and 4 non-landmark photos, sharded at 48 px, 8 images per tar."""
    root = tmp_path_factory.mktemp("train_shards")
    rng = np.random.default_rng(1)
    photos = []
    for landmark in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        for view in range(6):
            image = Image.new("RGB", (60 + 4 * view, 50), colour)
            x, y = rng.integers(5, 25, 2)
            ImageDraw.Draw(image).ellipse([x, y, x + 20, y + 16], fill=tuple(255 - c for c in colour))
            photos.append((f"lm{landmark}v{view}", image, 500 + landmark, "train" if view < 5 else "val"))
    for number in range(4):  # the non-landmark bank: plain noise
        noise = Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))
        photos.append((f"nl{number}", noise, None, "nonlandmark"))
    write_image_set(root, photos)
    write_shards(
        root / "selection.parquet", root / "images", root, ("train", "val", "nonlandmark"), size=48, images_per_shard=8
    )
    return root


def run_args(shards, out_dir, settings):
    return [
        "--train-shards",
        str(shards / "train"),
        "--val-shards",
        str(shards / "val"),
        "--out-dir",
        str(out_dir),
        "--settings",
        json.dumps(settings),
        "--device",
        "cpu",
        "--threads",
        "1",
    ]


# ---------------------------------------------------------------------------------------------------
# Samplers


def test_pk_sampler_yields_p_classes_times_k_images():
    # Class sizes 9, 6, 5, 2 (fewer than K: repeated), 1 (a triplet has no positive: never drawn); -1 unlabelled.
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


def test_pk_sampler_for_a_classifier_loss_trains_landmarks_of_one_photo():
    # ArcFace learns a landmark of one photo from its augmentations: class-balanced batches keep it.
    class_of = np.array([0] * 9 + [1] * 6 + [2] + [3] + [4])
    sampler = TrainBatchSampler(
        class_of, mode="pk", classes_per_batch=3, images_per_class=4, seed=5, min_class_images=1
    )
    sampler.batches_per_epoch = 10
    sampler.set_epoch(0)
    batches = sampler.epoch_batches()
    counts = np.bincount(class_of[batches.ravel()], minlength=5)
    assert counts.min() > 0 and counts[2:].tolist() == [counts[2]] * 3  # every class, the singletons alike
    for batch in batches:
        for single in (18, 19, 20):  # a one-photo class fills its K places with that photo
            assert (batch == single).sum() in (0, 4)
    with pytest.raises(Exception, match="pk_classes = 6, but only 5 classes have the 1 or more"):
        bad = TrainBatchSampler(class_of, mode="pk", classes_per_batch=6, images_per_class=2, min_class_images=1)
        bad.set_epoch(0)
        bad.epoch_batches()


def test_a_small_train_set_is_drawn_several_times_per_epoch():
    # 10 images in batches of 4: two batches per pass; min_batches 5 draws three passes, each in its own order.
    class_of = np.repeat(np.arange(5), 2)
    sampler = TrainBatchSampler(class_of, batch_size=4, seed=1, min_batches=5)
    sampler.set_epoch(0)
    batches = [[p for p, _ in batch] for batch in sampler]
    assert len(batches) == len(sampler) == 5 and all(len(batch) == 4 for batch in batches)
    first_pass, second_pass = batches[0] + batches[1], batches[2] + batches[3]
    assert len(set(first_pass)) == len(set(second_pass)) == 8  # no image twice within a pass
    assert first_pass != second_pass
    assert len(TrainBatchSampler(class_of, batch_size=4, min_batches=1)) == 2


def test_batches_depend_on_seed_and_epoch_and_ranks_get_disjoint_images():
    class_of = np.repeat(np.arange(10), 5)

    def plan(rank, epoch, skip=0, seed=0):
        sampler = TrainBatchSampler(class_of, batch_size=4, seed=seed, rank=rank, world_size=2)
        sampler.set_epoch(epoch, skip=skip)
        return list(sampler)

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
    groups = [set(clusters[g * 6 : (g + 1) * 6]) for g in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    assert clusters[-1] in set.union(*groups)  # merged into a cluster big enough for a batch
    sampler = TrainBatchSampler(
        np.repeat(np.arange(19), 3), mode="subspace", classes_per_batch=3, images_per_class=2, seed=1
    )
    sampler.set_epoch(0, clusters=clusters)
    for batch in sampler:
        classes = {p // 3 for p, _ in batch}
        assert len(classes) == 3 and len({clusters[c] for c in classes}) == 1


def test_learning_rate_warms_up_then_decays_to_min_lr():
    factors = [finetune.warmup_cosine(step, total_steps=100, warmup_steps=10, final=0.01) for step in range(101)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.505)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.01)  # seed 002: 1e-3 -> 1e-5
    assert finetune.warmup_cosine(100, total_steps=100, warmup_steps=0) == pytest.approx(0.0)


def test_slurm_and_torchrun_process_layout():
    assert distributed.process_layout({}) == (0, 1, 0)
    assert distributed.process_layout({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == (2, 4, 0)
    srun = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert distributed.process_layout(srun) == (5, 8, 1)
    # Inside the batch script (no srun step) SLURM_NTASKS describes the allocation: still one process.
    assert distributed.process_layout({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == (0, 1, 0)
    assert distributed.first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert distributed.first_host("node3,node4") == "node3"


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
    return subprocess.run(
        [sys.executable, "-c", KILLER, str(at), *run_args(shards, out_dir, settings)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


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
    assert np.allclose(straight_metrics["train_loss"], resumed_metrics["train_loss"], rtol=1e-5, equal_nan=True)
    assert straight_metrics["val_gap"].tolist() == resumed_metrics["val_gap"].tolist()  # epoch 0 included

    # Other settings never resume a stale run: the same folder trains afresh.
    assert train.main(run_args(shards, resumed, {**settings, "epochs": 1})) == 0
    summary = json.loads((resumed / "train.json").read_text())
    assert summary["resumed_from"] is None and summary["global_steps"] == 3


def test_triplet_loss_on_subspace_batches_and_an_untrained_baseline(shards, tmp_path):
    settings = {
        **TINY,
        "epochs": 2,
        "loss": "triplet",
        "sampler": "subspace",
        "pk_classes": 2,
        "pk_images": 2,
        "subspaces": 2,
        "subspace_images_per_class": 2,
        "optimizer": "sgd",
        "lr": 0.05,
    }
    metrics = train.train(
        [shards / "train"], [shards / "val"], tmp_path / "triplet", settings_for(settings), device=torch.device("cpu")
    )
    assert [row["epoch"] for row in metrics] == [0, 1, 2]  # epoch 0: the untrained model
    assert all(np.isfinite(row["train_loss"]) and np.isnan(row["train_accuracy"]) for row in metrics[1:])
    clusters = checkpoint(tmp_path / "triplet" / "last.ckpt")["clusters"]  # saved for an exact resume
    assert clusters.shape == (6,) and (clusters >= 0).all()
    baseline = train.train(
        [shards / "train"],
        [shards / "val"],
        tmp_path / "baseline",
        settings_for({**TINY, "epochs": 0}),
        device=torch.device("cpu"),
    )
    assert [row["epoch"] for row in baseline] == [0] and 0 <= baseline[0]["val_gap"] <= 1
    assert checkpoint(tmp_path / "baseline" / "model.pt")["epoch"] == 0


def settings_for(values):
    from landmarks.config import section_settings

    return section_settings("train", values)


def test_ddp_with_two_gloo_processes_via_torchrun(shards, tmp_path):
    settings = {**TINY, "epochs": 1, "loss": "softmax"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "landmarks.train",
            *run_args(shards, tmp_path, settings),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    config.write_text(
        yaml.safe_dump(
            {
                "experiments": {
                    "cpu": {},
                    "one_gpu": {"train": {"gpus": 1}},
                    "four_gpus": {"train": {"gpus": 4}},
                    "two_nodes": {"train": {"gpus": 4, "nodes": 2}},
                }
            }
        )
    )
    dry = dry_run(tmp_path, "-p", configfiles=[config], cores=16)
    commands = {}
    for line in (job["shell"] for job in dry.jobs if job["shell"] and "landmarks.train" in job["shell"]):
        experiment = line.split("--out-dir results/experiments/")[1].split("/")[0]
        commands[experiment] = line.split(" --train-shards")[0]
    assert commands == {
        "cpu": "python -m landmarks.train",
        "one_gpu": "python -m landmarks.train",
        "four_gpus": "torchrun --standalone --nproc_per_node=4 -m landmarks.train",
        "two_nodes": "srun --nodes=2 --ntasks-per-node=4 --kill-on-bad-exit=1 python -m landmarks.train",
    }
    assert "nodes=2, gpu=8, tasks=8, tasks_per_gpu=0" in dry.stdout


# ---------------------------------------------------------------------------------------------------
# Fine-tuning on little data: never worse than the start, frozen parts, layer-wise learning rates


def fake_val_gaps(monkeypatch, gaps, right=None):
    """evaluate_val_gap returns these val GAPs in turn (epoch 0 first), with these numbers of val photos
    answered right when given."""
    calls = iter(zip(gaps, right or [None] * len(gaps)))

    def evaluate(*args, **kwargs):
        gap, val_right = next(calls)
        return {"val_gap": gap, "val_accuracy": 1.0, **({} if val_right is None else {"val_right": val_right})}

    monkeypatch.setattr(train, "evaluate_val_gap", evaluate)


def model_weights(path):
    return checkpoint(path)["model"]


def test_the_untrained_model_is_epoch_0_and_kept_when_no_epoch_beats_it(shards, tmp_path, monkeypatch):
    """With no margin (`untrained_val_margin: 0`): the issue's bare rule, but for ties, which go to the later epoch."""
    settings = settings_for({**TINY, "epochs": 2, "untrained_val_margin": 0})
    untrained = tmp_path / "untrained"
    train.train(
        [shards / "train"], [shards / "val"], untrained, settings_for({**TINY, "epochs": 0}), device=torch.device("cpu")
    )
    assert json.loads((untrained / "train.json").read_text())["selected"] == "pretrained (epochs: 0)"

    fake_val_gaps(monkeypatch, [0.8, 0.7, 0.75])  # every epoch is worse than the start on val
    metrics = train.train(
        [shards / "train"], [shards / "val"], tmp_path / "worse", settings, device=torch.device("cpu")
    )
    assert [row["epoch"] for row in metrics] == [0, 1, 2]
    summary = json.loads((tmp_path / "worse" / "train.json").read_text())
    assert (summary["selected"], summary["best_epoch"], summary["untrained_val_gap"]) == ("pretrained", 0, 0.8)
    kept, start = model_weights(tmp_path / "worse" / "model.pt"), model_weights(untrained / "model.pt")
    assert all(torch.equal(kept[key], value) for key, value in start.items())  # exactly the untrained model

    fake_val_gaps(monkeypatch, [0.8, 0.9, 0.85])
    train.train([shards / "train"], [shards / "val"], tmp_path / "better", settings, device=torch.device("cpu"))
    summary = json.loads((tmp_path / "better" / "train.json").read_text())
    assert (summary["selected"], summary["best_val_gap"]) == ("epoch 1", 0.9)

    fake_val_gaps(monkeypatch, [1.0, 1.0, 1.0])  # a saturated val: ties go to the more trained model
    train.train([shards / "train"], [shards / "val"], tmp_path / "tied", settings, device=torch.device("cpu"))
    assert json.loads((tmp_path / "tied" / "train.json").read_text())["selected"] == "epoch 2"


@pytest.mark.parametrize(("right", "selected"), [([10, 8, 9], "epoch 2"), ([10, 9, 8], "pretrained")])
def test_by_default_the_untrained_model_is_kept_only_when_clearly_ahead(shards, tmp_path, monkeypatch, right, selected):
    """The default margin (2): val's choice of the untrained model stands only when it answers 2+ more val
    photos right than the best trained epoch by val GAP (epoch 2 here: 0.75, ahead of epoch 1)."""
    fake_val_gaps(monkeypatch, [0.8, 0.7, 0.75], right)
    settings = settings_for({**TINY, "epochs": 2})
    assert settings["untrained_val_margin"] == 2
    train.train([shards / "train"], [shards / "val"], tmp_path / "run", settings, device=torch.device("cpu"))
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert (summary["selected"], summary["untrained_val_right"]) == (selected, 10)
    assert summary["best_val_right"] == (9 if selected == "epoch 2" else 10)  # epoch 2 / untrained
    assert checkpoint(tmp_path / "run" / "model.pt")["epoch"] == (2 if selected == "epoch 2" else 0)


def test_a_resumed_run_remembers_the_best_trained_epoch_for_the_margin(shards, tmp_path, monkeypatch):
    """untrained_val_margin 2, the untrained model one val photo ahead: the best trained epoch (1) is kept,
    also when the run is preempted in epoch 2 and resumed (it must not forget epoch 1 was the best)."""
    settings = {**TINY, "epochs": 2, "checkpoint_every_steps": 1, "untrained_val_margin": 2}
    fake_val_gaps(monkeypatch, [0.8, 0.75, 0.7], [10, 9, 9])
    assert train.main(run_args(shards, tmp_path / "straight", settings)) == 0

    resumed, real_save = tmp_path / "resumed", torch.save

    def sigterm_in_epoch_2(obj, path, *args, **kwargs):
        if Path(path).name.startswith(".last.ckpt.") and obj.get("epoch") == 1 and obj.get("step"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", sigterm_in_epoch_2)
        fake_val_gaps(patch, [0.8, 0.75], [10, 9])
        assert train.main(run_args(shards, resumed, settings)) == train.EXIT_INTERRUPTED
    fake_val_gaps(monkeypatch, [0.7], [9])
    assert train.main(run_args(shards, resumed, settings)) == 0

    for run in (tmp_path / "straight", resumed):
        assert json.loads((run / "train.json").read_text())["selected"] == "epoch 1"
    straight, again = checkpoint(tmp_path / "straight" / "model.pt"), checkpoint(resumed / "model.pt")
    assert straight["epoch"] == again["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.allclose(again["model"][key].float(), value.float(), atol=1e-6), key


def test_wise_ft_interpolates_the_selected_weights_with_the_starting_ones(shards, tmp_path):
    untrained = tmp_path / "untrained"
    train.train(
        [shards / "train"],
        [shards / "val"],
        untrained,
        settings_for({**TINY, "epochs": 0, "neck": "none"}),
        device=torch.device("cpu"),
    )
    start = model_weights(untrained / "model.pt")
    settings = settings_for({**TINY, "epochs": 1, "wise_alpha": 0.25, "neck": "none", "val_nonlandmark_ratio": 0})
    train.train([shards / "train"], [], tmp_path / "wise", settings, device=torch.device("cpu"))  # no val: last epoch
    last = checkpoint(tmp_path / "wise" / "last.ckpt")
    assert all(torch.equal(last["start_weights"][key], value) for key, value in start.items())  # for a resume
    selected = checkpoint(tmp_path / "wise" / "model.pt")
    assert selected["epoch"] == 1
    for key, trained in last["model"].items():  # last.ckpt: the trained weights, which training continues from
        if trained.is_floating_point():
            expected = start[key] + 0.25 * (trained - start[key])
            assert torch.allclose(selected["model"][key], expected, atol=1e-6), key
    assert not torch.equal(selected["model"]["backbone.conv_stem.weight"], start["backbone.conv_stem.weight"])


def embeddings_without_whitening(model_path, shard_dirs, settings):
    """The model.pt's embeddings of these shards before its whitening, with their landmark ids."""
    from landmarks.model import model_from_checkpoint

    model, _ = model_from_checkpoint(model_path)
    for name in ("whiten_mean", "whiten_matrix"):
        delattr(model, name)
    index = ShardIndex.from_dirs(shard_dirs)
    plain = validation.embed_for_training(model.eval(), index, settings, torch.device("cpu"), distributed.Distributed())
    return plain, index.table["landmark_id"].to_numpy(dtype=np.int64)


def test_the_learned_whitening_is_fitted_on_the_selected_weights_and_judged_by_val(shards, tmp_path):
    """val judges each candidate whitened by its train photos alone; model.pt carries the whitening fitted
    again on the train and val landmark photos (`whitening_from: train+val`, the val's non-landmark
    queries left out) or on train alone; train.json and metrics.csv say which, and give the GAP before it."""
    from landmarks.model import whitenings_from_checkpoint
    from landmarks.whitening import fit_whitening

    runs = {}
    for source in ("train", "train+val"):
        settings = settings_for({**TINY, "epochs": 1, "whitening": "learned", "whitening_from": source})
        out = tmp_path / source
        runs[source] = train.train(
            [shards / "train"],
            [shards / "val"],
            out,
            settings,
            device=torch.device("cpu"),
            bank_dirs=[shards / "nonlandmark"],
        )
        summary = json.loads((out / "train.json").read_text())
        best = runs[source][summary["best_epoch"]]
        assert all("val_gap_unwhitened" in row and 0 < row["whitening_shrinkage"] <= 1 for row in runs[source])
        assert summary["whitening"] == {
            "fitted_on": source,
            "images": {"train": 30, "train+val": 36}[source],
            "shrinkage": best["whitening_shrinkage"],
            "val_gap_unwhitened": best["val_gap_unwhitened"],
            "threshold_folds": {"train": 0, "train+val": 2}[source],
        }
        dirs = [shards / "train"] + ([shards / "val"] if source == "train+val" else [])
        refitted = fit_whitening(*embeddings_without_whitening(out / "model.pt", dirs, settings))
        assert np.allclose(
            checkpoint(out / "model.pt")["model"]["whiten_matrix"].numpy(), refitted["matrix"], atol=1e-3
        )
    # For retrieve's threshold, each half of val's landmarks has the whitening of the train photos and the
    # other half's val photos: every val photo is answered by a whitening it did not shape.
    train_x, train_labels = embeddings_without_whitening(out / "model.pt", [shards / "train"], settings)
    val_x, val_labels = embeddings_without_whitening(out / "model.pt", [shards / "val"], settings)
    _, folds = whitenings_from_checkpoint(out / "model.pt")
    assert sorted(np.concatenate([fold["val_landmarks"] for fold in folds])) == sorted(set(val_labels))
    for fold in folds:
        kept = ~np.isin(val_labels, fold["val_landmarks"])
        expected = fit_whitening(
            np.concatenate([train_x, val_x[kept]]), np.concatenate([train_labels, val_labels[kept]])
        )
        assert np.allclose(fold["whitening"]["matrix"], expected["matrix"], atol=1e-3)
    # The same weights judged the same way: what model.pt carries does not leak val into val GAP.
    assert [row["val_gap"] for row in runs["train"]] == [row["val_gap"] for row in runs["train+val"]]


def test_one_train_photo_per_landmark_is_whitened_with_the_val_photos(shards, tmp_path):
    """With one train photo per landmark only the val photos give within-landmark differences."""
    one_shot = tmp_path / "one_shot"  # train: view 5 of each landmark; val: another photo of each
    write_image_set(
        one_shot / "set",
        [(f"lm{k}v0", Image.new("RGB", (60, 50), (40 * k, 200 - 30 * k, 90)), 500 + k, "val") for k in range(6)],
    )
    write_shards(one_shot / "set" / "selection.parquet", one_shot / "set" / "images", one_shot, ("val",), size=48)
    for source, learned in (("train", False), ("train+val", True)):
        settings = settings_for({**TINY, "epochs": 0, "whitening": "learned", "whitening_from": source})
        out = tmp_path / source
        train.train([shards / "val"], [one_shot / "val"], out, settings, device=torch.device("cpu"))
        assert ("whiten_matrix" in checkpoint(out / "model.pt")["model"]) is learned
        whitening = json.loads((out / "train.json").read_text())["whitening"]
        assert whitening["images"] == 12 if learned else whitening.startswith("not learned")


def test_class_balanced_batches_train_an_arcface_model_on_one_photo_per_landmark(shards, tmp_path):
    """One-shot data (the val shards: one photo of each landmark): ArcFace trains on P x K batches,
    a triplet loss, which needs two photos of a landmark, says so."""
    pk = {**TINY, "epochs": 1, "sampler": "pk", "pk_classes": 3, "pk_images": 2}
    out = tmp_path / "arcface"
    train.train([shards / "val"], [shards / "val"], out, settings_for(pk), device=torch.device("cpu"))
    assert (out / "model.pt").exists()
    with pytest.raises(Exception, match="only 0 classes have the 2 or more training images"):
        triplet = settings_for({**pk, "loss": "triplet"})
        train.train([shards / "val"], [shards / "val"], tmp_path / "triplet", triplet, device=torch.device("cpu"))


def test_val_queries_include_a_sample_of_the_nonlandmark_bank(shards, tmp_path):
    val, bank = ShardIndex.from_dirs([shards / "val"]), ShardIndex.from_dirs([shards / "nonlandmark"])
    queries = validation.val_queries(val, bank, settings_for({**TINY, "val_nonlandmark_ratio": 0.5}))
    assert len(queries) == 6 + 3 and queries.table["landmark_id"].isna().sum() == 3
    assert set(queries.table["id"][6:]) < set(bank.table["id"])
    assert len(validation.val_queries(val, bank, settings_for({**TINY, "val_nonlandmark_ratio": 0}))) == 6
    assert len(validation.val_queries(val, bank, settings_for({**TINY, "val_nonlandmark_ratio": 5}))) == 6 + 4
    # Through the entry point: non-landmark queries count in val GAP (no prediction on them is correct).
    assert (
        train.main(
            run_args(shards, tmp_path / "run", {**TINY, "epochs": 0})
            + ["--nonlandmark-shards", str(shards / "nonlandmark")]
        )
        == 0
    )
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["val_images"] == 6 + 4


def test_frozen_backbone_epochs_and_frozen_batchnorm_statistics(shards, tmp_path):
    train.train(
        [shards / "train"],
        [shards / "val"],
        tmp_path / "start",
        settings_for({**TINY, "epochs": 0}),
        device=torch.device("cpu"),
    )
    start = model_weights(tmp_path / "start" / "model.pt")
    backbone = [key for key in start if key.startswith("backbone.")]
    bn_stats = [key for key in backbone if key.endswith(("running_mean", "running_var"))]
    neck = [key for key in start if key.startswith("neck.")]

    frozen = {**TINY, "epochs": 1, "freeze_backbone_epochs": 1}
    train.train(
        [shards / "train"], [shards / "val"], tmp_path / "frozen", settings_for(frozen), device=torch.device("cpu")
    )
    after = checkpoint(tmp_path / "frozen" / "last.ckpt")["model"]
    assert all(torch.equal(after[key], start[key]) for key in backbone)  # weights and BatchNorm statistics
    assert not all(torch.equal(after[key], start[key]) for key in neck)  # the head warmed up

    train.train(
        [shards / "train"],
        [shards / "val"],
        tmp_path / "bn",
        settings_for({**TINY, "epochs": 1, "freeze_bn": True}),
        device=torch.device("cpu"),
    )
    after = checkpoint(tmp_path / "bn" / "last.ckpt")["model"]
    assert all(torch.equal(after[key], start[key]) for key in bn_stats)
    assert not all(torch.equal(after[key], start[key]) for key in backbone if key not in bn_stats)

    train.train(
        [shards / "train"],
        [shards / "val"],
        tmp_path / "free",
        settings_for({**TINY, "epochs": 1}),
        device=torch.device("cpu"),
    )
    after = checkpoint(tmp_path / "free" / "last.ckpt")["model"]
    assert not all(torch.equal(after[key], start[key]) for key in bn_stats)  # freeze_bn false updates them


def test_layer_decay_gives_lower_blocks_lower_learning_rates():
    from landmarks.losses import build_head
    from landmarks.model import LandmarkModel

    settings = settings_for({**TINY, "layer_decay": 0.5, "lr": 0.1, "head_lr_multiplier": 10})
    model = LandmarkModel("test_efficientnet", "none", 16)
    head = build_head(settings, 3, torch.ones(3), model.embedding_dim)
    groups = finetune.parameter_groups(model, head, settings)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    stem, last_block = model.backbone.conv_stem.weight, model.backbone.conv_head.weight
    assert lr_of[id(last_block)] == pytest.approx(0.1)
    assert lr_of[id(stem)] < lr_of[id(model.backbone.blocks[-2][0].conv_pw.weight)] < lr_of[id(last_block)]
    assert lr_of[id(model.neck.weight)] == pytest.approx(1.0) and lr_of[id(head.weight)] == pytest.approx(1.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) + len(list(head.parameters()))
    flat = finetune.parameter_groups(model, head, settings_for({**TINY, "lr": 0.1}))
    assert {g["lr"] for g in flat} == {0.1, 0.1 * TINY.get("head_lr_multiplier", 10.0)}


def test_l2sp_moves_trainable_backbone_weights_back_towards_their_start_at_their_groups_lr():
    from landmarks.losses import build_head
    from landmarks.model import LandmarkModel

    settings = settings_for({**TINY, "layer_decay": 0.5, "lr": 0.1})
    model = LandmarkModel("test_efficientnet", "none", 16)
    head = build_head(settings, 3, torch.ones(3), model.embedding_dim)
    optimizer = finetune.build_optimizer(finetune.parameter_groups(model, head, settings), settings)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in [*model.parameters(), *head.parameters()]:
            param.add_(1.0)  # every weight 1 away from its start
    model.backbone.conv_stem.weight.requires_grad_(False)  # a frozen weight stays where it is

    finetune.pull_towards_start(model, start, optimizer, strength=2.0)

    last_block = model.backbone.conv_head.weight  # the backbone's last block: lr 0.1, so 0.2 of the way back
    assert torch.allclose(last_block, start["backbone.conv_head.weight"] + 0.8)
    lower = model.backbone.blocks[-2][0].conv_pw.weight  # a lower block: a lower lr (layer decay), pulled less
    lower_start = start[next(f"backbone.{n}" for n, p in model.backbone.named_parameters() if p is lower)]
    assert (lower - lower_start).min() > 0.8
    assert torch.equal(model.backbone.conv_stem.weight, start["backbone.conv_stem.weight"] + 1.0)
    assert torch.equal(model.neck.weight, start["neck.weight"] + 1.0)  # the new layers are not pulled


def test_l2sp_training_ends_nearer_the_pretrained_weights_and_keeps_them_for_a_resume(shards, tmp_path):
    cpu = torch.device("cpu")
    train.train([shards / "train"], [], tmp_path / "untrained", settings_for({**TINY, "epochs": 0}), device=cpu)
    start = model_weights(tmp_path / "untrained" / "model.pt")
    distance = {}
    for strength in (0.0, 50.0):
        out = tmp_path / f"l2sp_{strength}"
        settings = settings_for({**TINY, "epochs": 2, "l2sp": strength, "val_nonlandmark_ratio": 0})
        train.train([shards / "train"], [], out, settings, device=cpu)
        last = checkpoint(out / "last.ckpt")
        if strength:  # what a resumed run pulls towards
            assert all(torch.equal(last["start_weights"][key], value) for key, value in start.items())
        else:
            assert last["start_weights"] is None  # off, and no WiSE-FT in TINY: nothing kept
        trained = last["model"]
        backbone = [k for k in trained if k.startswith("backbone.") and "running" not in k and "num_batches" not in k]
        distance[strength] = sum(((trained[k] - start[k]) ** 2).sum() for k in backbone).sqrt()
    assert 0 < distance[50.0] < 0.5 * distance[0.0]


def test_neck_and_head_start_from_the_pretrained_descriptors(shards, tmp_path):
    settings = {**TINY, "epochs": 0, "neck_init": "pca", "head_init": "class_means", "pca_shrinkage": 0.5}
    settings.update(loss="subcenter_arcface", subcenters=2)
    train.train(
        [shards / "train"], [shards / "val"], tmp_path / "init", settings_for(settings), device=torch.device("cpu")
    )
    summary = json.loads((tmp_path / "init" / "train.json").read_text())
    assert summary["initialised"]["images"] == 30 and summary["initialised"]["head_classes_initialised"] == 6
    assert summary["initialised"]["head_subcenters_spread"] == 6  # every landmark's 2 sub-centers at 2 views
    assert summary["initialised"]["pca"]["shrinkage"] == 0.5
    state = checkpoint(tmp_path / "init" / "model.pt")["model"]
    rows = state["neck.weight"].double()
    assert torch.allclose(rows @ rows.T, torch.eye(16, dtype=torch.float64), atol=1e-5)  # principal directions


def test_a_second_training_job_on_the_same_folder_is_refused_naming_the_holder(shards, tmp_path):
    from landmarks.common import exclusive_lock

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from landmarks.common import exclusive_lock\n"
                f"with exclusive_lock({str(out / '.train.lock')!r}, 'x'):\n"
                "    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            StageError,
            match=rf"\.train\.lock: another training job is already running on this "
            rf"folder \(pid {holder.pid} on .*\); wait for it",
        ):
            train.train(
                [shards / "train"],
                [shards / "val"],
                out,
                settings_for({**TINY, "epochs": 0}),
                device=torch.device("cpu"),
            )
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, even): the lock went with it.
    train.train(
        [shards / "train"], [shards / "val"], out, settings_for({**TINY, "epochs": 0}), device=torch.device("cpu")
    )
    with exclusive_lock(out / ".train.lock", "x"):
        pass

"""GPU check: one script that runs every GPU code path of the pipeline and prints one table.

    .venv/bin/python bench/gpu_check.py                       # on a GPU machine (`make env GPU=1`), ~5-8 min on one H100/H200
    .venv/bin/python bench/gpu_check.py --quick --device cpu  # the same code paths, tiny sizes, on a CPU (checks the script)

Sections (`--sections`, all by default):
  train   ResNet-50 at 224 px, bf16 AMP, channels-last: the train stage's loop fed by the shard loader
          (images/s of its second epoch) against forward/backward steps on synthetic tensors already on
          the GPU (bench_train.py's two loops); goal: ratio >= 0.95. Tries `--workers` in turn and keeps
          the first count that reaches the goal. Peak GPU memory of both.
  ddp     the same training launched by `torchrun --nproc_per_node=1` (NCCL on a GPU, gloo on the CPU):
          it must finish; then a run stopped by SIGTERM after its first checkpoint, resumed from
          last.ckpt, against an uninterrupted run: largest weight difference.
  embed   the embed stage's loop with bf16 AMP and in fp32: images/s of each, the largest difference
          between their (L2-normalised) embeddings and the lowest cosine between them.
  faiss   faiss exact search (IndexFlatIP), 1M x 512 database, 100k queries, on the GPU: time, and the
          same neighbours as faiss-cpu on a sample of queries (ties aside); IVF-PQ on the GPU: recall@10
          against exact search.
  dag     the demo DAG end to end with train.gpus: 1 and embed.gpus: 1 (in its own working folder):
          wall time and the fine-tuned GAP, next to the CPU run's GAP (`--cpu-gap`, the README's).
It makes its own data (synthetic shards, random vectors, the demo), so it needs only the repository.
`--out FILE` also writes the results as JSON. A section that fails is reported in its row; the others
still run; the exit code is 1 when any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

SECTIONS = ("train", "ddp", "embed", "faiss", "dag")
FULL = {
    "model": "resnet50",
    "size": 224,
    "batch": 128,
    "images": 6144,
    "classes": 100,
    "database": 1_000_000,
    "queries": 100_000,
    "embed_images": 4096,
}
# timm's published training benchmark for the same model (AMP, channels-last, 224 px): the only GPU it lists is
# an RTX 3090 (results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv in huggingface/pytorch-image-models:
# resnet50, 1218.01 samples/s at batch 512); none for H100/H200-class GPUs.
TIMM_PUBLISHED = {"resnet50": "1,218 images/s on an RTX 3090, batch 512 (timm's published AMP channels-last run)"}
QUICK = {
    "model": "resnet18",
    "size": 64,
    "batch": 16,
    "images": 96,
    "classes": 8,
    "database": 20_000,
    "queries": 500,
    "embed_images": 64,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: checks the script)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every code path in about a minute")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="DataLoader worker counts to try in turn (default: 8 12 16; quick: 0)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--cpu-gap", type=float, default=0.967, help="the demo's fine-tuned GAP on the CPU (README)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--out", default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = [0] if args.quick else [8, 12, 16]
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu runs only with --quick (the full sizes are for a GPU)")
    return args


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_settings(sizes: dict, workers: int, epochs: int = 2, **extra) -> dict:
    from landmarks.config import section_settings

    return section_settings(
        "train",
        {
            "backbone": sizes["model"],
            "pretrained": "none",
            "image_size": sizes["size"],
            "batch_size": sizes["batch"],
            "epochs": epochs,
            "workers": workers,
            "loss": "arcface",
            "lr": 1e-4,
            "checkpoint_every_steps": 0,
            "min_steps_per_epoch": 1,
            "amp": True,
            "channels_last": True,
            **extra,
        },
    )


# ----------------------------------------------------------------------------- sections


def check_train(args, sizes, device, work: Path) -> list[dict]:
    """The train stage's loop on shards against synthetic tensors, with the first worker count that
    keeps >= 0.95 of the synthetic speed."""
    from bench_train import make_shards, plain_loop

    from landmarks import train

    shards = make_shards(work, sizes["images"], sizes["classes"], sizes["size"] + sizes["size"] // 4)
    rows, plain = [], None
    for workers in args.workers:
        settings = train_settings(sizes, workers)
        reset_peak_memory(device)
        shutil.rmtree(work / "train-run", ignore_errors=True)
        metrics = train.train([shards / "train"], [], work / "train-run", settings, device=device, threads=args.threads)
        stage, stage_memory = metrics[-1]["images_per_s"], peak_memory_gib(device)
        if plain is None:
            steps = json.loads((work / "train-run" / "train.json").read_text())["steps_per_epoch"]
            reset_peak_memory(device)
            plain = plain_loop(settings, sizes["classes"], device, steps=steps, warmup=max(3, steps // 10))
            plain_memory = peak_memory_gib(device)
            rows.append(
                {
                    "check": f"train {sizes['model']} @ {sizes['size']} px, batch {sizes['batch']}, synthetic "
                    "tensors on the device",
                    "result": f"{plain:.0f} images/s",
                    "memory_gib": plain_memory,
                    "goal": TIMM_PUBLISHED.get(sizes["model"], ""),
                }
            )
        ratio = stage / plain
        rows.append(
            {
                "check": f"train, fed by the shard loader ({workers} workers)",
                "result": f"{stage:.0f} images/s, ratio {ratio:.2f}",
                "memory_gib": stage_memory,
                "goal": ">= 0.95",
                "ok": None if args.quick else ratio >= 0.95,
            }
        )
        if ratio >= 0.95:
            break
    return rows


def _train_command(shards: Path, out: Path, settings: dict, device: str, launcher: list[str]) -> list[str]:
    return [
        *launcher,
        "--train-shards",
        str(shards),
        "--out-dir",
        str(out),
        "--settings",
        json.dumps(settings),
        "--device",
        device,
    ]


def _run(command, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def _weights(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def check_ddp_and_resume(args, sizes, device, work: Path) -> list[dict]:
    """torchrun with one process (NCCL on a GPU), then a SIGTERMed run resumed from last.ckpt against an
    uninterrupted one."""
    from bench_train import make_shards

    shards = make_shards(work, sizes["images"], sizes["classes"], sizes["size"] + sizes["size"] // 4) / "train"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    settings = train_settings(sizes, args.workers[-1], epochs=2, checkpoint_every_steps=2, seed=1)
    torchrun = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "landmarks.train",
    ]
    started = time.perf_counter()
    result = _run(_train_command(shards, work / "ddp", settings, device.type, torchrun), env)
    rows = [
        {
            "check": f"torchrun --nproc_per_node=1 ({'NCCL' if device.type == 'cuda' else 'gloo'})",
            "result": f"exit {result.returncode} in {time.perf_counter() - started:.0f} s",
            "ok": result.returncode == 0,
            "detail": result.stderr[-800:] if result.returncode else "",
        }
    ]
    plain = [sys.executable, "-m", "landmarks.train"]
    whole = _run(_train_command(shards, work / "whole", settings, device.type, plain), env)
    process = subprocess.Popen(
        _train_command(shards, work / "stopped", settings, device.type, plain),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not (work / "stopped" / "last.ckpt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stopped_code = process.wait(timeout=300)
    resumed = _run(_train_command(shards, work / "stopped", settings, device.type, plain), env)
    ok = whole.returncode == 0 and resumed.returncode == 0
    difference = None
    if ok:
        a, b = _weights(work / "whole" / "model.pt"), _weights(work / "stopped" / "model.pt")
        difference = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a else 0.0
    rows.append(
        {
            "check": "resume from last.ckpt after SIGTERM, against an uninterrupted run",
            "result": (
                f"stopped with exit {stopped_code}, resumed: "
                + (f"largest weight difference {difference:.2e}" if ok else "failed")
            ),
            "goal": "finishes; difference ~0 (exact on the CPU)",
            "ok": ok and difference < 1e-2,
            "detail": "" if ok else (whole.stderr + resumed.stderr)[-800:],
        }
    )
    return rows


def check_embed(args, sizes, device, work: Path) -> list[dict]:
    """The embed stage's loop with bf16 AMP and in fp32 on the same images."""
    import numpy as np
    from bench_train import make_shards

    from landmarks.embed import compute_embeddings
    from landmarks.loader import ShardIndex
    from landmarks.model import LandmarkModel

    shards = (
        make_shards(work, sizes["embed_images"], sizes["classes"], sizes["size"] + sizes["size"] // 4, seed=7) / "train"
    )
    index = ShardIndex.from_dirs([shards])
    model = LandmarkModel(sizes["model"], "none", 512).to(device)
    results = {}
    for amp in (True, False):
        compute_embeddings(
            model,
            index,
            sizes["size"],
            batch_size=sizes["batch"],
            workers=args.workers[0],
            device=device,
            amp=amp,
            progress=False,
        )  # warm-up (cuDNN autotuning)
        synchronize(device)
        started = time.perf_counter()
        results[amp] = compute_embeddings(
            model,
            index,
            sizes["size"],
            batch_size=sizes["batch"],
            workers=args.workers[0],
            device=device,
            amp=amp,
            progress=False,
        )
        synchronize(device)
        results[(amp, "speed")] = len(index) / (time.perf_counter() - started)
    difference = float(np.abs(results[True] - results[False]).max())
    cosine = float((results[True] * results[False]).sum(axis=1).min())
    amp_name = "bf16 AMP" if device.type == "cuda" else "AMP (off on the CPU)"
    return [
        {
            "check": f"embed {len(index)} images, {amp_name} vs fp32",
            "result": f"{results[(True, 'speed')]:.0f} vs {results[(False, 'speed')]:.0f} images/s; largest "
            f"difference {difference:.4f}, lowest cosine {cosine:.5f}",
            "goal": "cosine >= 0.999",
            "ok": cosine >= 0.999,
        }
    ]  # a correctness check: judged in quick mode too


def check_faiss(args, sizes, device, work: Path) -> list[dict]:
    """Exact search on the GPU against faiss-cpu, and IVF-PQ recall on the GPU."""
    import numpy as np

    from landmarks import index as faiss_index

    use_gpu = device.type == "cuda"
    if use_gpu and faiss_index.gpu_count() == 0:
        raise RuntimeError("faiss sees no GPU: install faiss-gpu (`make env GPU=1`)")
    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.standard_normal((n, 512), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    database, queries = unit(sizes["database"]), unit(sizes["queries"])
    where = "GPU" if use_gpu else "CPU"
    started = time.perf_counter()
    index, _ = faiss_index.build_index(database, use_gpu=use_gpu)
    built = time.perf_counter() - started
    started = time.perf_counter()
    cosines, positions = faiss_index.search(index, queries, 10)
    searched = time.perf_counter() - started
    sample = rng.choice(len(queries), min(1000, len(queries)), replace=False)
    cpu_index, _ = faiss_index.build_index(database, use_gpu=False)
    cpu_cosines, cpu_positions = faiss_index.search(cpu_index, queries[sample], 10)
    same = float((cpu_positions == positions[sample]).all(axis=1).mean())
    cosine_gap = float(np.abs(cpu_cosines - cosines[sample]).max())
    rows = [
        {
            "check": f"faiss exact search on the {where}, {len(database):,} x 512, {len(queries):,} queries, k 10",
            "result": f"{searched:.2f} s (+{built:.2f} s to build); same neighbours as faiss-cpu on "
            f"{same:.1%} of {len(sample)} sampled queries (largest cosine difference {cosine_gap:.1e})",
            "goal": "same neighbours (ties aside)",
            "ok": same >= 0.99,
        }
    ]
    del index, cpu_index
    started = time.perf_counter()
    ivf, about = faiss_index.build_index(
        database, index_type="ivfpq", ivf_lists=4096 if not args.quick else 64, pq_m=64, nprobe=32, use_gpu=use_gpu
    )
    _, ivf_positions = faiss_index.search(ivf, queries[sample], 10)
    recall = faiss_index.recall_against_exact(ivf_positions, cpu_positions)
    rows.append(
        {
            "check": f"faiss IVF-PQ on the {where} ({about['ivf_lists']} lists, pq_m 64, nprobe 32)",
            "result": f"recall@10 {recall['recall_at_k']:.3f}, true top-1 in the top 10 "
            f"{recall['top1_in_top_k']:.3f} ({time.perf_counter() - started:.1f} s incl. training)",
            "goal": "reported (random vectors are the hard case for PQ)",
            "ok": True,
        }
    )
    return rows


def check_dag(args, sizes, device, work: Path) -> list[dict]:
    """The demo DAG with train.gpus 1 and embed.gpus 1, in its own folder."""
    import yaml

    folder = work / "dag"
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    gpus = 1 if device.type == "cuda" else 0
    config["train"]["gpus"] = gpus
    config["embed"]["gpus"] = gpus
    config["demo"]["out_dir"] = str(folder / "demo")
    config["demo"]["port"] = 8799
    if args.quick:
        config["demo"].update({"landmarks": 6, "views_per_landmark": 6, "nonlandmarks": 12})
        config["train"].update({"epochs": 1, "image_size": 64})
        config["select"]["min_images_per_class"] = 3
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(folder),
            "--configfile",
            str(folder / "config.yaml"),
            "--cores",
            str(os.cpu_count()),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    wall = time.perf_counter() - started
    if result.returncode:
        return [
            {
                "check": "demo DAG, train.gpus 1, embed.gpus 1",
                "result": f"failed after {wall:.0f} s",
                "ok": False,
                "detail": result.stderr[-1500:],
            }
        ]
    name = next(iter(config["experiments"]))
    metrics = json.loads((folder / "results" / "experiments" / name / "score" / "metrics.json").read_text())
    return [
        {
            "check": f"demo DAG end to end, train.gpus {gpus}, embed.gpus {gpus}",
            "result": f"{wall:.0f} s; fine-tuned GAP {metrics['gap']:.3f} (CPU run: {args.cpu_gap:.3f})",
            "goal": "GAP within 0.02 of the CPU run's" if not args.quick else "runs",
            "ok": args.quick or abs(metrics["gap"] - args.cpu_gap) <= 0.02,
        }
    ]


CHECKS = {
    "train": check_train,
    "ddp": check_ddp_and_resume,
    "embed": check_embed,
    "faiss": check_faiss,
    "dag": check_dag,
}


def render(rows: list[dict], header: str) -> str:
    lines = [header, "", "| check | result | peak GPU memory | goal | |", "|---|---|---:|---|---|"]
    for row in rows:
        memory = f"{row['memory_gib']:.1f} GiB" if row.get("memory_gib") is not None else ""
        mark = {True: "ok", False: "**FAILED**", None: ""}[row.get("ok")]
        lines.append(f"| {row['check']} | {row['result']} | {memory} | {row.get('goal', '')} | {mark} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible (torch.cuda.is_available() is False). On a GPU machine run it after "
            "`make env GPU=1`; to check the script itself on a CPU: --quick --device cpu",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (
        f"gpu_check on {name}, torch {torch.__version__}, {'quick sizes' if args.quick else 'full sizes'}, "
        f"{os.cpu_count()} cores"
    )
    rows = []
    started = time.perf_counter()
    try:
        for section in args.sections:
            print(f"gpu_check: {section} ...", file=sys.stderr, flush=True)
            try:
                rows += CHECKS[section](args, sizes, device, work)
            except Exception as err:
                rows.append(
                    {
                        "check": section,
                        "result": f"error: {type(err).__name__}: {err}",
                        "ok": False,
                        "detail": traceback.format_exc()[-1500:],
                    }
                )
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    text = render(rows, header) + f"\n\n{time.perf_counter() - started:.0f} s in all"
    print(text)
    for row in rows:
        if row.get("detail"):
            print(f"\n{row['check']}:\n{row['detail']}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 1 if any(row.get("ok") is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

# train[experiment]: fine-tune backbone + GeM + embedding head on the train shards; model selection by
# GAP on val. Checkpoints (last.ckpt, beside the outputs) let a killed or requeued job resume exactly.
#
# The launcher follows the experiment's train.gpus (per node) and train.nodes:
#   0-1 GPU, one node   python -m landmarks.train                                     (one process)
#   G > 1 GPUs, one node torchrun --standalone --nproc_per_node=G -m landmarks.train  (DDP, G processes)
#   N > 1 nodes          srun --ntasks-per-node=G python -m landmarks.train           (DDP, N x G processes)
# Multi-node jobs are SLURM "MPI-style" jobs: the executor allocates N nodes and our shell command
# starts the tasks itself with srun; the stage finds its rank and rendezvous from SLURM's variables.


TRAIN_OUTPUT = dict(
    model=f"{R}/experiments/{{experiment}}/train/model.pt",
    metrics=f"{R}/experiments/{{experiment}}/train/metrics.csv",
    summary=f"{R}/experiments/{{experiment}}/train/train.json",
    curves=report(
        f"{R}/experiments/{{experiment}}/train/curves.png",
        category="Training",
        subcategory="{experiment}",
        caption="../report/curves.rst",
    ),
)
TRAIN_PARAMS = dict(
    settings=lambda w: as_json(train_settings(w)),
    out_dir=lambda w: f"{R}/experiments/{w.experiment}/train",
    launcher=train_launcher,
    torch_threads=train_torch_threads,
)
TRAIN_SHELL = (
    "{params.launcher} --train-shards {input.train:q} --val-shards {input.val:q} "
    "--nonlandmark-shards {input.bank:q} "
    "--out-dir {params.out_dir:q} --settings {params.settings:q} --threads {params.torch_threads} "
    "> {log:q} 2>&1"
)
MULTINODE_EXPERIMENTS = [
    name for name in EXPERIMENTS if lmconfig.experiment_settings(config, name, CONFIG_SOURCE)["train"]["nodes"] > 1
]
SINGLE_NODE_EXPERIMENTS = [name for name in EXPERIMENTS if name not in MULTINODE_EXPERIMENTS]


if SINGLE_NODE_EXPERIMENTS:

    rule train:
        input:
            train=shard_dirs("train"),
            val=shard_dirs("val"),
            bank=shard_dirs("nonlandmark"),  # a sample joins val as non-landmark queries
        output:
            **TRAIN_OUTPUT,
        log:
            f"{LOGS}/train/{{experiment}}.log",
        wildcard_constraints:
            experiment="|".join(map(re.escape, SINGLE_NODE_EXPERIMENTS)),
        conda:
            "../envs/torch.yaml"
        threads: lambda w: train_processes_per_node(w) * train_threads_per_process(w)
        resources:
            mem_mb=lambda w: 16000 * train_processes_per_node(w),
            runtime=24 * 60,
            gpu=lambda w: train_settings(w)["gpus"],
        params:
            **TRAIN_PARAMS,
        shell:
            TRAIN_SHELL


if MULTINODE_EXPERIMENTS:

    rule train_multinode:
        input:
            train=shard_dirs("train"),
            val=shard_dirs("val"),
            bank=shard_dirs("nonlandmark"),  # a sample joins val as non-landmark queries
        output:
            **TRAIN_OUTPUT,
        log:
            f"{LOGS}/train/{{experiment}}.log",
        wildcard_constraints:
            experiment="|".join(map(re.escape, MULTINODE_EXPERIMENTS)),
        conda:
            "../envs/torch.yaml"
        threads: lambda w: train_threads_per_process(w)  # per task (SLURM --cpus-per-task)
        resources:
            mem_mb=lambda w: 16000 * train_processes_per_node(w),  # per node (SLURM --mem)
            runtime=24 * 60,
            nodes=lambda w: train_settings(w)["nodes"],
            # One task per GPU: the executor asks sbatch for nodes x gpus tasks and as many GPUs, with
            # the same number on every node; srun in the shell command starts the tasks.
            gpu=lambda w: train_settings(w)["nodes"] * train_settings(w)["gpus"],
            tasks=lambda w: train_settings(w)["nodes"] * train_processes_per_node(w),
            # tasks_per_gpu=0: the plugin would otherwise add --ntasks-per-gpu, which sbatch refuses beside
            # --ntasks-per-node; the GPUs are spread per node instead.
            tasks_per_gpu=0,
            slurm_extra=lambda w: f"--ntasks-per-node={train_processes_per_node(w)} "
            f"--gpus-per-node={train_settings(w)['gpus']}",
            mpi="srun",
        params:
            **TRAIN_PARAMS,
        shell:
            TRAIN_SHELL

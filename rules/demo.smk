# demo: generate the built-in synthetic landmark / non-landmark photo set and its URL list, plus a folder of
# new photos no model has seen (new_photos/, answers in new_photos.csv) for trying `predict` on.
# Only used when input.urls_csv is null; the Snakefile's onstart hook serves the photos on 127.0.0.1.


rule demo:
    output:
        urls=f"{config['demo']['out_dir']}/urls.csv",
        new_photos=directory(f"{config['demo']['out_dir']}/new_photos"),
        new_photos_csv=f"{config['demo']['out_dir']}/new_photos.csv",
    log:
        f"{LOGS}/demo.log",
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        out_dir=lambda w, output: Path(output.urls).parent,
        seed=config["demo"]["seed"],
        landmarks=config["demo"]["landmarks"],
        views=config["demo"]["views_per_landmark"],
        nonlandmarks=config["demo"]["nonlandmarks"],
        broken_fraction=config["demo"]["broken_fraction"],
        new_photos=config["demo"]["new_photos"],
        base_url=f"http://{config['demo']['host']}:{config['demo']['port']}",
    shell:
        "python -m landmarks.demo generate --out {params.out_dir:q} --seed {params.seed} "
        "--landmarks {params.landmarks} --views {params.views} --nonlandmarks {params.nonlandmarks} "
        "--broken-fraction {params.broken_fraction} --new-photos {params.new_photos} "
        "--base-url {params.base_url:q} --workers {threads} "
        "> {log:q} 2>&1"

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
        # the whole section: its host and port make the URLs of the server the onstart hook starts
        settings=as_json(config["demo"]),
    shell:
        "python -m landmarks.demo generate --out {params.out_dir:q} --settings {params.settings:q} "
        "--workers {threads} > {log:q} 2>&1"

# Training (tvq train). The rule declares only small files written at the end as its outputs:
# Snakemake deletes a job's outputs before it reruns the job, and the checkpoints in
# runs/{dataset}/{preset}/checkpoints must survive that so the rerun resumes from them.

# Peak host memory estimates in MB for a training job (the accelerator's own memory is
# not counted). NOTE: estimates, not measurements, except that smoke stays far below.
TRAIN_MEM_MB = {"smoke": 4000, "cpu": 8000, "paper": 64000}


def train_overrides():
    """Return the `--set key=value` options from the pipeline config."""
    overrides = []
    for key in ("global_batch_size", "n_max_step"):
        if config[key] is not None:
            overrides.append(f"{key}={config[key]}")
    overrides.extend(config["train_overrides"])
    return " ".join(f"--set {shlex.quote(override)}" for override in overrides)


rule train:
    """Train (or resume) one run; train_summary.json is written last, when it is complete."""
    input:
        data=multiext("data/{dataset}/", "train.npy", "validation.npy", "manifest.json"),
        dataset_config="config/{dataset}.yaml",
        preset_config="config/presets/{preset}.yaml",
    output:
        # The curves are CSV views of metrics.jsonl for `dvc plots`, written at the end.
        summary="runs/{dataset}/{preset}/train_summary.json",
        train_curve="runs/{dataset}/{preset}/train_curve.csv",
        validation_curve="runs/{dataset}/{preset}/validation_curve.csv",
    params:
        workdir=lambda wildcards: run_dir(wildcards.dataset, wildcards.preset),
        overrides=train_overrides(),
        launcher=launcher(),
    log:
        "logs/train/{dataset}_{preset}.log",
    benchmark:
        "benchmarks/train/{dataset}_{preset}.tsv"
    # Capped at --cores when run locally; a cluster profile may set it per rule.
    threads: 8
    resources:
        mem_mb=lambda wildcards: TRAIN_MEM_MB[wildcards.preset],
        # Accelerators (GPUs, or a TPU host's chips) the job uses; the profiles map it.
        accelerators=1,
    shell:
        "{params.launcher}tvq train"
        " --config {input.dataset_config} {input.preset_config}"
        " --data-dir data/{wildcards.dataset} --workdir {params.workdir}"
        " {params.overrides} --no-progress > {log} 2>&1"

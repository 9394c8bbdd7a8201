# Evaluation (tvq evaluate): score a whole split with the run's best checkpoint.


def evaluate_inputs(wildcards):
    """Return the run's completion record and the split; reject a dataset's wrong metric."""
    if METRIC[wildcards.dataset] != wildcards.metric:
        raise ValueError(
            f"{wildcards.dataset} results are named {{split}}_{METRIC[wildcards.dataset]}.json,"
            f" not {{split}}_{wildcards.metric}.json"
        )
    return {
        "summary": f"{run_dir(wildcards.dataset, config['preset'])}/train_summary.json",
        "split": f"data/{wildcards.dataset}/{wildcards.split}.npy",
        "manifest": f"data/{wildcards.dataset}/manifest.json",
    }


def max_tokens_option():
    if config["eval_max_tokens"] is None:
        return ""
    return f"--max-tokens {config['eval_max_tokens']}"


rule evaluate:
    """Write results/{dataset}/{split}_{metric}.json (bits per byte or dimension, or perplexity)."""
    input:
        unpack(evaluate_inputs),
    output:
        "results/{dataset}/{split}_{metric}.json",
    params:
        workdir=lambda wildcards: run_dir(wildcards.dataset, config["preset"]),
        max_tokens=max_tokens_option(),
        launcher=launcher(),
    log:
        "logs/evaluate/{dataset}_{split}_{metric}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}_{split}_{metric}.tsv"
    threads: 8
    resources:
        mem_mb=lambda wildcards: TRAIN_MEM_MB[config["preset"]],
        accelerators=1,
    shell:
        "{params.launcher}tvq evaluate --workdir {params.workdir}"
        " --data-dir data/{wildcards.dataset} --split {wildcards.split} --out {output}"
        " {params.max_tokens} --no-progress > {log} 2>&1"

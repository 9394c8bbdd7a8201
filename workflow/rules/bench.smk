# Benchmarks (tvq bench): training-step throughput of vq against full attention.


def throughput_lens_option():
    lens = config["throughput_sequence_lens"]
    if lens is None:
        return ""
    return "--sequence-lens " + " ".join(str(int(T)) for T in lens)


rule throughput:
    """Time training steps for every attention and head type and sequence length."""
    output:
        table="results/throughput/throughput.csv",
        speedup="results/throughput/speedup.csv",
    params:
        preset=config["throughput_preset"],
        lens=throughput_lens_option(),
        budget_s=config["throughput_budget_s"],
        launcher=launcher(),
    log:
        "logs/bench/throughput.log",
    benchmark:
        "benchmarks/bench/throughput.tsv"
    threads: 8
    resources:
        mem_mb=16000,
        accelerators=1,
    shell:
        "{params.launcher}tvq bench throughput --preset {params.preset} {params.lens}"
        " --budget-s {params.budget_s} --out {output.table} --speedup-out {output.speedup}"
        " > {log} 2>&1"

# Datasets: download or read, tokenise, split (tvq prepare), and the PG-19 vocabulary.

# Peak memory estimates in MB. enwik8 preparation holds about 10 bytes per input byte
# (0.97 GB for the 100 MB file). NOTE: the TFDS figures are guesses: PG-19 and
# ImageNet64 preparation has only been run on small locally built datasets.
PREPARE_MEM_MB = {"enwik8": 2000, "pg19": 32000, "imagenet64": 16000}


def prepare_inputs(wildcards):
    """Return the files that `tvq prepare` reads and Snakemake can track."""
    if wildcards.dataset == "enwik8":
        source = config["enwik8_source"]
        # A URL is fetched by tvq; a local file is an input, so editing it reruns the job.
        return [] if is_url(source) else [source]
    if wildcards.dataset == "pg19":
        return ["resources/vocab/pg19.model"]
    return []


def prepare_options(wildcards):
    """Return the dataset-specific options of `tvq prepare`."""
    if wildcards.dataset == "enwik8":
        return (
            f"--source {shlex.quote(config['enwik8_source'])}"
            f" --download-dir {shlex.quote(config['download_dir'])}"
        )
    options = [tfds_options()]
    if wildcards.dataset == "pg19":
        options.append("--vocab resources/vocab/pg19.model")
    if config["tfds_max_examples"] is not None:
        options.append(f"--max-examples {config['tfds_max_examples']}")
    return " ".join(option for option in options if option)


def download_failure_hint(wildcards):
    """Return shell text that, when the enwik8 download fails, names the setting to use."""
    if wildcards.dataset != "enwik8" or not is_url(config["enwik8_source"]):
        return ""
    message = (
        f"prepare: downloading {config['enwik8_source']} failed, and"
        " logs/prepare/enwik8.log says why. Without network access, fetch the file another"
        " way and pass --config enwik8_source=PATH"
    )
    return f" || {{ echo {shlex.quote(message)} >&2; exit 1; }}"


rule prepare:
    """Write data/{dataset}/: train, validation and test token files and manifest.json."""
    input:
        prepare_inputs,
    output:
        multiext("data/{dataset}/", "train.npy", "validation.npy", "test.npy", "manifest.json"),
    params:
        options=prepare_options,
        on_failure=download_failure_hint,
    log:
        "logs/prepare/{dataset}.log",
    benchmark:
        "benchmarks/prepare/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wildcards: PREPARE_MEM_MB[wildcards.dataset],
    shell:
        "tvq prepare --dataset {wildcards.dataset} --out-dir data/{wildcards.dataset}"
        " {params.options} --no-progress > {log} 2>&1{params.on_failure}"


def vocab_options():
    options = [tfds_options(), f"--vocab-size {config['pg19_vocab_size']}"]
    if config["tfds_max_examples"] is not None:
        options.append(f"--max-books {config['tfds_max_examples']}")
    return " ".join(option for option in options if option)


rule vocab_pg19:
    """Train the PG-19 SentencePiece BPE vocabulary on the TFDS train split."""
    output:
        multiext("resources/vocab/pg19", ".model", ".vocab"),
    params:
        options=vocab_options(),
    log:
        "logs/vocab/pg19.log",
    benchmark:
        "benchmarks/vocab/pg19.tsv"
    threads: 1
    resources:
        # NOTE: a guess; SentencePiece holds the sampled sentences (--max-sentences) in memory.
        mem_mb=32000,
    shell:
        "tvq vocab --dataset pg19 {params.options} --out {output[0]} > {log} 2>&1"

"""The `tvq` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from tvq.model.config import ATTN_TYPES, DTYPES, HEAD_TYPES


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _bounded_int(low: int, high: int):
    """Return an argparse type that accepts integers in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def _add_bench_attention(subparsers) -> None:
    parser = subparsers.add_parser(
        "attention",
        help="time one training step of a one-layer model, vq against full attention",
        description=(
            "Time loss plus gradients of a one-layer model at the paper's throughput "
            "widths for every combination of dtype, sequence length, head type and "
            "attention type. Prints tokens/s, analytic training FLOPs per token, the "
            "achieved fraction of a float32 matmul's GFLOP/s, and the vq/full speed-up "
            "against their FLOP ratio."
        ),
    )
    parser.add_argument(
        "--sequence-lens", type=_positive_int, nargs="+", default=[2048, 8192, 32768],
        help="sequence lengths T in tokens (default: 2048 8192 32768)",
    )

    parser.add_argument(
        "--head-types", nargs="+", choices=HEAD_TYPES, default=list(HEAD_TYPES),
        help="head types (default: all)",
    )
    parser.add_argument(
        "--attn-types", nargs="+", choices=ATTN_TYPES, default=["vq", "full"],
        help="attention types (default: vq full)",
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=["float32", "bfloat16"],
        help="activation dtypes (default: float32 bfloat16)",
    )

    parser.add_argument("--d-model", type=_positive_int, default=768, help="model width D")
    parser.add_argument("--d-k", type=_positive_int, default=128, help="key width K")
    parser.add_argument("--n-code", type=_positive_int, default=512, help="codebook size S")
    parser.add_argument("--block-len", type=_positive_int, default=512, help="block length L")

    parser.add_argument(
        "--repeats", type=_positive_int, default=3,
        help="timed steps per configuration after one warm-up step (default: 3)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=600.0,
        help="seconds of stepping per configuration before timing stops early (default: 600)",
    )
    parser.add_argument(
        "--matmul-size", type=_positive_int, default=4096,
        help=(
            "largest side of the square float32 matmuls (this, 1/2 and 1/4 of it) whose "
            "best GFLOP/s is the ceiling (default: 4096)"
        ),
    )

    parser.add_argument("--out", type=Path, help="write the rows to this .csv or .json file")
    parser.set_defaults(handler=_run_bench_attention)


def _run_bench_attention(args: argparse.Namespace) -> int:
    from tvq.bench import attention

    for T in args.sequence_lens:
        if T % args.block_len or T // args.block_len < 3:
            print(
                f"tvq bench attention: sequence length {T} must be a multiple of "
                f"--block-len {args.block_len} with at least 3 blocks",
                file=sys.stderr,
            )
            return 2
    attention.run(
        sequence_lens=args.sequence_lens,
        head_types=args.head_types,
        attn_types=args.attn_types,
        dtypes=args.dtypes,
        d_model=args.d_model,
        d_k=args.d_k,
        n_code=args.n_code,
        block_len=args.block_len,
        repeats=args.repeats,
        budget_s=args.budget_s,
        matmul_size=args.matmul_size,
        out=args.out,
    )
    return 0


DATASETS = ("enwik8", "text", "pg19", "imagenet64")


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="download or read a dataset and write its token splits",
        description=(
            "Write train.npy, validation.npy and test.npy (memory-mappable token ids in the "
            "smallest unsigned dtype that fits) and manifest.json into --out-dir. The folder "
            "is replaced only when every file is complete."
        ),
    )
    parser.add_argument(
        "--dataset", required=True, choices=DATASETS,
        help=(
            "enwik8: the canonical enwik8 (split 90M/5M/5M bytes) or any file of the same "
            "kind (split 90%%/5%%/5%%, marked non-canonical); text: local text or XML files "
            "(plain, zip, bz2 or gz), "
            "split 90%%/5%%/5%%; pg19: TFDS pg19, books joined with eos; imagenet64: TFDS "
            "imagenet_resized/64x64, 12,288 byte tokens per image. pg19 and imagenet64 need "
            "the data extra and a TFDS data dir where the dataset is already built"
        ),
    )
    parser.add_argument(
        "--source", nargs="+",
        help=(
            "enwik8: URL or local path, a zip holding one file, bz2, gz or plain (default: "
            "the canonical http://mattmahoney.net/dc/enwik8.zip); text: one or more local files"
        ),
    )
    parser.add_argument(
        "--out-dir", type=Path, required=True,
        help=(
            "folder for the splits; an existing folder is replaced, but only if it contains "
            "nothing except tvq's split files and manifest.json"
        ),
    )

    parser.add_argument(
        "--download-dir", type=Path, default=Path("resources/downloads"),
        help=(
            "where downloads and their resumable .part files go (default: "
            "resources/downloads in the current folder)"
        ),
    )
    parser.add_argument(
        "--vocab", type=Path,
        help="SentencePiece .model from `tvq vocab` (text and pg19; default: bytes)",
    )
    parser.add_argument(
        "--tfds-data-dir", type=Path,
        help="TFDS data dir for pg19 and imagenet64 (default: TFDS's own, ~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--max-examples", type=_positive_int,
        help=(
            "pg19 and imagenet64: keep at most this many books or images per split, for "
            "smoke runs; recorded in the manifest as non-canonical"
        ),
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from tvq.data.enwik8 import ENWIK8_URL, prepare_enwik8, prepare_text

    tfds_only = {"--tfds-data-dir": args.tfds_data_dir, "--max-examples": args.max_examples}
    for flag, value in tfds_only.items():
        if value is not None and args.dataset not in ("pg19", "imagenet64"):
            raise UsageError(f"{flag} applies to pg19 and imagenet64, not {args.dataset}")
    if args.vocab is not None and args.dataset not in ("text", "pg19"):
        raise UsageError(f"--vocab applies to text and pg19, not {args.dataset}")
    if args.source and args.dataset in ("pg19", "imagenet64"):
        raise UsageError(f"{args.dataset} is read from --tfds-data-dir, not --source")

    if args.dataset == "enwik8":
        sources = args.source or [ENWIK8_URL]
        if len(sources) != 1:
            raise UsageError("--dataset enwik8 takes one --source")
        progress = not args.no_progress
        prepare_enwik8(sources[0], args.out_dir, args.download_dir, progress=progress)
    elif args.dataset == "text":
        if not args.source:
            raise UsageError("--dataset text needs one or more --source files")
        prepare_text(args.source, args.out_dir, vocab_model=args.vocab)
    elif args.dataset == "pg19":
        from tvq.data.tfds_sources import prepare_pg19

        prepare_pg19(
            args.out_dir, data_dir=args.tfds_data_dir, vocab_model=args.vocab,
            max_books=args.max_examples,
        )
    else:
        from tvq.data.tfds_sources import prepare_imagenet64

        prepare_imagenet64(args.out_dir, data_dir=args.tfds_data_dir, max_images=args.max_examples)
    print(f"wrote {args.out_dir}/{{train,validation,test}}.npy and manifest.json")
    return 0


def _add_vocab(subparsers) -> None:
    parser = subparsers.add_parser(
        "vocab",
        help="train a SentencePiece BPE vocabulary on a train split",
        description=(
            "Train a SentencePiece BPE vocabulary (pad 0, eos 1, unk 2, no bos) on the "
            "train split of a corpus and write it atomically to --out (.model, with the "
            ".vocab listing beside it)."
        ),
    )
    parser.add_argument(
        "--dataset", choices=("text", "pg19"), default="text",
        help="text: the first 90%% of --source files (their train split); pg19: the TFDS "
        "pg19 train split (default: text)",
    )
    parser.add_argument("--source", nargs="+", type=Path, help="local text files (text)")
    parser.add_argument("--tfds-data-dir", type=Path, help="TFDS data dir (pg19)")
    parser.add_argument(
        "--max-books", type=_positive_int, help="pg19: read at most this many train books"
    )
    parser.add_argument("--out", type=Path, required=True, help="path of the .model file")
    parser.add_argument(
        "--vocab-size", type=_bounded_int(4, 2**31 - 1), default=32_000,
        help=(
            "number of pieces, including 3 special ids and 256 byte-fallback pieces "
            "(default: 32000, as for PG-19)"
        ),
    )
    parser.add_argument(
        "--max-sentences", type=_bounded_int(101, 2**31 - 1), default=10_000_000,
        help=(
            "lines sampled for training, which bounds memory; SentencePiece needs more "
            "than 100 (default: 10000000)"
        ),
    )
    parser.add_argument(
        "--seed", type=_bounded_int(0, 2**32 - 1), default=0,
        help="sampling seed, 0 to 2^32 - 1 (default: 0)",
    )
    parser.set_defaults(handler=_run_vocab)


def _run_vocab(args: argparse.Namespace) -> int:
    from tvq.data.sentencepiece_vocab import train_sentencepiece

    if args.dataset == "text":
        from tvq.data.enwik8 import split_bounds
        from tvq.data.raw import read_maybe_compressed

        if not args.source:
            raise UsageError("--dataset text needs one or more --source files")
        content = b"".join(read_maybe_compressed(path) for path in args.source)
        train_stop = split_bounds(len(content))[0][1]
        texts = [content[:train_stop].decode("utf-8", errors="replace")]
    else:
        from tvq.data.tfds_sources import iter_pg19_texts

        if args.source:
            raise UsageError("pg19 is read from --tfds-data-dir, not --source")
        texts = iter_pg19_texts("train", data_dir=args.tfds_data_dir, max_books=args.max_books)

    train_sentencepiece(
        texts, args.out, vocab_size=args.vocab_size, max_sentences=args.max_sentences,
        seed=args.seed,
    )
    print(f"wrote {args.out}")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _add_bench_throughput(subparsers) -> None:
    from tvq.bench.throughput_presets import PRESETS

    parser = subparsers.add_parser(
        "throughput",
        help="time whole training steps, vq against full attention, and report MFU",
        description=(
            "Time one training step (forward, backward, AdamW and codebook update) of "
            "the preset's model for every head type, attention type and sequence length. "
            "Prints and writes one row per configuration: step time median and spread "
            "over --repeats steps after a warm-up step, tokens/s, analytic training FLOPs "
            "per token, model-FLOPs utilisation and peak memory. A configuration that "
            "does not fit in memory is recorded as 'out of memory' and one whose first "
            "timed step outruns --budget-s as 'over budget', instead of stopping the run. "
            "Presets: tiny (a quick check), cpu (the paper's widths with one layer, T "
            "2048 to 32768, float32, one sequence per step), paper (the paper's 24-layer "
            "768-wide model, T 2048 to 131072, bfloat16, 131072 tokens per step)."
        ),
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu",
        help=(
            "model widths, depth, dtype and default sequence lengths (default: cpu, about "
            "30 minutes on 2 CPU cores; tiny takes seconds)"
        ),
    )
    parser.add_argument(
        "--sequence-lens", type=_positive_int, nargs="+",
        help=(
            "sequence lengths T in tokens: multiples of the preset's block length (32 for "
            "tiny, 512 otherwise) with at least 3 blocks (default: the preset's)"
        ),
    )
    parser.add_argument(
        "--head-types", nargs="+", choices=HEAD_TYPES, default=list(HEAD_TYPES),
        help="head types (default: all)",
    )
    parser.add_argument(
        "--attn-types", nargs="+", choices=("vq", "full"), default=["vq", "full"],
        help="attention types (default: vq full)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, help="activation dtype (default: the preset's)"
    )
    parser.add_argument(
        "--n-layer", type=_positive_int, help="number of layers (default: the preset's)"
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=3,
        help="timed steps per configuration after one warm-up step (default: 3)",
    )
    parser.add_argument(
        "--budget-s", type=_positive_float, default=300.0,
        help=(
            "seconds of stepping per configuration, warm-up included; timing stops after "
            "the step that passes it (default: 300)"
        ),
    )
    parser.add_argument(
        "--max-memory-gib", type=_positive_float,
        help=(
            "record configurations whose compiled program needs more than this many GiB "
            "as 'out of memory' without running them (default: 80%% of host memory)"
        ),
    )
    parser.add_argument(
        "--peak-tflops", type=_positive_float,
        help=(
            "the accelerator's peak TFLOP/s in the preset's dtype, the reference of MFU; "
            "without it MFU is relative to the best square matmul timed in the same run"
        ),
    )
    parser.add_argument(
        "--matmul-size", type=_positive_int, default=4096,
        help="largest side of the square matmuls that set the MFU reference (default: 4096)",
    )
    parser.add_argument("--out", type=Path, help="write the rows to this CSV file")
    parser.add_argument(
        "--speedup-out", type=Path,
        help="write vq's speed-up over full per head type and length to this CSV file",
    )
    parser.set_defaults(handler=_run_bench_throughput)


def _run_bench_throughput(args: argparse.Namespace) -> int:
    from tvq.bench import throughput
    from tvq.files import check_writable

    preset = throughput.PRESETS[args.preset]
    throughput.check_lengths(preset, args.sequence_lens or list(preset.sequence_lens))
    if args.out is not None and args.speedup_out is not None:
        if Path(os.path.realpath(args.out)) == Path(os.path.realpath(args.speedup_out)):
            raise UsageError("--out and --speedup-out name the same file; give two paths")
    for path in (args.out, args.speedup_out):
        if path is not None:
            check_writable(path)
    throughput.run(
        args.preset,
        sequence_lens=args.sequence_lens,
        head_types=args.head_types,
        attn_types=args.attn_types,
        dtype=args.dtype,
        n_layer=args.n_layer,
        repeats=args.repeats,
        budget_s=args.budget_s,
        max_memory_gib=args.max_memory_gib,
        peak_tflops=args.peak_tflops,
        matmul_size=args.matmul_size,
        out=args.out,
        speedup_out=args.speedup_out,
        log=lambda line: print(line, flush=True),
    )
    return 0


def _add_bench_sampling(subparsers) -> None:
    parser = subparsers.add_parser(
        "sampling",
        help="time per-token decoding against context length, vq against full attention",
        description=(
            "For every head type, attention type and context length, build a decoding "
            "state that has consumed that many tokens (random contents, which do not "
            "change the cost of a step), then time Decoder.generate of --steps tokens "
            "from it: one warm-up call, then --repeats timed calls. Prints and writes one "
            "row per configuration: milliseconds per token (median and spread), tokens/s, "
            "compile seconds, the decoding state's bytes, peak memory, and the latency "
            "relative to the shortest context. A configuration that does not fit in "
            "memory is recorded as 'out of memory' and one whose warm-up call outruns "
            "--budget-s as 'over budget', instead of stopping the run. The model has "
            "random parameters and the widths of the cpu training preset unless changed."
        ),
    )
    parser.add_argument(
        "--attn-types", nargs="+", choices=("vq", "full"), default=["vq", "full"],
        help="attention types (default: vq full)",
    )
    parser.add_argument(
        "--head-types", nargs="+", choices=HEAD_TYPES, default=["shga"],
        help="head types (default: shga)",
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 8192, 65536],
        help=(
            "context lengths in tokens: how many tokens each state has consumed before "
            "the timed calls (default: 1024 8192 65536)"
        ),
    )
    parser.add_argument(
        "--steps", type=_positive_int,
        help=(
            "tokens generated per timed call (default: 2 x --block-len, so that each call "
            "crosses the block boundaries where the VQ window rolls into the cache)"
        ),
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=1,
        help="sequences decoded together (default: 1)",
    )
    parser.add_argument(
        "--d-model", type=_positive_int, default=128, help="model width D (default: 128)"
    )
    parser.add_argument("--d-k", type=_positive_int, default=32, help="key width K (default: 32)")
    parser.add_argument(
        "--n-code", type=_positive_int, default=64, help="codebook size S (default: 64)"
    )
    parser.add_argument(
        "--n-layer", type=_positive_int, default=4, help="number of layers (default: 4)"
    )
    parser.add_argument(
        "--block-len", type=_positive_int, default=64, help="block length L in tokens (default: 64)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32",
        help="activation dtype; parameters stay float32 (default: float32)",
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=3,
        help="timed calls per configuration after one warm-up call (default: 3)",
    )
    parser.add_argument(
        "--budget-s", type=_positive_float, default=300.0,
        help=(
            "time budget per configuration in seconds, warm-up call included: timing stops "
            "after the call that passes it (default: 300)"
        ),
    )
    parser.add_argument(
        "--max-memory-gib", type=_positive_float,
        help=(
            "record configurations whose compiled generate call needs more than this many "
            "GiB as 'out of memory' without running them (default: 80%% of host memory)"
        ),
    )
    parser.add_argument("--out", type=Path, help="write the rows to this CSV file")
    parser.set_defaults(handler=_run_bench_sampling)


def _run_bench_sampling(args: argparse.Namespace) -> int:
    from tvq.bench import sampling
    from tvq.files import check_writable

    widths = {
        "d_model": args.d_model, "d_k": args.d_k, "n_code": args.n_code,
        "n_layer": args.n_layer, "block_len": args.block_len, "dtype": args.dtype,
    }
    # Checked before the output's folder is created, so that bad input writes nothing.
    sampling.check_contexts(args.contexts, args.steps or 0)
    for head in args.head_types:
        sampling.model_config(head, "vq", **widths)
    if args.out is not None:
        check_writable(args.out)
    sampling.run(
        attn_types=args.attn_types,
        head_types=args.head_types,
        contexts=args.contexts,
        steps=args.steps,
        batch_size=args.batch_size,
        widths=widths,
        repeats=args.repeats,
        budget_s=args.budget_s,
        max_memory_gib=args.max_memory_gib,
        out=args.out,
        log=lambda line: print(line, flush=True),
    )
    return 0


def _add_bench_flops(subparsers) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="compare the analytic FLOPs per token with XLA's cost analysis",
        description=(
            "Compile the forward pass and a training step (loss and gradients) of a "
            "one-layer model for each attention and head type and print FLOPs per token "
            "from tvq.model.flops beside XLA's count. XLA also counts elementwise work "
            "and dense attention's recomputed scores, so ratios slightly above 1 are "
            "expected; nan means the backend gives no cost analysis."
        ),
    )
    parser.add_argument(
        "--d-model", type=_positive_int, default=256, help="model width D (default: 256)"
    )
    parser.add_argument("--d-k", type=_positive_int, default=64, help="key width K (default: 64)")
    parser.add_argument(
        "--n-code", type=_positive_int, default=64, help="codebook size S (default: 64)"
    )
    parser.add_argument(
        "--block-len", type=_positive_int, default=64, help="block length L (default: 64)"
    )
    parser.add_argument(
        "--sequence-len", type=_positive_int, default=256,
        help="sequence length T, a multiple of L with at least 3 blocks (default: 256)",
    )
    parser.add_argument(
        "--head-types", nargs="+", choices=HEAD_TYPES, default=list(HEAD_TYPES),
        help="head types (default: all)",
    )
    parser.add_argument(
        "--attn-types", nargs="+", choices=("vq", "full"), default=["vq", "full"],
        help="attention types (default: vq full)",
    )
    parser.set_defaults(handler=_run_bench_flops)


def _run_bench_flops(args: argparse.Namespace) -> int:
    from tvq.bench import flops
    from tvq.model.config import TransformerConfig

    checks = []
    for attn in args.attn_types:
        for head in args.head_types:
            config = TransformerConfig(
                d_model=args.d_model, d_k=args.d_k, n_code=args.n_code, n_layer=1,
                block_len=args.block_len, sequence_len=args.sequence_len,
                attn_type=attn, head_type=head, dtype="float32",
            )
            checks.append(flops.check(config))
    print(flops.format_checks(checks))
    return 0


class UsageError(Exception):
    """A combination of options that cannot work."""


def _add_bench_data(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="time split preparation of a file and the training batch iterator",
        description=(
            "Prepare --source as enwik8-style byte splits in a temporary folder, printing "
            "the time and MB/s, then time --batches training batches from its train split."
        ),
    )
    parser.add_argument(
        "--source", type=Path, required=True, help="local text file (or zip, bz2, gz)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per batch")
    parser.add_argument(
        "--sequence-len", type=_positive_int, default=8192, help="tokens per sequence"
    )
    parser.add_argument(
        "--batches", type=_positive_int, default=200, help="batches to time (default: 200)"
    )
    parser.set_defaults(handler=_run_bench_data)


def _run_bench_data(args: argparse.Namespace) -> int:
    from tvq.bench import data

    data.run(args.source, args.batch_size, args.sequence_len, args.batches)
    return 0


def _add_config_options(parser, *, required: bool) -> None:
    parser.add_argument(
        "--config", type=Path, action="extend", nargs="+", required=required, metavar="FILE",
        help=(
            "YAML config files, merged in order so later ones win: a dataset file such as "
            "config/enwik8.yaml, then a preset overlay such as config/presets/cpu.yaml"
            + ("" if required else "; default: the run's WORKDIR/config.yaml")
        ),
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help=(
            "override one config key after the files, e.g. --set lr_max=1e-3; the value is "
            "read as YAML; repeat for several keys"
        ),
    )


def _add_distributed_options(parser) -> None:
    group = parser.add_argument_group(
        "multi-process jobs",
        "All three join this process to a JAX job of several processes, such as one per "
        "host. Without them the job spans several processes only where the environment "
        "says so: SLURM with more than one task, or TVQ_DISTRIBUTED=auto (set by "
        "tpu/launch.sh on TPU pod slices).",
    )
    group.add_argument(
        "--coordinator-address", metavar="HOST:PORT",
        help="address of process 0, where the job's coordinator listens",
    )
    group.add_argument("--num-processes", type=int, help="number of processes in the job")
    group.add_argument("--process-id", type=int, help="this process's number, from 0")


def _initialize_distributed(args: argparse.Namespace) -> None:
    from tvq.distributed import initialize

    initialize(args.coordinator_address, args.num_processes, args.process_id)


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model, resuming from the newest checkpoint in --workdir",
        description=(
            "Train to n_max_step steps. Writes WORKDIR/config.yaml (the resolved config), "
            "WORKDIR/metrics.jsonl, orbax checkpoints in WORKDIR/checkpoints (every "
            "n_save_step steps after a validation pass, keeping the newest n_save_keep and "
            "the best by validation loss) and, when the run is complete, "
            "WORKDIR/train_summary.json. A run found in WORKDIR is resumed from its newest "
            "checkpoint; SIGTERM or Ctrl-C saves a checkpoint before exiting (status 143 or "
            "130). A NaN or infinite loss stops the run with status 1 and saves nothing."
        ),
    )
    _add_config_options(parser, required=True)
    parser.add_argument(
        "--data-dir", type=Path, required=True,
        help="folder written by `tvq prepare` (train.npy, validation.npy, manifest.json)",
    )
    parser.add_argument(
        "--workdir", type=Path, required=True,
        help="folder for the run's checkpoints, metrics and resolved config",
    )
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")
    _add_distributed_options(parser)
    parser.set_defaults(handler=_run_train, handles_signals=True)


def _run_train(args: argparse.Namespace) -> int:
    from tvq.train.config import load_run_config
    from tvq.train.loop import train

    config = load_run_config(args.config, args.overrides)
    _initialize_distributed(args)
    train(config, args.data_dir, args.workdir, progress=not args.no_progress)
    return 0


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a split with the best checkpoint and write a result JSON",
        description=(
            "Score every token of a split once with the checkpoint of lowest validation "
            "loss in WORKDIR/checkpoints. The metric follows the data: bits per byte "
            "(enwik8, byte-level text), bits per dimension (imagenet64), or word- and "
            "token-level perplexity (pg19, SentencePiece text). The JSON also records the "
            "token, byte and word counts, checkpoint step, parameter count, sha256 of the "
            "split's token file, whether the input is the canonical dataset, and whether "
            "the evaluation was partial (--max-tokens)."
        ),
    )
    _add_config_options(parser, required=False)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder from `tvq prepare`")
    parser.add_argument(
        "--workdir", type=Path, required=True, help="the run's folder, as given to `tvq train`"
    )
    parser.add_argument(
        "--split", choices=("validation", "test"), default="test",
        help="split to score (default: test)",
    )
    parser.add_argument("--out", type=Path, required=True, help="result JSON file to write")
    parser.add_argument(
        "--max-tokens", type=_positive_int,
        help="score only the first N tokens; the JSON marks the result as partial",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_distributed_options(parser)
    parser.set_defaults(handler=_run_evaluate, handles_signals=True)


def _workdir_run_config(args: argparse.Namespace):
    """Return the config of --config and --set, or else the run's own WORKDIR/config.yaml."""
    from tvq.evaluation.evaluate import load_workdir_config
    from tvq.train.config import load_run_config

    if args.config:
        return load_run_config(args.config, args.overrides)
    if args.overrides:
        # Only keys that do not change the model can be overridden (eval_batch_size).
        return load_run_config([args.workdir / "config.yaml"], args.overrides)
    return load_workdir_config(args.workdir)


def _run_evaluate(args: argparse.Namespace) -> int:
    from tvq.evaluation.evaluate import evaluate

    config = _workdir_run_config(args)
    _initialize_distributed(args)
    result = evaluate(
        args.workdir, args.data_dir, args.split, args.out, config=config,
        max_tokens=args.max_tokens, progress=not args.no_progress,
    )
    print(f"{result['split']} {result['metric']}: {result['value']:.4f} (wrote {args.out})")
    return 0


def _add_sample(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate text or images from the best checkpoint",
        description=(
            "Generate tokens with the checkpoint of lowest validation loss in "
            "WORKDIR/checkpoints, decoding one token at a time: VQ attention keeps a state "
            "of fixed size, so every token costs the same, and full attention keeps a "
            "key/value cache. Each sample starts from the end-of-sequence id, then the "
            "prompt. --out receives the generated text of byte and SentencePiece datasets "
            "(without the prompt; several samples each under a header line), or for "
            "imagenet64 the prompt's and generated subpixel values, one image row per "
            "line; --png draws imagenet64 samples as a grid of 64x64 images."
        ),
    )
    _add_config_options(parser, required=False)
    parser.add_argument(
        "--data-dir", type=Path, required=True,
        help="folder from `tvq prepare`, whose manifest names the vocabulary",
    )
    parser.add_argument(
        "--workdir", type=Path, required=True, help="the run's folder, as given to `tvq train`"
    )
    parser.add_argument(
        "--num-tokens", type=int, required=True,
        help="tokens to generate per sample (at most 12,288 minus the prompt for imagenet64)",
    )
    parser.add_argument(
        "--prompt-file", type=Path,
        help=(
            "file whose contents continue the end-of-sequence id: raw bytes for byte "
            "vocabularies (subpixel values for imagenet64), UTF-8 text for SentencePiece"
        ),
    )
    parser.add_argument(
        "--num-samples", type=int, default=1,
        help="samples decoded together as one batch (default: 1)",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0,
        help="divide the logits by this before drawing; 0 takes the most likely token (default: 1)",
    )
    parser.add_argument(
        "--top-k", type=int, default=0,
        help="draw only from the K most likely tokens; 0 turns it off (default: 0)",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0,
        help=(
            "draw only from the most likely tokens whose probabilities sum to at least P, "
            "in (0, 1]; 1 turns it off (default: 1)"
        ),
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random draws (default: 0)"
    )
    parser.add_argument("--out", type=Path, required=True, help="text file to write")
    parser.add_argument(
        "--png", type=Path, help="imagenet64 only: also draw the samples into this PNG file"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_distributed_options(parser)
    parser.set_defaults(handler=_run_sample, handles_signals=True)


def _run_sample(args: argparse.Namespace) -> int:
    from tvq.sampling.sample import SamplingSettings, sample

    settings = SamplingSettings(
        num_tokens=args.num_tokens,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    problems = settings.errors()
    if problems:
        raise UsageError("; ".join(problems))
    config = _workdir_run_config(args)
    _initialize_distributed(args)
    summary = sample(
        args.workdir, args.data_dir, args.out, settings, config=config,
        prompt_file=args.prompt_file, png=args.png, progress=not args.no_progress,
    )
    written = args.out if args.png is None else f"{args.out} and {args.png}"
    print(
        f"wrote {written}: {summary['num_samples']} x {summary['generated_tokens']:,} tokens, "
        f"{1e3 * summary['seconds_per_token']:.2f} ms per token step (compilation included)"
    )
    return 0


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="run a result notebook with papermill and write it as .ipynb and HTML",
        description=(
            "Run a notebook of workflow/notebooks with papermill, in a kernel of this "
            "Python, and write the executed notebook and its HTML rendering. Figures go "
            "where the notebook's figures_dir parameter says. If a cell fails, nothing is "
            "written, and the one-line error names the notebook, the cell and the "
            "notebook's own message, such as the result file that is malformed."
        ),
    )
    parser.add_argument(
        "notebook", type=Path,
        help="notebook with a cell tagged 'parameters', such as workflow/notebooks/results.ipynb",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="path of the executed notebook (.ipynb)"
    )
    parser.add_argument(
        "--html", type=Path, help="path of the HTML rendering (default: --out with .html)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="parameters",
        help=(
            "set one notebook parameter; the value is read as YAML, so lists and mappings "
            "work, e.g. --set 'result_files=[results/enwik8/test_bpb.json]'; paths are "
            "relative to the current folder; repeat for several parameters"
        ),
    )
    parser.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    if args.out.suffix != ".ipynb":
        raise UsageError(f"--out {args.out} must end in .ipynb")

    import yaml

    from tvq.files import check_writable
    from tvq.report import ReportError
    from tvq.report.render import notebook_parameters, render_notebook

    html = args.html or args.out.with_suffix(".html")
    if Path(os.path.realpath(args.out)) == Path(os.path.realpath(html)):
        raise UsageError(f"--out and --html name the same file {args.out}; give two paths")
    # papermill logs every start and cell at INFO and a failure at ERROR; the outcome or
    # the one-line error is printed below instead.
    logging.getLogger("papermill").setLevel(logging.CRITICAL)
    try:
        declared = notebook_parameters(args.notebook)
        parameters = {}
        for item in args.parameters:
            key, separator, text = item.partition("=")
            if not separator or not key:
                raise UsageError(f"--set {item!r}: expected KEY=VALUE")
            if key not in declared:
                raise UsageError(
                    f"{args.notebook} has no parameter {key!r}; its parameters are "
                    f"{', '.join(declared) or 'none'}"
                )
            try:
                parameters[key] = yaml.safe_load(text)
            except yaml.YAMLError as error:
                reason = str(error).splitlines()[0]
                raise UsageError(f"--set {key}: the value is not valid YAML ({reason})") from None
        # Checked before the notebook runs, so that no output is moved into place and
        # then followed by a failure to write the next one.
        check_writable(args.out)
        check_writable(html)
        figures = render_notebook(args.notebook, args.out, html, parameters)
    except ReportError as error:
        print(f"tvq report: error: {error}", file=sys.stderr)
        return 1
    written = [str(args.out), str(html), *(str(path) for path in figures)]
    print(f"wrote {', '.join(written)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvq",
        description="Transformer-VQ: model, training and benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = subparsers.add_parser(
        "bench", help="benchmarks that print figures", description="Benchmarks that print figures."
    )
    bench_subparsers = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _add_bench_attention(bench_subparsers)
    _add_bench_throughput(bench_subparsers)
    _add_bench_sampling(bench_subparsers)
    _add_bench_flops(bench_subparsers)
    _add_bench_data(bench_subparsers)
    _add_prepare(subparsers)
    _add_vocab(subparsers)
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_sample(subparsers)
    _add_report(subparsers)
    return parser


def _stop_on_signal(signum, frame) -> None:
    from tvq.files import STOP_SIGNALS

    STOP_SIGNALS.append(signum)
    # SystemExit and KeyboardInterrupt unwind like exceptions, so staging folders and
    # partial files are cleaned up by the same code that handles errors.
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _record_signal(signum, frame) -> None:
    from tvq.files import STOP_SIGNALS

    STOP_SIGNALS.append(signum)


def _exit_at_once(code: int) -> None:
    """Exit without running the interpreter's shutdown, which can crash while XLA's
    threads are still compiling or running; outputs are already cleaned up or kept."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand.

    Exit status: 0 on success, 1 for bad input data or config, 2 for bad options, 130 on
    Ctrl-C and 143 on SIGTERM. Known errors print one line, without a traceback.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    # JAX logs at INFO which backends it could not find (TPU, GPU) on every start.
    logging.getLogger("jax").setLevel(logging.WARNING)
    # Orbax reports every save and restore step at INFO through absl.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # train and evaluate handle signals between steps themselves; until they start, the
    # default action ends the process before anything is written.
    handles_signals = getattr(args, "handles_signals", False)
    if handles_signals:
        # Recorded until the command's own handler takes over, which stops at its first
        # check: an exception raised this early could land in a JAX callback and be lost.
        signal.signal(signal.SIGTERM, _record_signal)
        signal.signal(signal.SIGINT, _record_signal)
    else:
        signal.signal(signal.SIGTERM, _stop_on_signal)
        signal.signal(signal.SIGINT, _stop_on_signal)

    name = " ".join(filter(None, [args.command, getattr(args, "benchmark", None)]))
    try:
        code = _run_handler(args, name)
    except SystemExit as exit_request:
        if handles_signals or not _stop_signals():
            raise
        code = exit_request.code if isinstance(exit_request.code, int) else 1
    if handles_signals:
        return code
    # A signal whose exception was lost still ends the command with its status.
    stop_signals = _stop_signals()
    if stop_signals and code == 0:
        code = 128 + stop_signals[0]
    if stop_signals:
        if stop_signals[0] == signal.SIGTERM:
            print(f"tvq {name}: terminated", file=sys.stderr)
        _exit_at_once(code)
    return code


def _stop_signals() -> list[int]:
    from tvq.files import STOP_SIGNALS

    return STOP_SIGNALS


def _run_handler(args: argparse.Namespace, name: str) -> int:
    """Run the subcommand's handler; print known errors in one line and return a status."""
    from tvq.data.errors import DataError
    from tvq.model.config import ConfigError
    from tvq.train.errors import CheckpointError, TrainingError

    prefix = f"tvq {name}: error:"
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"{prefix} {error}", file=sys.stderr)
        return 2
    except (DataError, ConfigError, CheckpointError, TrainingError) as error:
        print(f"{prefix} {error}", file=sys.stderr)
        return 1
    except OSError as error:
        target = f" {error.filename}" if error.filename else ""
        print(f"{prefix} {error.strerror or error}{target}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tvq {name}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as error:
        print(f"{prefix} out of memory ({error}); {_memory_advice(args)}", file=sys.stderr)
        return 1
    except Exception as error:
        # XLA reports an allocation that does not fit as a runtime error, and the CPU
        # backend as "Out of memory".
        if "RESOURCE_EXHAUSTED" not in str(error) and "Out of memory" not in str(error):
            raise
        reason = str(error).strip().splitlines()[0][:300]
        print(f"{prefix} out of memory ({reason}); {_memory_advice(args)}", file=sys.stderr)
        return 1


def _memory_advice(args: argparse.Namespace) -> str:
    if args.command == "sample":
        return "lower --num-samples, or --num-tokens with full attention"
    return "lower global_batch_size, sequence_len or the model size, or set remat: full"


if __name__ == "__main__":
    sys.exit(main())

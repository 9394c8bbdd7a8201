"""The `tvq` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tvq.model.config import ATTN_TYPES, DTYPES, HEAD_TYPES


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


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
        help="side of the square float32 matmul that sets the ceiling (default: 4096)",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``nonlocalnet <command>`` (also ``python -m nonlocalnet``).

Each handler parses nothing itself and calls one library function.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from . import __version__
from .attention import IMPLS, MODES
from .bench import SHAPES


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = bench.parse_shape(args.shape)
    env = bench.environment(device)
    roof = bench.matmul_rate(device, dtype)
    print(f"nonlocalnet {__version__}: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"input {tuple(shape)} {args.dtype} on {device}; matmul roof {roof:.0f} GFLOP/s (2048^2)")
    reports = bench.compare_block_impls(
        shape, args.modes, args.impls, repeats=args.repeats, device=device, dtype=dtype,
        backward=not args.forward_only, seed=args.seed,
    )
    print(_bench_table(reports, bench))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "shape": shape, "roof_gflops": roof, "reports": [_as_dict(r) for r in reports]}, f, indent=1)
    return 0


def _bench_table(reports, bench) -> str:
    head = (f"{'mode':<18} {'impl':<8} {'fwd':>9} {'GFLOP/s':>8} {'fwd mem':>9} {'fwd+bwd':>9} {'GFLOP/s':>8} "
            f"{'train mem':>10} {'err out':>8} {'err grad':>8}")
    lines = [head, "-" * len(head)]
    for report in reports:
        for r in report.results:
            rates = [r.rate(False), r.rate(True)]
            rates = ["n/a" if v is None else f"{v:.0f}" for v in rates]
            lines.append(
                f"{report.mode:<18} {r.name:<8} {bench.format_seconds(r.forward_s):>9} {rates[0]:>8} "
                f"{bench.format_bytes(r.forward_bytes):>9} {bench.format_seconds(r.train_s):>9} {rates[1]:>8} "
                f"{bench.format_bytes(r.train_bytes):>10} {r.output_error:>8.1e} {r.grad_error:>8.1e}"
            )
    lines.append("err: max relative error of the output and the input gradient against the naive form in float64")
    return "\n".join(lines)


def _as_dict(report) -> dict:
    return {"mode": report.mode, "results": [vars(r) for r in report.results]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nonlocalnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nonlocalnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("bench", help="time and check the block's fast paths against the naive reference")
    p.add_argument("--shape", default="res4", help=f"{' | '.join(SHAPES)}, or sizes 'B,C,T,H,W' (default res4)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--impls", nargs="+", default=["auto", "naive"], choices=IMPLS,
                   help="attention implementations to time (default: auto naive)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is shown")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--forward-only", action="store_true", help="skip the training step (forward + backward)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as err:  # bad arguments reach the user as one line, not a traceback
        print(f"nonlocalnet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

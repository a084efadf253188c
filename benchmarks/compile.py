"""Eager against torch.compile (inductor) for the non-local block in every mode and for a zoo model:
compile time, forward (eval, no_grad) and training step (forward + backward) times, and the
largest difference of the outputs.

    python benchmarks/compile.py --out benchmarks/results-compile-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from nonlocalnet import NonLocalBlock, __version__
from nonlocalnet.bench import randomize_
from nonlocalnet.models import create_model

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(module, x, repeats: int, train: bool) -> dict:
    compiled = torch.compile(module)
    row = {}
    with torch.no_grad():
        module.eval()
        eager_out = module(x)
        start = time.perf_counter()
        compiled_out = compiled(x)
        row["compile_fwd_s"] = time.perf_counter() - start
        row["max_abs_diff"] = float((compiled_out - eager_out).abs().max())
        row["eager_fwd_s"] = _median_time(lambda: module(x), repeats)
        row["compiled_fwd_s"] = _median_time(lambda: compiled(x), repeats)
    if train:
        module.train()
        grad = torch.randn_like(eager_out)
        inp = x.detach().requires_grad_()

        def step(fn):
            out = fn(inp)
            out.backward(grad)

        start = time.perf_counter()
        step(compiled)
        row["compile_train_s"] = time.perf_counter() - start
        row["eager_train_s"] = _median_time(lambda: step(module), repeats)
        row["compiled_train_s"] = _median_time(lambda: step(compiled), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2,1024,8,14,14", help="block input B,C,T,H,W (default res4)")
    parser.add_argument("--model", default="i3d_nl5_r50_8x8")
    parser.add_argument("--clip", default="1,3,8,112,112")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = [int(v) for v in args.shape.split(",")]
    results = {"env": {"torch": torch.__version__, "nonlocalnet": __version__, "python": platform.python_version(),
                       "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()},
               "block_shape": shape, "rows": []}
    print(f"{'case':<28} {'compile s':>9} {'eager fwd':>10} {'comp fwd':>10} {'eager train':>12} "
          f"{'comp train':>11} {'max diff':>9}")
    for mode in MODES:
        block = randomize_(NonLocalBlock(shape[1], mode=mode))
        row = {"case": f"block {mode}", **measure(block, torch.randn(*shape), args.repeats, train=True)}
        results["rows"].append(row)
        _print(row)
    model = create_model(args.model, num_classes=400)
    for block in (m for m in model.modules() if isinstance(m, NonLocalBlock)):
        randomize_(block)
    clip = torch.randn(*[int(v) for v in args.clip.split(",")])
    row = {"case": f"{args.model} fwd", **measure(model, clip, max(2, args.repeats // 2), train=False)}
    results["rows"].append(row)
    _print(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def _print(row: dict) -> None:
    def ms(key):
        return f"{1e3 * row[key]:.1f} ms" if key in row else "-"

    print(f"{row['case']:<28} {row['compile_fwd_s'] + row.get('compile_train_s', 0):>9.1f} {ms('eager_fwd_s'):>10} "
          f"{ms('compiled_fwd_s'):>10} {ms('eager_train_s'):>12} {ms('compiled_train_s'):>11} "
          f"{row['max_abs_diff']:>9.1e}")


if __name__ == "__main__":
    main()

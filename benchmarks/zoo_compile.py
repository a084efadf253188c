"""Every zoo model under torch.compile (inductor) against eager: the largest relative difference of
the logits on a random clip, the compile time and the eager / compiled forward times.

    python benchmarks/zoo_compile.py --out benchmarks/results-zoo-compile-cpu.json [--pattern 'i3d*']

The clip is small (1 x 3 x T x 64 x 64, T = two temporal strides of the model) so that the sweep
runs on a CPU; the non-local blocks get random weights (BN scales nonzero) so that they matter.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nonlocalnet import NonLocalBlock
from nonlocalnet.bench import randomize_
from nonlocalnet.export import temporal_stride
from nonlocalnet.models import create_model, list_models


def check(name: str, size: int) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes=400).eval()
    for block in (m for m in model.modules() if isinstance(m, NonLocalBlock)):
        randomize_(block)
    clip = torch.randn(1, 3, 2 * temporal_stride(model), size, size)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        start = time.perf_counter()
        eager = model(clip)
        eager_s = time.perf_counter() - start
        start = time.perf_counter()
        got = compiled(clip)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled(clip)
        compiled_s = time.perf_counter() - start
    error = float((got - eager).norm() / eager.norm())
    return {"model": name, "clip": list(clip.shape), "rel_error": error, "compile_s": compile_s,
            "eager_fwd_s": eager_s, "compiled_fwd_s": compiled_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", help="shell pattern of zoo names (default: all)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for name in list_models(args.pattern):
        row = check(name, args.size)
        rows.append(row)
        print(f"{name:<22} clip {'x'.join(map(str, row['clip'])):<14} rel error {row['rel_error']:.1e}  compile "
              f"{row['compile_s']:.1f} s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    worst = max(rows, key=lambda r: r["rel_error"])
    print(f"{len(rows)} models; largest relative difference {worst['rel_error']:.1e} ({worst['model']})")


if __name__ == "__main__":
    main()

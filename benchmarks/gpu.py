"""GPU benchmarks: the block table on CUDA and the training throughput of NL I3D R50 32x2 against the
same network built with pytorchvideo's block.

    pip install -e '.[bench]'
    python benchmarks/gpu.py --out benchmarks/results-gpu     # writes results-gpu-*.json, prints tables

1. The block table of ``benchmarks/block.py`` (every mode; ours, the naive reference,
   pytorchvideo; forward and forward + backward; peak memory from torch.cuda.max_memory_allocated)
   in float32 and bfloat16 for the res2-res5 inputs and the long clips ``long32`` (1x256x32x56x56)
   and ``long64`` (1x256x64x56x56), each case in its own process, with the fraction of the GPU's
   measured matmul rate (2048^2 GEMM of the same dtype) that each case reaches.
2. Training throughput (clips/s, median over timed steps) and peak memory of ``i3d_nl5_r50`` (32x2,
   224^2 clips, SGD step, bf16 autocast) with our blocks and with pytorchvideo's ``create_nonlocal``
   blocks in the same places (softmax, C' = C/2, keys pooled (1,2,2)).

``--device cpu --quick`` runs every code path on tiny inputs (a check of the script, not a result).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from nonlocalnet import NonLocalBlock, bench
from nonlocalnet.models import ResNet3d, create_model

HERE = Path(__file__).resolve().parent
SIZES = ["res2", "res3", "res4", "res5", "long32", "long64"]


def block_tables(args: argparse.Namespace) -> dict:
    """Run block.py per dtype; returns {dtype: its JSON}."""
    found = {}
    sizes = ["small"] if args.quick else SIZES
    for dtype in args.dtypes:
        out = f"{args.out}-block-{dtype}.json"
        command = [sys.executable, str(HERE / "block.py"), "--device", args.device, "--dtype", dtype, "--sizes",
                   *sizes, "--impls", "ours", "naive", "pytorchvideo", "--rounds", str(args.rounds), "--out", out]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
        found[dtype] = json.loads(Path(out).read_text())
    return found


def roof_fractions(table: dict) -> list[str]:
    """Markdown rows: each case's executed GFLOP/s as a fraction of the measured matmul rate."""
    roof = max(table["roof_gflops"])
    rows = []
    for r in table["results"]:
        if "error" in r or r["dims"] != 3:
            continue
        forward = r["forward_flops"] / r["forward_s"] / 1e9
        train = r["train_flops"] / r["train_s"] / 1e9 if r.get("train_s") else float("nan")
        rows.append(f"| {r['size']} | {r['mode']} | {r['impl']} | {forward:.0f} ({100 * forward / roof:.0f}%) | "
                    f"{train:.0f} ({100 * train / roof:.0f}%) |")
    return rows


def with_pytorchvideo_blocks(model: ResNet3d) -> ResNet3d:
    """The same network with each NonLocalBlock replaced by pytorchvideo's (softmax, C' = C/2)."""
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    for module in model.modules():
        block = getattr(module, "nonlocal_block", None)
        if isinstance(block, NonLocalBlock):
            module.nonlocal_block = create_nonlocal(dim_in=block.in_channels, dim_inner=block.inner_channels,
                                                    pool_size=(1, 2, 2), instantiation="softmax")
    return model


def train_throughput(model: nn.Module, clip_shape, device: torch.device, steps: int, amp: bool) -> dict:
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    clips = torch.randn(*clip_shape, device=device)
    labels = torch.randint(0, 400, (clip_shape[0],), device=device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps + 2):  # two warm-up steps
        bench.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(clips).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bench.synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"clips_per_s": clip_shape[0] / seconds, "step_s": seconds, "peak_bytes": peak}


def network_rows(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for name, build in (("nonlocalnet", lambda m: m), ("pytorchvideo", with_pytorchvideo_blocks)):
        torch.manual_seed(0)
        if args.quick:
            model = ResNet3d(50, "3x1x1", "32x2", nonlocal_blocks={"res3": [1], "res4": [1]}, width=8,
                             stage_blocks=[1, 2, 2, 1])
            shape = (2, 3, 8, 64, 64)
        else:
            model = create_model("i3d_nl5_r50", num_classes=400)
            shape = (args.batch, 3, 32, 224, 224)
        model = build(model)
        result = train_throughput(model, shape, device, args.steps, amp=device.type == "cuda")
        rows.append({"blocks": name, "clip": list(shape), **result})
        print(f"{name}: {result['clips_per_s']:.2f} clips/s, peak {bench.format_bytes(result['peak_bytes'])}",
              flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="clips per training step (default 8, as per GPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--skip-blocks", action="store_true", help="only the network throughput")
    parser.add_argument("--quick", action="store_true", help="tiny inputs: check the script")
    parser.add_argument("--out", default=str(HERE / "results-gpu"))
    args = parser.parse_args()
    device = torch.device(args.device)
    env = bench.environment(device)
    tables = {} if args.skip_blocks else block_tables(args)
    networks = network_rows(args)
    Path(f"{args.out}-network.json").write_text(json.dumps({"env": env, "rows": networks}, indent=1))
    for dtype, table in tables.items():
        print(f"\nFraction of the measured {dtype} matmul rate ({max(table['roof_gflops']):.0f} GFLOP/s):")
        print("| input | mode | implementation | fwd GFLOP/s | fwd+bwd GFLOP/s |\n| --- | --- | --- | ---: | ---: |")
        print("\n".join(roof_fractions(table)))
    print("\n| blocks | clip | clips/s | step | peak memory |\n| --- | --- | ---: | ---: | ---: |")
    for row in networks:
        print(f"| {row['blocks']} | {'x'.join(map(str, row['clip']))} | {row['clips_per_s']:.2f} | "
              f"{bench.format_seconds(row['step_s'])} | {bench.format_bytes(row['peak_bytes'])} |")


if __name__ == "__main__":
    main()

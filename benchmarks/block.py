"""The non-local block side by side with the peer implementations, one process per case.

    pip install -e '.[bench]'
    python benchmarks/block.py                        # CPU, fp32: res4, res3, res2-size; all modes
    python benchmarks/block.py --device cuda --dtype bfloat16 --out gpu-bf16.json

Each case (input size x mode x implementation) runs in a fresh Python process so that its peak
memory is its own: timing first (median of --repeats runs after one warm-up), then executed FLOPs
(our counter, which sees the CPU flash kernels), then the peak extra memory of an inference
forward and of a training step (forward + backward into the input and all parameters, train-mode
BatchNorm). Cases are run in rounds, interleaving the implementations, and the median over rounds
is reported, so that a slow spell of a shared machine does not land on one implementation.

Implementations: ``ours`` (NonLocalBlock, impl="auto"), ``naive`` (impl="naive", which
materialises the affinity), pytorchvideo ``create_nonlocal`` (softmax and dot product),
mmcv ``NonLocal3d`` (all four modes, BN3d), and timm ``NonLocalAttn`` (2-D, embedded Gaussian,
no subsampling), which is compared with ours on the same frames as a (B*T, C, H, W) batch.
``ours_fold`` / ``ours_nofold`` force the exact projection folding of ``NonLocalBlock(fold=...)``
on or off, to compare it with the default choice (``--impls ours ours_fold ours_nofold``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings

import torch
import torch.nn as nn

from nonlocalnet import NonLocalBlock
from nonlocalnet import bench

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
IMPLS = ("ours", "naive", "pytorchvideo", "mmcv", "timm")
# Our block with the projection folding forced on or off (default: chosen by counted work).
VARIANTS = {"ours": None, "ours_fold": True, "ours_nofold": False}
REPEATS = {"res4": 5, "res3": 3, "res2": 1}  # --sizes default; also res5 (5 repeats) and small


def build(impl: str, mode: str, channels: int, dims: int) -> nn.Module | None:
    """The implementation's block with the paper's settings (C' = C/2, keys pooled (1,2,2) in 3-D,
    1/sqrt(C') logit scale, BatchNorm after W_z), or None when it lacks this mode or dims."""
    if not supports(impl, mode, dims):
        return None
    if impl == "naive":
        return NonLocalBlock(channels, mode=mode, dims=dims, subsample=dims == 3, impl="naive")
    if impl in VARIANTS:
        return NonLocalBlock(channels, mode=mode, dims=dims, subsample=dims == 3, fold=VARIANTS[impl])
    if impl == "pytorchvideo":
        from pytorchvideo.layers.nonlocal_net import create_nonlocal

        kind = "softmax" if mode == "embedded_gaussian" else "dot_product"
        return create_nonlocal(dim_in=channels, dim_inner=channels // 2, pool_size=(1, 2, 2), instantiation=kind)
    if impl == "mmcv":
        from mmcv.cnn.bricks.non_local import NonLocal3d

        return NonLocal3d(channels, sub_sample=True, mode=mode, norm_cfg=dict(type="BN3d"))
    from timm.layers.non_local_attn import NonLocalAttn

    return NonLocalAttn(channels, rd_channels=channels // 2)


def case_shape(size: str, dims: int) -> tuple[int, ...]:
    B, C, T, H, W = bench.SHAPES[size]
    return (B, C, T, H, W) if dims == 3 else (B * T, C, H, W)


def run_case(size: str, dims: int, mode: str, impl: str, repeats: int, device: str, dtype: str) -> dict:
    """Measure one case in this process and return it as a dict (called in the child process)."""
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    shape = case_shape(size, dims)
    module = build(impl, mode, shape[1], dims)
    bench.randomize_(module)  # random weights everywhere: no implementation meets a zero branch
    module.to(device=device, dtype=getattr(torch, dtype))
    x = torch.randn(shape, device=device, dtype=getattr(torch, dtype))
    train_error = None
    try:
        result = bench.measure(impl, module, x, repeats=repeats)
    except RuntimeError as err:  # e.g. mmcv's concatenation mode cannot run its backward
        train_error = str(err).splitlines()[0]
        result = bench.measure(impl, module, x, repeats=repeats, backward=False)
    bench.measure_memory(result, module, x)
    return dict(vars(result), train_error=train_error)


def _child(args: argparse.Namespace, size: str, dims: int, mode: str, impl: str, repeats: int) -> dict | None:
    command = [
        sys.executable, __file__, "--case", size, str(dims), mode, impl, str(repeats),
        "--device", args.device, "--dtype", args.dtype,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {size} {dims}-D {mode} {impl}: failed: {tail}", file=sys.stderr)
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cases(args: argparse.Namespace):
    for size in args.sizes:
        for dims in (3, 2):
            for mode in args.modes:
                impls = [i for i in args.impls if supports(i, mode, dims)]
                if dims == 2 and "timm" not in impls:
                    continue  # 2-D only to meet timm
                for impl in impls:
                    yield size, dims, mode, impl


def supports(impl: str, mode: str, dims: int) -> bool:
    """Whether ``impl`` has this mode in this many dims (ours and the naive form have all)."""
    if impl == "naive" or impl in VARIANTS:
        return True
    return {
        "pytorchvideo": dims == 3 and mode in ("embedded_gaussian", "dot_product"),
        "mmcv": dims == 3,
        "timm": dims == 2 and mode == "embedded_gaussian",
    }[impl]


def _merge(rounds: list[dict]) -> dict:
    good = [r for r in rounds if r and "error" not in r]
    if not good:
        return rounds[0]
    merged = dict(good[0])
    for key in ("forward_s", "train_s"):
        values = [r[key] for r in good if r[key] is not None]
        merged[key] = statistics.median(values) if values else None
    for key in ("forward_bytes", "train_bytes"):
        values = [r[key] for r in good if r[key] is not None]
        merged[key] = max(values) if values else None
    return merged


def _markdown(results: list[dict], roof: float) -> str:
    lines = [
        "| input | mode | implementation | fwd | fwd GFLOP/s | fwd extra mem | fwd+bwd | fwd+bwd GFLOP/s | fwd+bwd extra mem |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        label = f"{r['size']}" + (" 2-D" if r["dims"] == 2 else "")
        if "error" in r:
            lines.append(f"| {label} | {r['mode']} | {r['impl']} | failed: {r['error'][:60]} | | | | | |")
            continue
        f_rate = r["forward_flops"] / r["forward_s"] / 1e9
        train = f"failed: {r['train_error'][:50]} | –" if r.get("train_error") else (
            f"{bench.format_seconds(r['train_s'])} | {r['train_flops'] / r['train_s'] / 1e9:.0f}"
        )
        lines.append(
            f"| {label} | {r['mode']} | {r['impl']} | {bench.format_seconds(r['forward_s'])} | {f_rate:.0f} | "
            f"{bench.format_bytes(r['forward_bytes'])} | {train} | {bench.format_bytes(r['train_bytes'])} |"
        )
    lines.append(f"\nMachine matmul roof (2048² {results[0].get('dtype', '')}): {_roofs(roof)}.")
    return "\n".join(lines)


def _roofs(roof: dict) -> str:
    text = f"{roof['torch']:.0f} GFLOP/s through torch.mm"
    return text + (f", {roof['onednn']:.0f} GFLOP/s through oneDNN" if roof.get("onednn") else "")


def _speedups(results: list[dict]) -> str:
    lines = ["| input | mode | ours fwd | fastest peer fwd | ratio | ours fwd+bwd | fastest peer fwd+bwd | ratio |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    keyed = {(r["size"], r["dims"], r["mode"], r["impl"]): r for r in results if "error" not in r}
    for (size, dims, mode, impl), ours in keyed.items():
        if impl != "ours":
            continue
        peers = [r for (s, d, m, i), r in keyed.items() if (s, d, m) == (size, dims, mode) and i not in VARIANTS and i != "naive"]
        naive = keyed.get((size, dims, mode, "naive"))
        for label, others in (("peer", peers), ("naive", [naive] if naive else [])):
            if not others:
                continue
            fwd = min(others, key=lambda r: r["forward_s"])
            trained = [r for r in others if r["train_s"] is not None]
            train_cells = "n/a (no peer trains) | |"
            if trained:
                train = min(trained, key=lambda r: r["train_s"])
                train_cells = (f"{bench.format_seconds(train['train_s'])} ({train['impl']}) | "
                               f"{train['train_s'] / ours['train_s']:.2f}x")
            name = f"{size}{' 2-D' if dims == 2 else ''}"
            lines.append(
                f"| {name} | {mode} vs {label} | {bench.format_seconds(ours['forward_s'])} | "
                f"{bench.format_seconds(fwd['forward_s'])} ({fwd['impl']}) | {fwd['forward_s'] / ours['forward_s']:.2f}x | "
                f"{bench.format_seconds(ours['train_s'])} | {train_cells} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(REPEATS), choices=list(bench.SHAPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS + tuple(VARIANTS)[1:])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/block-results.json")
    parser.add_argument("--case", nargs=5, metavar=("SIZE", "DIMS", "MODE", "IMPL", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        size, dims, mode, impl, repeats = args.case
        print(json.dumps(run_case(size, int(dims), mode, impl, int(repeats), args.device, args.dtype)))
        return

    device = torch.device(args.device)
    env = bench.environment(device)
    env.update(_peer_versions())
    roof = bench.matmul_rates(device, getattr(torch, args.dtype))
    print(json.dumps(env), f"matmul roof: {_roofs(roof)}", flush=True)
    cases = list(_cases(args))
    rounds: dict[tuple, list] = {case: [] for case in cases}
    for round_index in range(args.rounds):
        for case in cases:
            size = case[0]
            result = _child(args, *case, REPEATS.get(size, 5))
            rounds[case].append(result)
            if result and "error" not in result:
                print(f"round {round_index + 1}: {case} fwd {result['forward_s']:.4f} s, "
                      f"fwd+bwd {result['train_s'] or float('nan'):.4f} s", flush=True)
    results = [dict(_merge(rs), size=c[0], dims=c[1], mode=c[2], impl=c[3], dtype=args.dtype) for c, rs in rounds.items()]
    roof_after = bench.matmul_rates(device, getattr(torch, args.dtype))
    with open(args.out, "w") as f:
        json.dump({"env": env, "roof_gflops": [roof, roof_after], "results": results}, f, indent=1)
    print(_markdown(results, roof))
    print(f"(roof measured again after the run: {_roofs(roof_after)})\n")
    print(_speedups(results))


def _peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("nonlocalnet", "pytorchvideo", "mmcv-lite", "mmengine", "timm"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


if __name__ == "__main__":
    main()

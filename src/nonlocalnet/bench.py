"""Timing, memory and FLOP-rate measurement of non-local blocks (``nonlocalnet bench``).

The same helpers drive ``benchmarks/block.py``, which adds the peer implementations. Times are
medians of repeated runs after a warm-up; memory is the peak above the level before the call
(CUDA: allocator peak; CPU: the process's peak resident set, reset through /proc on Linux).
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .block import NonLocalBlock
from .flops import count_flops

# Paper res4, res3 and res5 inputs of an 8-frame ResNet-50 (Table 1, 8 x 224^2 clips, batch 2)
# and a res2-size input (16 frames at 56^2), the sizes where implementations part ways.
SHAPES = {
    # ResNet-50 channels and map sizes of res3 / res4 / res5 with 8 frames, batch 2 (the paper's 32x2 models
    # have 4 frames there), and a 16-frame res2
    "res4": (2, 1024, 8, 14, 14),
    "res3": (2, 512, 8, 28, 28),
    "res2": (1, 256, 16, 56, 56),
    "res5": (2, 2048, 8, 7, 7),
    "small": (2, 256, 4, 14, 14),
    "long32": (1, 256, 32, 56, 56),  # long clips at res2 size (benchmarks/gpu.py)
    "long64": (1, 256, 64, 56, 56),
}


def parse_shape(text: str) -> tuple[int, ...]:
    """A named shape from ``SHAPES`` or comma-separated sizes such as ``2,512,8,28,28``."""
    if text in SHAPES:
        return SHAPES[text]
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not 3 <= len(shape) <= 5 or min(shape) < 1:
        raise ValueError(f"shape: expected one of {sorted(SHAPES)} or 3-5 positive sizes 'B,C,...', got {text!r}")
    return shape


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _return_freed_memory_to_os() -> bool:
    """Make glibc hand large freed blocks back at once, so the resident set follows the tensors.

    By default glibc raises its mmap threshold after large frees and keeps the memory, so a second
    call would show no growth. This changes the process's allocator for good: call it only after
    all timing is done.
    """
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 16) and libc.mallopt(m_trim_threshold, 1 << 16)
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes ``fn()`` allocates above the level before it, or None where it cannot be read.

    On CPU this switches the allocator as :func:`_return_freed_memory_to_os` says: time first.
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not (_return_freed_memory_to_os() and _reset_rss_peak()):
        return None
    base = _rss_now_bytes()
    fn()
    peak = _rss_peak_bytes()
    return None if peak is None else max(0, peak - base)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5,
                library: str = "torch") -> float | None:
    """The machine's measured square-matmul rate in GFLOP/s, the roof the blocks are judged by.

    ``library="torch"``: ``torch.mm`` (on CPU the BLAS PyTorch was built with); ``"onednn"``: the
    oneDNN product our CPU kernels call (:mod:`nonlocalnet._gemm`), None where it does not serve.
    """
    from . import _gemm

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if library == "onednn" and not _gemm.uses_onednn(a, b):
        return None
    product = _gemm.mm if library == "onednn" else torch.mm
    seconds = median_time(lambda: product(a, b), device, repeats)
    return 2 * n**3 / seconds / 1e9


def matmul_rates(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float | None]:
    """:func:`matmul_rate` through ``torch.mm`` and through oneDNN, keyed ``"torch"``, ``"onednn"``."""
    return {library: matmul_rate(device, dtype, library=library) for library in ("torch", "onednn")}


@dataclass
class CaseResult:
    """One implementation at one input: medians in seconds, extra peak bytes, executed FLOPs."""

    name: str
    forward_s: float | None
    train_s: float | None
    forward_bytes: int | None
    train_bytes: int | None
    forward_flops: int
    train_flops: int | None
    output_error: float | None = None
    grad_error: float | None = None

    def rate(self, train: bool) -> float | None:
        seconds, flops = (self.train_s, self.train_flops) if train else (self.forward_s, self.forward_flops)
        return None if seconds is None or flops is None else flops / seconds / 1e9


def _steps(module: torch.nn.Module, x: torch.Tensor, backward: bool):
    """Inference forward, and a training step: forward + backward with a random upstream gradient
    into the input and every parameter (the module stays in train mode, as in training)."""
    x = x.detach().requires_grad_(backward)
    grad = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            return module(x)

    def train_step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return forward, train_step


def measure(
    name: str, module: torch.nn.Module, x: torch.Tensor, *, repeats: int = 3, backward: bool = True
) -> CaseResult:
    """Median time and executed FLOPs of ``module(x)`` and of a training step on it; the memory
    fields are filled by :func:`measure_memory`, which must run after all timing."""
    forward, train_step = _steps(module, x, backward)
    fwd_s = median_time(forward, x.device, repeats)
    fwd_flops = count_flops(forward)
    train_s = train_flops = None
    if backward:
        train_s = median_time(train_step, x.device, repeats)
        train_flops = count_flops(train_step)
    return CaseResult(name, fwd_s, train_s, None, None, fwd_flops, train_flops)


def measure_memory(result: CaseResult, module: torch.nn.Module, x: torch.Tensor) -> CaseResult:
    """Fill the peak extra memory of the forward and of the training step into ``result``."""
    forward, train_step = _steps(module, x, result.train_s is not None)
    result.forward_bytes = peak_memory(forward, x.device)
    if result.train_s is not None:
        result.train_bytes = peak_memory(train_step, x.device)
    return result


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _output_and_input_grad(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad


def errors_against(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, expected) -> tuple[float, float]:
    """Relative error of ``module``'s output and input gradient (upstream ``grad``) against the
    ``expected`` pair, e.g. the float64 reference's from :func:`_output_and_input_grad`."""
    y, dx = _output_and_input_grad(module, x, grad)
    return relative_error(y, expected[0]), relative_error(dx, expected[1])


def environment(device: torch.device) -> dict:
    """Machine and library versions to print beside any table of numbers."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = f"{names[0]} ({len(names)} logical cores)"
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_seconds(s: float | None) -> str:
    return "n/a" if s is None else (f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms")


def randomize_(module: torch.nn.Module, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Give every parameter random values (std 0.05; norm scales around 1) so that a comparison of
    two implementations is not trivially exact, as it would be with the zero-initialised norm."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
            p.copy_(1 + 0.1 * noise if name == "norm.weight" else 0.05 * noise)
    return module


@dataclass
class ModeReport:
    """The implementations of one mode, measured on the same input with the same weights."""

    mode: str
    results: list[CaseResult]


def compare_block_impls(
    shape: tuple[int, ...],
    modes: list[str],
    impls: list[str],
    *,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
    seed: int = 0,
) -> list[ModeReport]:
    """Measure ``NonLocalBlock`` for each mode with each attention ``impl`` on a random input.

    All implementations of a mode share one set of random weights, and each is checked against
    the naive reference run in float64 (output and input gradient).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    reports = []
    for mode in modes:
        base = randomize_(NonLocalBlock(shape[1], mode=mode, dims=len(shape) - 2), generator)
        blocks = []
        for impl in impls:
            block = NonLocalBlock(shape[1], mode=mode, dims=len(shape) - 2, impl=impl)
            block.load_state_dict(base.state_dict())
            blocks.append(block.to(device=device, dtype=dtype))
        results = [measure(impl, b, x, repeats=repeats, backward=backward) for impl, b in zip(impls, blocks)]
        reference = NonLocalBlock(shape[1], mode=mode, dims=len(shape) - 2, impl="naive")
        reference.load_state_dict(base.state_dict())
        grad = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        expected = _output_and_input_grad(reference.to(device, torch.float64), x.double(), grad.double())
        for result, block in zip(results, blocks):  # the float64 reference runs once per mode
            result.output_error, result.grad_error = errors_against(block, x, grad, expected)
        reports.append((ModeReport(mode, results), blocks))
    for report, blocks in reports:  # after all timing: measuring memory changes the allocator
        for result, block in zip(report.results, blocks):
            measure_memory(result, block, x)
    return [report for report, _ in reports]

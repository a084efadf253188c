"""FLOP counting against hand computations, and the command line run in-process."""

import json
import subprocess
import sys

import pytest
import torch

from nonlocalnet import NonLocalBlock
from nonlocalnet.cli import main
from nonlocalnet.flops import count_flops


def _block_forward_flops(B, C, inner, N, M, mode):
    """Multiply-adds x 2 of the paper's block: 1x1 convs and the two attention products."""
    theta_phi = 0 if mode == "gaussian" else N * C * inner + M * C * inner
    width = C if mode == "gaussian" else inner  # gaussian dots x itself
    return 2 * B * (theta_phi + M * C * inner + N * M * width + N * M * inner + N * inner * C)


@pytest.mark.parametrize("impl", ["auto", "naive"])
@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian"])
def test_softmax_block_flops_match_hand_count(mode, impl):
    B, C, T, H, W = 2, 16, 3, 6, 8
    block = NonLocalBlock(C, mode=mode, impl=impl)
    x = torch.randn(B, C, T, H, W)
    N, M = T * H * W, T * (H // 2) * (W // 2)
    assert count_flops(block, x) == _block_forward_flops(B, C, C // 2, N, M, mode)


def test_cpu_flash_attention_is_counted():
    q, k, v = torch.randn(2, 1, 50, 8), torch.randn(2, 1, 30, 8), torch.randn(2, 1, 30, 8)
    for t in (q, k, v):
        t.requires_grad_(True)
    fwd = count_flops(torch.nn.functional.scaled_dot_product_attention, q, k, v)
    assert fwd == 2 * 2 * 50 * 30 * (8 + 8)
    both = count_flops(torch.nn.functional.scaled_dot_product_attention, q, k, v, backward=True)
    assert both == fwd + 5 * 2 * 2 * 50 * 30 * 8  # recomputed logits, dV, dP, dQ, dK


def test_in_place_accumulating_matmuls_are_counted():
    acc, a, b = torch.randn(5, 7), torch.randn(5, 3), torch.randn(3, 7)
    assert count_flops(lambda: acc.addmm_(a, b)) == 2 * 5 * 3 * 7
    acc3, a3, b3 = torch.randn(4, 5, 7), torch.randn(4, 5, 3), torch.randn(4, 3, 7)
    assert count_flops(lambda: acc3.baddbmm_(a3, b3)) == 2 * 4 * 5 * 3 * 7


def test_backward_needs_a_differentiable_output():
    with pytest.raises(ValueError, match="backward"):
        count_flops(lambda: torch.randn(3), backward=True)


def test_bench_command_checks_every_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "2,8,2,6,6", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "matmul roof" in printed and "embedded_gaussian" in printed
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["reports"]] == ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]
    for report in data["reports"]:
        assert [r["name"] for r in report["results"]] == ["auto", "naive"]
        for r in report["results"]:
            assert r["forward_s"] > 0 and r["train_s"] > 0 and r["train_flops"] > r["forward_flops"] > 0
            assert r["output_error"] < 1e-4 and r["grad_error"] < 1e-4


def test_bench_command_rejects_a_bad_shape(capsys):
    assert main(["bench", "--shape", "2,8,x"]) == 2
    assert "shape: expected" in capsys.readouterr().err


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "nonlocalnet", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("nonlocalnet ")


@pytest.mark.parametrize(
    "argv, params, flops",  # Table 2e, R101 against C2D
    [(["c2d_nl5_r101"], 1.2, 1.2), (["i3d_r101"], 1.2, 1.5), (["i3d_r101", "--inflation", "3x3x3"], 1.5, 1.8)],
)
def test_info_prints_stages_and_the_table_2e_ratios(argv, params, flops, capsys):
    assert main(["info", *argv]) == 0
    printed = capsys.readouterr().out
    assert f"params {params}x" in printed and f"FLOPs {flops}x" in printed
    stages = [line.split()[0] for line in printed.splitlines() if line.startswith(("conv1", "res", "pred", "total"))]
    assert stages == ["conv1", "res_conv1_bn", "res2", "res3", "res4", "res5", "pred", "total"]


def test_info_and_models_commands(capsys):
    assert main(["info", "c2d_r50", "--frames", "8", "--size", "256"]) == 0
    printed = capsys.readouterr().out
    assert "paper: Kinetics-400 top-1 71.8, top-5 89.7 (Table 2c)" in printed and "against" not in printed
    assert "(3, 8, 256, 256)" in printed
    assert main(["models", "i3d_nl5_r50*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:-1]] == ["i3d_nl5_r50", "i3d_nl5_r50_8x8", "i3d_nl5_r50_128x1", "i3d_nl5_r50_32x4"]
    assert main(["info", "c2d_r5"]) == 2
    assert "unknown model 'c2d_r5'" in capsys.readouterr().err
    assert main(["models", "x*"]) == 2

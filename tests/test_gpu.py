"""CUDA paths: the same block on the GPU against the float64 reference on the CPU.

Skipped without a CUDA device (see conftest.py); run them on a GPU machine with ``pytest -m gpu``.
"""

import copy

import pytest
import torch

from conftest import rel_err
from nonlocalnet import NonLocalBlock
from nonlocalnet.attention import softmax_attention
from nonlocalnet.bench import randomize_

pytestmark = pytest.mark.gpu
MODES = ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("fold", [None, True])  # True: the channel-first kernel serves on CUDA too
@pytest.mark.parametrize("affinity", ["spacetime", "space", "time"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_block_matches_cpu_float64_reference(mode, affinity, fold):
    cpu = randomize_(NonLocalBlock(32, mode=mode, affinity=affinity, impl="naive")).double()
    gpu = NonLocalBlock(32, mode=mode, affinity=affinity, fold=fold).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 32, 4, 9, 11, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    expected = cpu(x)
    (dx_expected,) = torch.autograd.grad(expected, x, grad)
    xg = x.detach().float().cuda().requires_grad_(True)
    actual = gpu(xg)
    (dx_actual,) = torch.autograd.grad(actual, xg, grad.float().cuda())
    assert rel_err(actual.cpu(), expected) < 1e-5
    assert rel_err(dx_actual.cpu(), dx_expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_autocast_stays_finite_and_close(mode, dtype):
    block = randomize_(NonLocalBlock(64, mode=mode)).cuda()
    x = (torch.randn(2, 64, 4, 14, 14, device="cuda") * 30).requires_grad_(True)  # large logits
    exact = copy.deepcopy(block).double().cpu()  # the float64 reference on the CPU
    exact.impl = "naive"
    reference = exact(x.detach().double().cpu())
    with torch.autocast("cuda", dtype=dtype):
        y = block(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert rel_err(y.float().cpu(), reference) < 5e-2


def test_cuda_softmax_attention_never_holds_the_affinity():
    n = 16384  # an (n, n) float32 affinity alone would be 1 GiB
    q, k, v = (torch.randn(1, n, 64, device="cuda", requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    softmax_attention(q, k, v, scale=0.125).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 256 * 2**20


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_training_with_mixed_precision(tmp_path, amp):
    pytest.importorskip("av")
    from test_engine import SPEC, tiny_config

    from nonlocalnet import engine
    from nonlocalnet.data.synthetic import make_synthetic

    root = make_synthetic(tmp_path / "syn", SPEC, log=lambda *a: None)
    result = engine.fit(tiny_config(root, **{"train.amp": amp}), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values() if v.is_floating_point())
    assert 0 <= result["top1"] <= 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all("NaN" not in line for line in lines)



@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_detection_training_with_mixed_precision(tmp_path, amp):
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")
    from test_coco import make_coco
    from test_detect_train import coco_config

    from nonlocalnet import detect

    images, annotations, _ = make_coco(tmp_path, images=4)
    cfg = coco_config(images, annotations, f"train.amp={amp}", "optim.batch_size=2", "optim.iterations=6",
                      "train.log_every=2")
    result = detect.fit(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values() if v.is_floating_point())
    assert state["model"]["backbone.body.layer3.4.nonlocal_block.out.weight"].abs().sum() > 0
    assert set(result["bbox"]) == set(detect.STAT_NAMES["bbox"]) and result["images"] == 4

"""GPU paths (run by scripts/bench/gpu_check.sh on a GPU machine; skipped on CPU-only machines)."""
import pytest
import torch
from torch import nn

import clipmoe
from clipmoe.config import MoEConfig
from clipmoe.moe import MoE

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("cf", [None, 1.0])
def test_grouped_mm_bf16_matches_cpu_fp32(cf):
    torch.manual_seed(0)
    layer = MoE(64, 128, MoEConfig(num_experts=8, top_k=2, capacity_factor=cf), nn.GELU).train()
    x = torch.randn(512, 64)
    y_ref, aux_ref = layer(x)
    gpu = MoE(64, 128, layer.cfg, nn.GELU).cuda().train()
    gpu.load_state_dict(layer.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = gpu(x.cuda().bfloat16())
    assert aux.tokens_per_expert.cpu().tolist() == aux_ref.tokens_per_expert.tolist()
    torch.testing.assert_close(y.float().cpu(), y_ref, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_upcycled_model_equals_dense_on_gpu():
    dense = clipmoe.create_model("clipmoe-tiny").cuda()
    up = clipmoe.upcycle(dense, num_experts=4, top_k=2, every=1).cuda().eval()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    tokens = clipmoe.get_tokenizer(dense)(["a red square", "two circles", "x", ""]).cuda()
    with torch.no_grad():
        assert (dense.encode_image(images) - up.encode_image(images)).abs().max() < 1e-4
        assert (dense.encode_text(tokens) - up.encode_text(tokens)).abs().max() < 1e-4

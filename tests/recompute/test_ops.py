"""fxopt/recompute/ops.py: the roofline price of aten attention calls the dispatch keeps (SDPA)."""
import pytest
import torch
from torch import fx

from fxopt.recompute import ops

aten = torch.ops.aten


def _sdpa_node(target, args, b=1, hq=32, hkv=8, s=65536, d=128):
    g = fx.Graph()
    shapes = [(b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d)]
    ins = []
    for name, shape in zip("qkv", shapes):
        n = g.placeholder(name)
        n.meta["val"] = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        ins.append(n)
    call = g.call_function(target, tuple(ins) + args)
    call.meta["val"] = (torch.empty(shapes[0], dtype=torch.bfloat16, device="meta"),)
    return call


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_priced_by_its_flops_with_gqa_and_causal(causal):
    """8B at 65,536 tokens, 32 query / 8 k/v heads: 2 * S * S * (D + Dv) per query head, halved when causal. The
    H200 profile measured 60.6 ms per causal cuDNN forward; the bytes alone would say 0.3 ms."""
    want = 2 * 32 * 65536 * 65536 * 256 * (0.5 if causal else 1.0)
    cudnn = _sdpa_node(aten._scaled_dot_product_cudnn_attention.default, (None, True, 0.0, causal))
    flops, nbytes, _ = ops.op_flops_bytes(cudnn)
    assert flops == want
    assert ops.op_time(cudnn) == pytest.approx(want / ops.GEMM_FLOPS[torch.bfloat16])
    assert ops.op_time(cudnn) > 40 * nbytes / ops.COPY_BYTES
    flash = _sdpa_node(aten._scaled_dot_product_flash_attention.default, (0.0, causal), hkv=32, s=2048)
    assert ops.op_flops_bytes(flash)[0] == 2 * 32 * 2048 * 2048 * 256 * (0.5 if causal else 1.0)

"""normalize forms the coverage matrix needed: in-place `x op= y` becomes out-of-place only when nothing else can
observe x's mutation (falcon eager attention); `x @ W.T` with a 2-D W becomes linear(x, W) (falcon's FalconLinear)."""
import operator

import pytest
import torch

from fxopt.normalize import normalize


def _dynamo_graph(fn, *args):
    """normalize()d dynamo graph of fn(*args), and fn's compiled output computed by that graph."""
    seen = []

    def capture(gm, example_inputs):
        normalize(gm)
        seen.append(gm)
        return gm.forward
    torch._dynamo.reset()
    out = torch.compile(fn, backend=capture)(*args)
    torch._dynamo.reset()
    return seen[0], out


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _scores(q, k):
    s = q @ k.transpose(-1, -2)
    s /= 4.0                 # falcon's eager attention
    return torch.softmax(s, -1)


def test_private_inplace_becomes_out_of_place():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    gm, out = _dynamo_graph(_scores, q, k)
    t = _targets(gm)
    assert torch.div in t and operator.itruediv not in t
    torch.testing.assert_close(out, _scores(q, k), rtol=0, atol=0)


def _aliased(a, b):
    s = a @ b
    v = s.view(-1)           # a view of s: sees the mutation below
    s *= 2.0
    c = a.contiguous()       # same storage as the input a
    c += 1.0
    return v.sum() + s.sum() + c.sum()


def test_observable_inplace_is_kept():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    gm, out = _dynamo_graph(_aliased, a.clone(), b)
    t = _targets(gm)
    assert operator.imul in t and operator.iadd in t and torch.mul not in t
    torch.testing.assert_close(out, _aliased(a.clone(), b))


def _promoting(x, y):
    h = x * 1.0
    h += y                   # fp16 += fp32 stays fp16 in place; out-of-place it would be fp32
    return h


def test_inplace_that_would_change_dtype_is_kept():
    x, y = torch.randn(3, 4, dtype=torch.float16), torch.randn(3, 4)
    gm, out = _dynamo_graph(_promoting, x, y)
    assert operator.iadd in _targets(gm)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, _promoting(x, y))


class _MatmulLinear(torch.nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 5))
        self.spelling = spelling

    def forward(self, x):
        w = self.weight
        wt = {"T": lambda: w.T, "t": lambda: w.t(), "transpose": lambda: w.transpose(-1, -2),
              "permute": lambda: w.permute(1, 0)}[self.spelling]()
        return x @ wt


@pytest.mark.parametrize("spelling", ["T", "t", "transpose", "permute"])
def test_matmul_with_transposed_2d_weight_becomes_linear(spelling):
    m = _MatmulLinear(spelling)
    x = torch.randn(2, 3, 5)
    gm, out = _dynamo_graph(m, x)
    t = _targets(gm)
    assert torch._C._nn.linear in t and operator.matmul not in t and torch.matmul not in t
    torch.testing.assert_close(out, m(x), rtol=0, atol=0)


def _batched(a, b):
    return a @ b.transpose(-1, -2)      # 3-D b: attention-like, stays a matmul


def test_matmul_with_batched_operand_is_kept():
    gm, _ = _dynamo_graph(_batched, torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    assert torch._C._nn.linear not in _targets(gm)


def test_falcon_lora_matches_through_fxopt(fresh_dynamo):
    """End to end: peft LoRA on FalconLinear (x @ W.T) is matched as lora; eager attention (`/=`) as attention."""
    pytest.importorskip("peft")
    from fxopt import coverage
    from tests.models.expectations import SMALL
    r = coverage.run_case("falcon", "eager", "lora", SMALL)
    assert coverage.problems(r) == [], coverage.problems(r)
    assert r.matched["lora"] == 4 * SMALL["num_hidden_layers"] and r.matched["attention"] == 2, r.matched


def _dropouts(x, w):
    a = torch.nn.functional.dropout(x, 0.0, True, False)     # the identity: dropped
    b = torch.nn.functional.dropout(a, p=0.3, training=False)  # eval: dropped
    return torch.nn.functional.dropout(b @ w, 0.5, True)     # a real dropout: kept


def test_identity_dropout_is_dropped():
    x, w = torch.randn(3, 4), torch.randn(4, 4)
    gm, _ = _dynamo_graph(_dropouts, x, w)
    drops = [n for n in gm.graph.nodes if n.target is torch.nn.functional.dropout]
    assert len(drops) == 1 and drops[0].args[1:] == (0.5, True)


def _conv1d(x, w, b):                      # transformers' Conv1D (gpt2)
    size_out = x.size()[:-1] + (w.size(1),)
    return torch.addmm(b, x.view(-1, x.size(-1)), w).view(size_out)


def test_conv1d_addmm_becomes_linear():
    x, w, b = torch.randn(2, 3, 5), torch.randn(5, 7), torch.randn(7)
    gm, out = _dynamo_graph(_conv1d, x, w, b)
    t = _targets(gm)
    assert torch._C._nn.linear in t and torch.addmm not in t
    lin = next(n for n in gm.graph.nodes if n.target is torch._C._nn.linear)
    assert lin.args[0].op == "placeholder"          # reads x itself, not its flattened view
    torch.testing.assert_close(out, _conv1d(x, w, b))


def test_addmm_with_broadcast_bias_is_kept():
    x, w, b = torch.randn(3, 5), torch.randn(5, 7), torch.randn(3, 7)   # a [M, N] bias is no linear bias
    gm, out = _dynamo_graph(torch.addmm, b, x, w)
    assert torch.addmm in _targets(gm)


def _rms_double_upcast(x, w, eps=1e-6):
    v = x.float().pow(2).mean(-1, keepdim=True)      # x.float() written twice
    return w * (x.float() * torch.rsqrt(v + eps)).to(x.dtype)


def test_two_casts_of_one_tensor_become_one_and_rms_norm_matches(fresh_dynamo):
    """The rms_norm benchmark's eager form upcasts x twice; the pattern needs one upcast node in both places. Before
    the merge it was rejected ('rsqrt result is not only multiplied by the same x'), so benchmarks/kernels.py's
    'fxopt' rms_norm rows on the H200 timed Inductor's own code."""
    import fxopt
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    w = torch.randn(32, dtype=torch.bfloat16)
    gm, out = _dynamo_graph(_rms_double_upcast, x, w)
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to" and n.args[1] == torch.float32]
    assert len(casts) == 1
    torch.testing.assert_close(out, _rms_double_upcast(x, w), rtol=0, atol=0)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = torch.compile(_rms_double_upcast, backend="fxopt", options={"inductor": False})(xg, wg)
    assert fxopt.last_report().matched["rms_norm"] == 1
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = _rms_double_upcast(xr, wr)
    gy = torch.randn_like(yr)
    y.backward(gy)
    yr.backward(gy)
    for a, b in ((y, yr), (xg.grad, xr.grad), (wg.grad, wr.grad)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _cast_written_in_place(x):
    h = x.float()
    h.mul_(2)                 # h is written: a second x.float() must stay a separate value
    return x.float() + h


def test_cast_written_in_place_is_not_merged():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    gm, out = _dynamo_graph(_cast_written_in_place, x)
    torch.testing.assert_close(out, _cast_written_in_place(x), rtol=0, atol=0)
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert len(casts) == 2

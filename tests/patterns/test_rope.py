"""rope pattern: small graphs that must match (one op per q/k pair, partial rotary folded, casts absorbed) and
near-misses that must not (with the reported reason)."""
import pytest
import torch

import fxopt
from tests.helpers import rel

OPTS = {"patterns": ["rope"], "inductor": False}


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def rotate_interleaved(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply(q, k, cos, sin, rot=rotate_half):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def rewritten(fn, *args):
    """(outputs, FX graph after fxopt's rewrite) of fn compiled with fxopt (rope only, aot_eager)."""
    graphs = []

    def be(gm, example_inputs):
        compiled = fxopt.backend(gm, example_inputs, options=OPTS)
        graphs.append(gm)
        return compiled
    torch._dynamo.reset()
    out = torch.compile(fn, backend=be)(*args)
    return out, graphs[0].graph


def ops(graph, name="rope"):
    return [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "name", lambda: "")()
            == f"fxopt::{name}"]


def qkcs(b=2, h=4, hk=2, s=5, d=16, rot=None, dt=torch.float32):
    q = torch.randn(b, s, h, d, dtype=dt).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, hk, d, dtype=dt).transpose(1, 2).requires_grad_()
    pos = torch.arange(s)[None] + torch.arange(b)[:, None] * 3          # per-batch positions
    inv = 1.0 / (10000 ** (torch.arange(0, rot or d, 2).float() / (rot or d)))
    emb = torch.cat([pos[..., None].float() * inv] * 2, -1)
    return q, k, emb.cos().to(dt), emb.sin().to(dt)


def grads(fn, args, outs):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.manual_seed(9)
    gs = [torch.randn(o.shape).to(o.dtype) for o in outs]
    return torch.autograd.grad(outs, leaves, gs)


def check_same(fn, *args, tol=1e-6, exact=False):
    (out, graph) = rewritten(fn, *args)
    ref = fn(*args)
    out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    got_g, ref_g = grads(fn, args, out), grads(fn, args, ref)
    for a, b in zip(out + got_g, ref + ref_g):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (torch.equal(a, b) if exact else rel(a, b) <= tol)
    return graph


def test_llama_pair_is_one_op(fresh_dynamo):
    torch.manual_seed(0)
    g = check_same(apply, *qkcs())
    assert len(ops(g)) == 1 and fxopt.last_report().matched["rope"] == 1
    assert not [n for n in g.nodes if n.op == "call_function" and n.target in (torch.cat, torch.neg)]


def test_q_only(fresh_dynamo):
    torch.manual_seed(1)
    q, k, cos, sin = qkcs()
    g = check_same(lambda q, cos, sin: q * cos[:, None] + rotate_half(q) * sin[:, None], q, cos, sin)
    assert len(ops(g)) == 1


def test_partial_rotary_folded(fresh_dynamo):
    """Phi3/NeoX: rope on q[..., :r], cat with q[..., r:]: one op on the whole q, no cat left."""
    def f(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        r = cos.shape[-1]
        q_rot, q_pass = q[..., :r], q[..., r:]
        k_rot, k_pass = k[..., :r], k[..., r:]
        q_e = q_rot * cos + rotate_half(q_rot) * sin
        k_e = k_rot * cos + rotate_half(k_rot) * sin
        return torch.cat((q_e, q_pass), dim=-1), torch.cat((k_e, k_pass), dim=-1)
    torch.manual_seed(2)
    g = check_same(f, *qkcs(d=24, rot=8))
    assert len(ops(g)) == 1 and not [n for n in g.nodes if n.op == "call_function" and n.target is torch.cat]


def test_interleaved_gptj_layout(fresh_dynamo):
    """rotate_every_two on [B, S, H, D] with cos [1, S, 1, r] and partial rotary."""
    def f(q, k, cos, sin):
        cos, sin = cos[:, :, None], sin[:, :, None]
        r = cos.shape[-1]
        q_rot, k_rot = q[..., :r], k[..., :r]
        q_e = q_rot * cos + rotate_interleaved(q_rot) * sin
        k_e = k_rot * cos + rotate_interleaved(k_rot) * sin
        return torch.cat([q_e, q[..., r:]], -1), torch.cat([k_e, k[..., r:]], -1)
    torch.manual_seed(3)
    q, k = torch.randn(2, 5, 3, 16, requires_grad=True), torch.randn(2, 5, 3, 16, requires_grad=True)
    emb = torch.rand(1, 5, 8)
    g = check_same(f, q, k, emb.cos(), emb.sin())
    assert len(ops(g)) == 1 and ops(g)[0].args[4] is True


@pytest.mark.parametrize("variant", ["hf_bf16", "cohere_upcast", "fp32_cos"])
def test_dtypes_like_eager(variant, fresh_dynamo, monkeypatch):
    """Output dtype and (FXOPT_ROPE_EXACT=1) rounding as eager: bf16 throughout; q.float() ... .to(bf16);
    bf16 q * fp32 cos -> fp32."""
    monkeypatch.setenv("FXOPT_ROPE_EXACT", "1")
    torch.manual_seed(4)
    q, k, cos, sin = qkcs(dt=torch.bfloat16)
    if variant == "cohere_upcast":
        def f(q, k, cos, sin):
            a, b = apply(q.float(), k.float(), cos, sin)
            return a.to(q.dtype), b.to(k.dtype)
    else:
        f = apply
        if variant == "fp32_cos":
            cos, sin = cos.float(), sin.float()
    g = check_same(f, q, k, cos, sin, exact=True)
    assert len(ops(g)) == 1
    assert not [n for n in g.nodes if n.op == "call_method" and n.target == "to"]


def half_width(x, c, s, split):
    """gpt_oss's spelling: cat((x1 c - x2 s, x2 c + x1 s), -1) with d/2-wide c, s (halves by chunk or slices)."""
    d = x.shape[-1]
    x1, x2 = torch.chunk(x, 2, dim=-1) if split == "chunk" else (x[..., : d // 2], x[..., d // 2:])
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("split", ["chunk", "slices"])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_half_width_spelling_pair_is_one_op(split, dt, fresh_dynamo, monkeypatch):
    """One op per q/k pair, cos/sin widened to cat((c, c)); bit-exact with eager under FXOPT_ROPE_EXACT=1 (the
    same three roundings per element), no chunk/cat left of the rotation."""
    monkeypatch.setenv("FXOPT_ROPE_EXACT", "1")
    torch.manual_seed(5)
    q, k, cos, sin = qkcs(dt=dt)
    c, s = cos[..., :8], sin[..., :8]          # d/2 wide (qkcs' emb is cat([f, f]))

    def f(q, k, c, s):
        c, s = c.unsqueeze(1), s.unsqueeze(1)
        return half_width(q, c, s, split), half_width(k, c, s, split)
    g = check_same(f, q, k, c, s, exact=True)
    assert len(ops(g)) == 1 and fxopt.last_report().matched["rope"] == 1
    assert not [n for n in g.nodes if n.op == "call_function" and n.target in (torch.chunk, torch.sub)]


def test_near_miss_half_width_swapped_signs(fresh_dynamo):
    """cat((x1 c + x2 s, x2 c - x1 s)) is a rotation the other way: not this op's math, not matched."""
    torch.manual_seed(6)
    q, k, cos, sin = qkcs()
    c, s = cos[..., :8].unsqueeze(1), sin[..., :8].unsqueeze(1)

    def f(q):
        x1, x2 = torch.chunk(q, 2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c - x1 * s), dim=-1)
    _, g = rewritten(f, q)
    assert not ops(g)


def complex_rope(x, f):
    """llama4 / deepseek_v2: view_as_real(view_as_complex(x.float() pairs) * f).flatten(3).type_as(x)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * f).flatten(3).type_as(x)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_complex_multiply_pair_is_one_op(dt, fresh_dynamo):
    """The complex product on [B, S, H, D] q and k with f = polar(1, theta)[:, :, None, :] taken once per tensor (as
    llama4 indexes it twice): one interleaved op with cos/sin = f's parts repeated; fp32 math, as eager's."""
    torch.manual_seed(7)
    q, k = (torch.randn(2, 5, h, 16, dtype=dt, requires_grad=True) for h in (4, 2))
    theta = (torch.arange(5)[None, :, None] + torch.arange(2)[:, None, None] * 3) \
        * (1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))
    freqs = torch.polar(torch.ones_like(theta), theta)

    def f(q, k, freqs):
        return complex_rope(q, freqs[:, :, None, :]), complex_rope(k, freqs[:, :, None, :])
    g = check_same(f, q, k, freqs, tol=1e-6 if dt == torch.float32 else 8e-3)
    assert len(ops(g)) == 1 and fxopt.last_report().matched["rope"] == 1 and ops(g)[0].args[4] is True
    assert not [n for n in g.nodes if n.op == "call_function" and n.target is torch.view_as_complex]


def test_near_miss_complex_multiplier_requires_grad(fresh_dynamo):
    torch.manual_seed(8)
    q = torch.randn(2, 5, 4, 16, requires_grad=True)
    freqs = torch.polar(torch.ones(2, 5, 8), torch.rand(2, 5, 8)).requires_grad_()
    _, g = rewritten(lambda q, fr: complex_rope(q, fr[:, :, None, :]), q, freqs)
    assert not ops(g)
    assert any("requires grad" in r.reason for r in fxopt.last_report().rejected if r.pattern == "rope")


def test_separate_cos_nodes_are_two_ops(fresh_dynamo):
    """cos/sin recomputed per tensor (gptj): q and k are matched alone."""
    def f(q, k, cos, sin):
        a = q * cos[:, None] + rotate_half(q) * sin[:, None]
        b = k * (cos * 1.0)[:, None] + rotate_half(k) * (sin * 1.0)[:, None]
        return a, b
    torch.manual_seed(5)
    g = check_same(f, *qkcs())
    assert len(ops(g)) == 2 and fxopt.last_report().matched["rope"] == 2


def rejected_reasons():
    return [r.reason for r in fxopt.last_report().rejected if r.pattern == "rope"]


def test_near_miss_cos_requires_grad(fresh_dynamo):
    torch.manual_seed(6)
    q, k, cos, sin = qkcs()
    check_same(apply, q, k, cos.requires_grad_(), sin)
    assert fxopt.last_report().matched["rope"] == 0
    assert any("cos/sin require grad" in r for r in rejected_reasons())


def test_near_miss_uneven_split(fresh_dynamo):
    def f(q, cos, sin):
        return q * cos[:, None] + torch.cat((-q[..., 5:], q[..., :5]), -1) * sin[:, None]
    q, k, cos, sin = qkcs()
    check_same(f, q, cos, sin)
    assert any("is not rotate-half" in r for r in rejected_reasons())


def test_near_miss_rotation_reused(fresh_dynamo):
    def f(q, cos, sin):
        r = rotate_half(q)
        return q * cos[:, None] + r * sin[:, None], r
    q, k, cos, sin = qkcs()
    check_same(f, q, cos, sin)
    assert any("not only multiplied by sin" in r for r in rejected_reasons())


def test_near_miss_cos_per_head(fresh_dynamo):
    def f(q, cos, sin):
        return q * cos + rotate_half(q) * sin
    q = torch.randn(2, 4, 5, 16, requires_grad=True)
    check_same(f, q, torch.rand(2, 4, 5, 16), torch.rand(2, 4, 5, 16))
    assert any("every leading dim" in r for r in rejected_reasons())


def test_near_miss_stack_not_flattened(fresh_dynamo):
    def f(q, cos, sin):
        r = torch.stack((-q[..., 1::2], q[..., ::2]), -1).reshape(q.shape)
        return q * cos[:, None] + r * sin[:, None]
    q, k, cos, sin = qkcs()
    check_same(f, q, cos, sin)
    assert any("not flattened" in r for r in rejected_reasons())


def rotate_half_neg_theta(x):       # nanochat: cat((x2, -x1)), the rotation by -theta
    return torch.cat((x[..., x.shape[-1] // 2:], -x[..., : x.shape[-1] // 2]), dim=-1)


def rotate_interleaved_neg_theta(x):
    return torch.stack((x[..., 1::2], -x[..., ::2]), dim=-1).flatten(-2)


@pytest.mark.parametrize("rot", [rotate_half_neg_theta, rotate_interleaved_neg_theta])
def test_rotation_by_minus_theta_pair_is_one_op(rot, fresh_dynamo):
    """(x2, -x1) is the rotation with sin negated: one op (given -sin), fwd and grads as eager."""
    torch.manual_seed(12)
    g = check_same(lambda q, k, c, s: apply(q, k, c, s, rot), *qkcs())
    (op,) = ops(g)
    assert op.args[4] is (rot is rotate_interleaved_neg_theta)
    assert op.args[3].target is torch.neg      # the op's sin is -sin


def test_rotation_by_minus_theta_bf16_bitexact(fresh_dynamo, monkeypatch):
    """Negating sin instead of x1 is exact: bit-identical to eager with FXOPT_ROPE_EXACT=1."""
    monkeypatch.setenv("FXOPT_ROPE_EXACT", "1")
    torch.manual_seed(13)
    check_same(lambda q, k, c, s: apply(q, k, c, s, rotate_half_neg_theta), *qkcs(dt=torch.bfloat16), exact=True)


def test_mixed_signs_in_a_pair_are_two_ops(fresh_dynamo):
    """q rotated by theta, k by -theta with the same cos/sin: not one op (the op has one sin)."""
    def f(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half_neg_theta(k) * sin
    torch.manual_seed(14)
    g = check_same(f, *qkcs())
    assert len(ops(g)) == 2


def deepseek_interleave(q, k, cos, sin):
    """deepseek_v3's apply_rotary_pos_emb_interleave: even/odd features, d/2-wide angles, de-interleaved output."""
    cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)
    sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)
    q1, q2, k1, k2 = q[..., 0::2], q[..., 1::2], k[..., 0::2], k[..., 1::2]
    return (torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1),
            torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1))


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_deepseek_even_odd_pairs_are_one_op(dt, fresh_dynamo, monkeypatch):
    """Even/odd pairs with de-interleaved output: the interleaved op plus a permuting copy; bit-exact with eager
    under FXOPT_ROPE_EXACT=1 in bf16, fwd and grads."""
    monkeypatch.setenv("FXOPT_ROPE_EXACT", "1")
    torch.manual_seed(15)
    q, k, cos, sin = qkcs(dt=dt)
    k = k[:, :1].detach().requires_grad_()          # MLA's k_pe: one head shared by all
    g = check_same(deepseek_interleave, q, k, cos, sin, exact=dt == torch.bfloat16)
    (op,) = ops(g)
    assert op.args[4] is True and op.args[2].target is torch.repeat_interleave


def test_near_miss_even_odd_of_two_tensors(fresh_dynamo):
    def f(q, p, cos, sin):
        c, s = cos[..., :8].unsqueeze(1), sin[..., :8].unsqueeze(1)
        return torch.cat([q[..., 0::2] * c - p[..., 1::2] * s, p[..., 1::2] * c + q[..., 0::2] * s], dim=-1)
    torch.manual_seed(16)
    q, k, cos, sin = qkcs()
    check_same(f, q, q.detach().clone().requires_grad_(), cos, sin)
    assert fxopt.last_report().matched["rope"] == 0

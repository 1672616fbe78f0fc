"""Hypothesis property tests: random small graphs holding one instance of a pattern (random spelling, shape, dtype,
stride) or a near-miss of it. Properties: the rewritten graph computes what eager computes (outputs and grads); a
supported spelling is matched once; a near-miss is left alone (matched == 0) with a reason in the report, or is not
even a candidate.

The graphs are captured by dynamo and rewritten by fxopt's pipeline (normalize + the pattern, strict: a rewrite error
fails the test); the rewritten torch-level graph then runs eagerly with autograd through the fxopt ops (the
aot_eager/Inductor hand-off is covered by the other reliability files and costs ~3x more per example).
Budget: 25 examples per property by default; `-m slow` runs the same properties with 300.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxopt import config as fx_config  # noqa: E402
from fxopt import pipeline  # noqa: E402
from fxopt.report import GraphReport  # noqa: E402
from tests.reliability.examples import TOL, clone_args, run_and_grads, worst_diff

FAST, SLOW = 25, 300
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rewrite_and_run(fn, args, patterns):
    """(compiled (out, grads), eager (out, grads), matched count, rejected reasons) for fn(*args)."""
    config = fx_config.parse({"patterns": patterns, "inductor": False, "strict": True})
    reports = []

    def backend(gm, example_inputs):
        gr = GraphReport("fuzz")
        pipeline.run(gm, config, gr, "fuzz")
        reports.append(gr)
        return gm.forward
    torch._dynamo.reset()
    cfn, cargs = clone_args(fn, args)
    got = run_and_grads(torch.compile(cfn, backend=backend), cargs)
    want = run_and_grads(fn, args)
    matched = sum(sum(r.matched.values()) for r in reports)
    reasons = [x.reason for r in reports for x in r.rejected]
    return got, want, matched, reasons


def _f64(res):
    out, grads = res
    return out.double(), [g.double() if g is not None else None for g in grads]


def no_worse_than_eager(fn, args, got, want, dtype, factor=1.5):
    """Compiled may differ from eager by more than TOL where the math is ill-conditioned (layer_norm over 2 elements:
    dx is rounding noise, eager bf16 dx is off by 0.2 from fp64, fp32 by 1e-5); then it must be as close to the
    fp64 result as eager is."""
    args64 = tuple(a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and
                   a.is_floating_point() else a for a in args)
    truth = run_and_grads(fn, args64)
    err_c = worst_diff(*_f64(got), *_f64(truth))
    err_e = worst_diff(*_f64(want), *_f64(truth))
    return err_c <= factor * err_e + TOL[dtype], (err_c, err_e)


def tensor(draw, shape, dtype, grad=True, scale=1.0):
    """A random tensor with a random layout (contiguous, last two dims transposed, or a step-2 view)."""
    layout = draw(st.sampled_from(["contiguous", "transposed", "step2"]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(*shape, generator=g) * scale).to(dtype)
    if layout == "transposed" and len(shape) >= 2:
        t = torch.empty(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-1, -2)
    elif layout == "step2":
        t = torch.empty(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    else:
        t = torch.empty(*shape, dtype=dtype)
    t.copy_(base)
    return t.requires_grad_(grad)


def check(fn, args, patterns, expect_match, dtype, extra_tol=1.0, factor=1.5):
    got, want, matched, reasons = rewrite_and_run(fn, args, patterns)
    if expect_match:
        assert matched == 1, (matched, reasons)
    else:
        assert matched == 0, f"near-miss matched: {matched}"
    worst = worst_diff(*got, *want)
    if worst > TOL[dtype] * extra_tol:
        ok, errs = no_worse_than_eager(fn, args, got, want, dtype, factor)
        assert ok, (worst, errs)
    return reasons


def two_budgets(body):
    """The property with the default budget, and a `slow` copy with a larger one."""
    def prop(data):
        body(data)
    fast = settings(max_examples=FAST, deadline=None, database=None,   # no shrinking: a failure reports at once
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given(st.data())(prop))
    slow = settings(max_examples=SLOW, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given(st.data())(prop))
    return fast, pytest.mark.slow(slow)


def dims(draw, rows=(1, 3), seq=(1, 9), hidden=(2, 130)):
    return draw(st.integers(*rows)), draw(st.integers(*seq)), draw(st.integers(*hidden))


# ---- rms_norm ----

def _rms_fn(var, eps_first, weight, upcast, near):
    def fn(x, w):
        h = x.float() if upcast else x
        if near == "pow3":
            sq = h.pow(3)
        else:
            sq = {"pow": lambda t: t.pow(2), "mul": lambda t: t * t, "square": torch.square}[var](h)
        if near == "dim0":
            v = sq.mean(0, keepdim=True)
        elif near == "no_keepdim":
            v = sq.mean(-1).unsqueeze(-1)
        else:
            v = sq.mean(-1, keepdim=True)
        eps = torch.full_like(v, 1e-6) if near == "eps_tensor" else 1e-6
        r = torch.rsqrt(eps + v if eps_first else v + eps)
        y = (h * 1.5 if near == "other_x" else h) * r
        if weight == "gemma":
            y = (y * (1.0 + w.float())).to(x.dtype)
        else:
            y = y.to(x.dtype)
            y = {"none": y, "w*y": w * y, "y*w": y * w}[weight]
        return (y, r) if near == "rsqrt_used_twice" else y
    return fn


def _rms(data, near_miss):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    b, s, h = dims(draw)
    upcast = dtype != torch.float32 or draw(st.booleans())
    near = draw(st.sampled_from(["pow3", "dim0", "no_keepdim", "eps_tensor", "other_x", "rsqrt_used_twice"])) \
        if near_miss else None
    fn = _rms_fn(draw(st.sampled_from(["pow", "mul", "square"])), draw(st.booleans()),
                 draw(st.sampled_from(["none", "w*y", "y*w", "gemma"])), upcast, near)
    if near == "rsqrt_used_twice":
        f0 = fn
        fn = lambda x, w: sum(t.float().sum() for t in f0(x, w))   # noqa: E731
    args = (tensor(draw, (b, s, h), dtype), tensor(draw, (h,), dtype, scale=0.5))
    reasons = check(fn, args, ["rms_norm"], not near_miss, dtype)
    if near_miss:
        assert reasons, "near-miss rsqrt rejected without a reason"


test_fuzz_rms_norm, test_fuzz_rms_norm_slow = two_budgets(lambda data: _rms(data, False))
test_fuzz_rms_norm_near_miss, test_fuzz_rms_norm_near_miss_slow = two_budgets(lambda data: _rms(data, True))


# ---- swiglu / geglu ----

GATED = {   # spelling -> (fn(g, u), pattern)
    "silu": (lambda g, u: F.silu(g) * u, "swiglu"),
    "u*silu": (lambda g, u: u * F.silu(g), "swiglu"),
    "g*sigmoid(g)": (lambda g, u: g * torch.sigmoid(g) * u, "swiglu"),
    "sigmoid(g)*g": (lambda g, u: u * (g.sigmoid() * g), "swiglu"),
    "gelu": (lambda g, u: F.gelu(g) * u, "geglu"),
    "gelu_tanh": (lambda g, u: u * F.gelu(g, approximate="tanh"), "geglu"),
    "gelu_erf_python": (lambda g, u: u * (0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))), "geglu"),
    "gelu_tanh_python": (lambda g, u: 0.5 * g * (1.0 + torch.tanh(math.sqrt(2 / math.pi) *
                                                                   (g + 0.044715 * torch.pow(g, 3.0)))) * u, "geglu"),
}
GATED_NEAR = {   # spelling -> (fn(g, u), pattern that sees it)
    "relu": (lambda g, u: F.relu(g) * u, "swiglu"),
    "sigmoid": (lambda g, u: torch.sigmoid(g) * u, "swiglu"),
    "2*silu": (lambda g, u: 2.0 * F.silu(g) * u, "swiglu"),
    "silu*g": (lambda g, u: F.silu(g) * g, "swiglu"),
    "tanh": (lambda g, u: torch.tanh(g) * u, "geglu"),
    "gelu*0.9": (lambda g, u: (F.gelu(g) * 0.9) * u, "geglu"),
    "broadcast_up": (lambda g, u: F.silu(g) * u[..., :1, :], "swiglu"),
}


def _gated(data, near_miss):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    b, s, h = dims(draw, hidden=(1, 100))
    name = draw(st.sampled_from(sorted(GATED_NEAR if near_miss else GATED)))
    act, pattern = (GATED_NEAR if near_miss else GATED)[name]
    if name == "broadcast_up":   # u[..., :1, :] only broadcasts when s > 1 (s == 1 is a plain, matched gate)
        s = max(s, 2)
    packed = not near_miss and draw(st.sampled_from([None, "chunk", "split"]))
    if packed:
        gate_first = draw(st.booleans())

        def fn(gu):
            a, c = gu.chunk(2, dim=-1) if packed == "chunk" else gu.split(h, dim=-1)
            return act(a, c) if gate_first else act(c, a)
        args = (tensor(draw, (b, s, 2 * h), dtype),)
    else:
        fn = act
        args = (tensor(draw, (b, s, h), dtype), tensor(draw, (b, s, h), dtype))
    check(fn, args, [pattern], not near_miss, dtype)


test_fuzz_gated_mlp, test_fuzz_gated_mlp_slow = two_budgets(lambda data: _gated(data, False))
test_fuzz_gated_mlp_near_miss, test_fuzz_gated_mlp_near_miss_slow = two_budgets(lambda data: _gated(data, True))


# ---- lora ----

def _lora(data, near_miss):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    b, s, k = dims(draw, hidden=(2, 70))
    n, r = draw(st.integers(1, 50)), draw(st.integers(1, 8))
    scale = draw(st.sampled_from([0.5, 1.0, 2.0, 16.0 / 3]))
    bias, branch_first, dropout0 = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    near = draw(st.sampled_from(["a_bias", "b_bias", "tensor_scale", "other_x", "branch_reused"])) \
        if near_miss else None

    def fn(x, w, bias_v, a, bb, ab):
        xa = F.dropout(x, 0.0, True) if dropout0 else x
        u = F.linear(F.linear(xa, a, ab if near == "a_bias" else None), bb, bias_v[:n] * 0 + 1 if near == "b_bias"
                     else None)
        v = u * (bias_v[0].detach() if near == "tensor_scale" else scale)
        base = F.linear(x * 0.5 if near == "other_x" else x, w, bias_v if bias else None)
        y = v + base if branch_first else base + v
        return y + v if near == "branch_reused" else y
    args = (tensor(draw, (b, s, k), dtype), tensor(draw, (n, k), dtype, grad=False, scale=0.2),
            tensor(draw, (n,), dtype, grad=draw(st.booleans())), tensor(draw, (r, k), dtype, scale=0.3),
            tensor(draw, (n, r), dtype, scale=0.3), tensor(draw, (r,), dtype))
    reasons = check(fn, args, ["lora"], not near_miss, dtype, extra_tol=2.0)
    if near_miss and near in ("a_bias", "b_bias", "tensor_scale", "branch_reused"):
        assert reasons, "near-miss LoRA branch rejected without a reason"


test_fuzz_lora, test_fuzz_lora_slow = two_budgets(lambda data: _lora(data, False))
test_fuzz_lora_near_miss, test_fuzz_lora_near_miss_slow = two_budgets(lambda data: _lora(data, True))


# ---- linear_cross_entropy ----

def _lce(data, near_miss):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    b, s, h = dims(draw, hidden=(2, 48))
    v = draw(st.integers(2, 90))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    cap = draw(st.sampled_from([None, 5.0, 30.0]))
    scale = draw(st.sampled_from([1.0, 0.5]))
    near = draw(st.sampled_from(["smoothing", "class_weight", "logits_returned", "bias", "bf16_loss"])) \
        if near_miss else None
    n_ignored = draw(st.integers(0, b * s))

    def fn(x, w, labels, cw):
        z = F.linear(x, w, cw[:1].expand(v) if near == "bias" else None) * scale
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        logits = z if near == "bf16_loss" and dtype != torch.float32 else z.float()
        loss = F.cross_entropy(logits.view(-1, v), labels.view(-1), reduction=reduction,
                               label_smoothing=0.1 if near == "smoothing" else 0.0,
                               weight=cw.float() if near == "class_weight" else None)
        return loss + logits.float().mean() * 0 if near == "logits_returned" else loss
    labels = torch.randint(0, v, (b, s), generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    labels.view(-1)[torch.randperm(b * s)[:n_ignored]] = -100
    args = (tensor(draw, (b, s, h), dtype), tensor(draw, (v, h), dtype, scale=0.5),
            labels, torch.rand(v).to(dtype) + 0.5)
    reasons = check(fn, args, ["linear_cross_entropy"], not near_miss or (near == "bf16_loss" and
                                                                         dtype == torch.float32), dtype)
    if near_miss and near not in ("bf16_loss",):
        assert reasons, "near-miss cross_entropy rejected without a reason"


test_fuzz_linear_cross_entropy, test_fuzz_linear_cross_entropy_slow = two_budgets(lambda data: _lce(data, False))
test_fuzz_linear_cross_entropy_near_miss, test_fuzz_linear_cross_entropy_near_miss_slow = \
    two_budgets(lambda data: _lce(data, True))


# ---- norms, rope, attention (one property each; positives and near-misses drawn together) ----

def _layer_norm(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    b, s, h = dims(draw)
    affine = draw(st.sampled_from(["wb", "w", "none"]))
    near = draw(st.sampled_from([None, None, "two_dims"]))

    def fn(x, w, bb):
        shape = (s, h) if near == "two_dims" else (h,)
        ww = w if near != "two_dims" else w.expand(s, h)
        bw = bb if near != "two_dims" else bb.expand(s, h)
        return F.layer_norm(x, shape, ww if affine != "none" else None, bw if affine == "wb" else None, 1e-5)
    args = (tensor(draw, (b, s, h), dtype), tensor(draw, (h,), dtype), tensor(draw, (h,), dtype))
    check(fn, args, ["layer_norm"], near is None, dtype)


def _rope(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    b, s = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    d = 2 * draw(st.integers(1, 40))
    hq, hk = draw(st.sampled_from([(4, 2), (2, 2), (3, 1)]))
    near = draw(st.sampled_from([None, None, "cos_grad", "wrong_halves"]))

    def rot(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((x1, -x2) if near == "wrong_halves" else (-x2, x1), dim=-1)

    def fn(q, k, cos, sin):
        c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
        return torch.cat([(q * c + rot(q) * sn).flatten(1), (k * c + rot(k) * sn).flatten(1)], 1)
    pos = torch.arange(s)[None] + torch.arange(b)[:, None]
    emb = torch.cat([pos[..., None].float() / (10000 ** (torch.arange(0, d, 2).float() / d))] * 2, -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if near == "cos_grad":
        cos.requires_grad_()
    q = tensor(draw, (b, s, hq, d), dtype).detach().transpose(1, 2).requires_grad_()
    k = tensor(draw, (b, s, hk, d), dtype).detach().transpose(1, 2).requires_grad_()
    check(fn, (q, k, cos, sin), ["rope"], near is None, dtype)


def _attention(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    b, sq = draw(st.integers(1, 2)), draw(st.integers(1, 20))
    d = draw(st.sampled_from([8, 16, 24, 40]))
    hq, hk = draw(st.sampled_from([(4, 2), (2, 2), (4, 1)]))
    causal, scale = draw(st.booleans()), draw(st.sampled_from([None, 0.3]))
    near = draw(st.sampled_from([None, None, "mask_grad"]))

    def fn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m if near else None, is_causal=causal and not near,
                                              scale=scale, enable_gqa=True)
    q = tensor(draw, (b, hq, sq, d), dtype)
    k, v = tensor(draw, (b, hk, sq, d), dtype), tensor(draw, (b, hk, sq, d), dtype)
    m = tensor(draw, (sq, sq), dtype, grad=bool(near))
    # factor 4: the flash backward takes delta = rowsum(dO * O) from the bf16-rounded O; where dq/dk cancel (q = k = v,
    # 2 keys: |dq| = 0.01 |out|) its error is 3.5x that of eager's fp32 math path (0.075 vs 0.021 of fp64)
    check(fn, (q, k, v, m), ["attention"], near is None, dtype, extra_tol=2.0, factor=4.0)


test_fuzz_layer_norm, test_fuzz_layer_norm_slow = two_budgets(_layer_norm)
test_fuzz_rope, test_fuzz_rope_slow = two_budgets(_rope)
test_fuzz_attention, test_fuzz_attention_slow = two_budgets(_attention)

"""One small example per pattern (the reliability tests parametrize over fxopt.patterns.PATTERNS and look it up here).

`EXAMPLES[name](dtype, **shape)` -> (fn, args): `fn(*args)` returns one tensor whose graph holds exactly one instance
of the pattern, with the named pattern enabled alone. A pattern without an example here fails
test_every_pattern_has_an_example, so a new pattern cannot skip the reliability suite.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F



def _t(*shape, dtype=torch.float32, grad=True, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    t = (torch.randn(*shape, generator=g) * scale).to(dtype)
    return t.requires_grad_(grad)


# ---- the pattern spellings (the forms transformers produces) ----

def rms(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def rms_gemma(x, w):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (h * (1.0 + w.float())).type_as(x)


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin], 1)


def cos_sin(b, s, d, dtype):
    pos = torch.arange(s)[None] + torch.arange(b)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[..., None].float() * inv] * 2, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def swiglu(g, u):
    return F.silu(g) * u


def geglu(g, u):
    return F.gelu(g, approximate="tanh") * u


def lora(x, w, bias, a, b):
    return F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * 2.0


def lce(x, w, labels):
    logits = F.linear(x, w).float()
    labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)


# ---- builders: (fn, args) ----

def ex_attention(dtype=torch.float32, b=2, s=12, h=32, head_dim=16, seed=0):
    torch.manual_seed(seed)
    hq, hkv = 4, 2
    q = _t(b, s, hq, head_dim, dtype=dtype).transpose(1, 2).detach().requires_grad_()
    k = _t(b, s, hkv, head_dim, dtype=dtype).transpose(1, 2).detach().requires_grad_()
    v = _t(b, s, hkv, head_dim, dtype=dtype).transpose(1, 2).detach().requires_grad_()
    return attention, (q, k, v)


def ex_rms_norm(dtype=torch.float32, b=2, s=12, h=40, seed=0, **_):
    torch.manual_seed(seed)
    return rms, (_t(b, s, h, dtype=dtype), _t(h, dtype=dtype, scale=0.5) + 1)


def ex_layer_norm(dtype=torch.float32, b=2, s=12, h=40, seed=0, **_):
    torch.manual_seed(seed)
    w = (_t(h, dtype=dtype, grad=False) * 0.3 + 1).requires_grad_()
    return layer_norm, (_t(b, s, h, dtype=dtype), w, _t(h, dtype=dtype, scale=0.3))


def ex_rope(dtype=torch.float32, b=2, s=12, h=32, head_dim=16, seed=0):
    torch.manual_seed(seed)
    q = _t(b, s, 4, head_dim, dtype=dtype).transpose(1, 2).detach().requires_grad_()
    k = _t(b, s, 4, head_dim, dtype=dtype).transpose(1, 2).detach().requires_grad_()
    cos, sin = cos_sin(b, s, head_dim, dtype)
    return rope, (q, k, cos, sin)


def ex_swiglu(dtype=torch.float32, b=2, s=12, h=40, seed=0, **_):
    torch.manual_seed(seed)
    return swiglu, (_t(b, s, h, dtype=dtype), _t(b, s, h, dtype=dtype))


def ex_geglu(dtype=torch.float32, b=2, s=12, h=40, seed=0, **_):
    torch.manual_seed(seed)
    return geglu, (_t(b, s, h, dtype=dtype), _t(b, s, h, dtype=dtype))


def ex_lora(dtype=torch.float32, b=2, s=12, h=40, seed=0, **_):
    torch.manual_seed(seed)
    n, r = 24, 4
    return lora, (_t(b, s, h, dtype=dtype), _t(n, h, dtype=dtype, grad=False, scale=0.2),
                  _t(n, dtype=dtype, grad=False), _t(r, h, dtype=dtype, scale=0.2), _t(n, r, dtype=dtype, scale=0.2))


class _NF4Lora(torch.nn.Module):
    def __init__(self, k, n, r, dtype):
        import bitsandbytes as bnb
        super().__init__()
        lin = torch.nn.Linear(k, n, bias=True)
        q = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        q.bias = torch.nn.Parameter(lin.bias.data.clone().to(dtype), requires_grad=False)
        self.base = q.to("cpu")
        self.a = torch.nn.Parameter((torch.randn(r, k) * 0.2).to(dtype))
        self.b = torch.nn.Parameter((torch.randn(n, r) * 0.2).to(dtype))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * 2.0


def ex_lora_nf4(dtype=torch.float32, b=2, s=12, h=64, seed=0, **_):
    torch.manual_seed(seed)
    return _NF4Lora(h, 24, 4, dtype), (_t(b, s, h, dtype=dtype),)


def ex_linear_cross_entropy(dtype=torch.float32, b=2, s=12, h=40, seed=0, **_):
    torch.manual_seed(seed)
    labels = torch.randint(0, 53, (b, s))
    labels[0, :3] = -100
    return lce, (_t(b, s, h, dtype=dtype), _t(53, h, dtype=dtype, scale=0.5), labels)


EXAMPLES = {"attention": ex_attention, "rms_norm": ex_rms_norm, "layer_norm": ex_layer_norm, "rope": ex_rope,
            "swiglu": ex_swiglu, "geglu": ex_geglu, "lora": ex_lora, "lora_nf4": ex_lora_nf4,
            "linear_cross_entropy": ex_linear_cross_entropy}


def needs(name):
    """pytest marks an example needs (lora_nf4: bitsandbytes)."""
    import pytest
    if name == "lora_nf4":
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # noqa: BLE001
            return [pytest.mark.skip(reason="bitsandbytes not installed")]
    return []


def pattern_params():
    import pytest
    from fxopt.patterns import PATTERNS
    return [pytest.param(p.name, marks=needs(p.name), id=p.name) for p in PATTERNS]


# ---- running ----

def leaves(fn, args):
    params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + params


def clone_args(fn, args):
    """A copy of (fn, args) with the same values (modules deep-copied), so the compiled and eager runs are separate."""
    fn2 = copy.deepcopy(fn) if isinstance(fn, torch.nn.Module) else fn
    args2 = tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in args)
    return fn2, args2


def run_and_grads(fn, args, seed=9):
    """(output, grads of all leaves for a fixed random cotangent)."""
    out = fn(*args)
    ls = leaves(fn, args)
    if not ls or not out.requires_grad:
        return out.detach(), []
    torch.manual_seed(seed)
    g = torch.randn(out.shape).to(out.device, out.dtype)   # CPU draw: the same numbers on any device
    return out.detach(), list(torch.autograd.grad(out, ls, g, allow_unused=True))


def compile_fn(fn, opts, dynamic=None, backend="fxopt"):
    return torch.compile(fn, backend=backend, options=opts, dynamic=dynamic) if backend == "fxopt" else \
        torch.compile(fn, backend=backend, dynamic=dynamic)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, 0.1 sqrt(numel)): relative, with an RMS floor of 0.1 so that a mathematically zero
    tensor (dq, dk of attention over one key) computed as 1e-7 rounding noise two ways does not read as a 100%
    difference. The examples' inputs are O(1) randn, so the floor only matters for near-zero tensors."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 0.1 * b.numel() ** 0.5, 1e-12))


def worst_diff(a_out, a_grads, b_out, b_grads):
    """Largest `close` difference; NaN/Inf must sit at the same places with the same values."""
    worst = 0.0
    for a, b in zip([a_out] + a_grads, [b_out] + b_grads):
        if a is None or b is None:
            assert a is None and b is None, "grad presence differs"
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        assert torch.equal(fa, fb), "non-finite values at different places"
        if not fa.all():
            assert torch.equal(a[~fa].double().nan_to_num(), b[~fb].double().nan_to_num())
            a, b = a[fa], b[fb]
        if b.numel():
            worst = max(worst, close(a, b))
    return worst


def compare(fn, args, opts, dynamic=None):
    """Compile `fn` with fxopt, run fwd+bwd on a copy, and eager on the original: (worst rel diff, report)."""
    import fxopt
    cfn, cargs = clone_args(fn, args)
    out, grads = run_and_grads(compile_fn(cfn, opts, dynamic), cargs)
    rep = fxopt.last_report()
    ref, ref_grads = run_and_grads(fn, args)
    return worst_diff(out, grads, ref, ref_grads), rep


def reasons(rep, name=None):
    return " | ".join(r.reason for r in rep.rejected if name is None or r.pattern == name)


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}

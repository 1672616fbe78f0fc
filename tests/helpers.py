"""Shared test helpers: tiny random HF models, eager-vs-compiled comparison, graph-break counting."""
from __future__ import annotations

import copy

import torch

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, head_dim=16, use_cache=False,
             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def tiny_config(arch: str, **overrides):
    """SMALL config of `arch` with dropouts off (fxopt.coverage.tiny_config)."""
    from fxopt.coverage import tiny_config as build
    return build(arch, SMALL, **overrides)


def tiny_model(arch: str, attn: str = "sdpa", dtype=torch.float32, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn).to(dtype)
    m.config.use_cache = False
    if hasattr(m, "loss_type"):
        m.loss_type = "ForCausalLM"
    return m.train()


def batch(vocab=128, b=2, s=24, seed=2, ignore_prefix=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :ignore_prefix] = -100
    return ids, labels


def assert_trains_like(model, ref, loss, loss_tol: float, grad_tol: float, **inputs):
    """`loss` (from `model`, backward done) and every grad of `model` match `ref` run eagerly on `inputs`."""
    ref.zero_grad()
    rloss = ref(**inputs).loss
    rloss.backward()
    assert rel(loss, rloss) <= loss_tol, (float(loss), float(rloss))
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.grad is not None:
            assert rel(p.grad, q.grad) <= grad_tol


def compare_with_eager(model, options=None, steps=1, backend="fxopt", **batch_kw):
    """Train `steps` steps compiled and eager from the same weights; returns (worst rel diff, compiled model)."""
    ref = copy.deepcopy(model)
    cm = torch.compile(model, backend=backend, options=options) if options is not None else \
        torch.compile(model, backend=backend)
    worst = 0.0
    for i in range(steps):
        ids, labels = batch(seed=2 + i, **batch_kw)
        out = cm(input_ids=ids, labels=labels)
        out.loss.backward()
        rout = ref(input_ids=ids, labels=labels)
        rout.loss.backward()
        worst = max(worst, rel(out.loss, rout.loss))
        for (na, pa), (nb, pb) in zip(model.named_parameters(), ref.named_parameters()):
            assert (pa.grad is None) == (pb.grad is None), f"grad presence differs for {na}"
            if pa.grad is not None:
                worst = max(worst, rel(pa.grad, pb.grad))
    return worst, cm


def graph_breaks(fn, *args, **kwargs) -> int:
    """Number of graph breaks dynamo reports for fn(*args) (explain)."""
    torch._dynamo.reset()
    exp = torch._dynamo.explain(fn)(*args, **kwargs)
    return exp.graph_break_count

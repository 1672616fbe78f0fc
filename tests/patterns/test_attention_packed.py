"""Packed sequences: HF builds the attention mask from position_ids (same document & causal in position space);
fxopt recognises it and hands the kernel the document ids [B, S], never the dense [B, 1, S, S] mask.
Loss and grads match eager; a padding mask on top, or an unrelated integer tensor, keeps the dense read."""
import copy

import pytest
import torch

import fxopt
from fxopt.kernels import attention as K
from tests.helpers import rel, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def seen_masks(monkeypatch):
    """dtype and shape of every mask fxopt::attention receives (reference path: aot_eager on CPU)."""
    seen = []
    real = K.attention_reference

    def spy(q, k, v, mask, *args):
        seen.append(None if mask is None else (mask.dtype, tuple(mask.shape)))
        return real(q, k, v, mask, *args)
    monkeypatch.setattr(K, "attention_reference", spy)
    monkeypatch.setattr(K, "use_triton", lambda *t: False)
    return seen


def _run(model, **batch):
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    out = torch.compile(model, backend="fxopt", options={"inductor": False})(**batch)
    out.loss.backward()
    rout = ref(**batch)
    rout.loss.backward()
    worst = max([rel(out.loss, rout.loss)] + [rel(a.grad, b.grad) for a, b in zip(model.parameters(),
                                                                                    ref.parameters())])
    return worst, fxopt.last_report()


def _packed(b=2, s=40):
    ids = torch.randint(3, 128, (b, s))
    pos = torch.tensor([list(range(5)) + list(range(20)) + list(range(15)), list(range(7)) + list(range(33))][:b])
    return ids, pos


@pytest.mark.parametrize("arch,attn,window", [("llama", "sdpa", None), ("llama", "eager", None),
                                              ("mistral", "sdpa", None), ("mistral", "sdpa", 8),
                                              ("qwen2", "eager", None)])
def test_packed_mask_becomes_document_ids(arch, attn, window, seen_masks, fresh_dynamo):
    ids, pos = _packed()
    kw = {} if window is None else {"sliding_window": window}
    worst, r = _run(tiny_model(arch, attn=attn, **kw), input_ids=ids, position_ids=pos, labels=ids)
    assert r.matched["attention"] == 2 and not r.fallbacks
    assert worst <= 1e-5, worst
    assert seen_masks and all(m == (torch.int64, (2, 40)) for m in seen_masks), seen_masks


def test_padding_mask_on_top_is_read_densely(seen_masks, fresh_dynamo):
    ids, pos = _packed()
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, :3] = 0
    worst, r = _run(tiny_model("llama"), input_ids=ids, position_ids=pos, attention_mask=am, labels=ids)
    assert r.matched["attention"] == 2 and worst <= 1e-5
    assert seen_masks and all(m is not None and m[0] == torch.bool and len(m[1]) == 4 for m in seen_masks)


def test_documents_do_not_see_each_other(fresh_dynamo):
    """Changing the first document's tokens leaves the second document's logits unchanged (through the kernel,
    Triton interpreter)."""
    m = tiny_model("llama")
    cm = torch.compile(lambda **kw: m(**kw).logits, backend="fxopt", options={"inductor": False})
    ids, pos = _packed(b=1)
    other = ids.clone()
    other[0, :5] = torch.randint(3, 128, (5,))
    a, b = cm(input_ids=ids, position_ids=pos), cm(input_ids=other, position_ids=pos)
    assert fxopt.last_report().matched["attention"] == 2
    assert torch.allclose(a[0, 5:], b[0, 5:], atol=1e-6) and not torch.allclose(a[0, :5], b[0, :5])


def test_doc_ids_source_recognised_only_for_hf_formula():
    """The proof needs P = cumsum(diff(X, prepend=X[:, :1] - 1) != 1): another cumsum is not accepted."""
    import operator

    import torch.fx as fx

    from fxopt.patterns.attention_mask import _doc_ids_source
    g = fx.Graph()
    x = g.placeholder("x")
    first = g.call_function(operator.getitem, (x, (slice(None), slice(None, 1))))
    pre = g.call_function(torch.sub, (first, 1))
    d = g.call_function(torch.diff, (x,), {"prepend": pre, "dim": -1})
    ne = g.call_function(torch.ne, (d, 1))
    p = g.call_function(torch.cumsum, (ne, -1))
    assert _doc_ids_source(p) is x
    ne2 = g.call_function(torch.ne, (d, 2))
    assert _doc_ids_source(g.call_function(torch.cumsum, (ne2, -1))) is None


@pytest.mark.parametrize("arch,attn,window", [("llama", "sdpa", None), ("llama", "eager", None),
                                              ("mistral", "sdpa", 8), ("qwen2", "eager", None)])
def test_constant_mask_too_large_to_evaluate_is_still_causal(arch, attn, window, seen_masks, monkeypatch,
                                                              fresh_dynamo):
    """HF's causal mask without position_ids is a constant, but past MAX_EVAL_NUMEL (2^30: S > 32768) it is not
    evaluated; its conjuncts (positions from arange: one document per row; causal / window in positions) prove it
    causal / window, so the kernel gets flags and no mask (on the H200 at S = 65536 it was read as a 4 GiB tensor)."""
    from fxopt.patterns import attention_mask as AM
    monkeypatch.setattr(AM, "MAX_EVAL_NUMEL", 100)   # this test's [2, 1, 40, 40] mask counts as too large
    ids = torch.randint(3, 128, (2, 40))
    kw = {} if window is None else {"sliding_window": window}
    worst, r = _run(tiny_model(arch, attn=attn, **kw), input_ids=ids, labels=ids)
    assert r.matched["attention"] == 2 and not r.fallbacks
    assert worst <= 1e-5, worst
    assert seen_masks and all(m is None for m in seen_masks), seen_masks



def _cmp(op, left, right):
    """A graph computing op(left, right) from two constant tensors (each a torch.tensor node); returns the op node."""
    import torch.fx as fx
    g = fx.Graph()
    nodes = []
    for t in (left, right):
        n = g.call_function(torch.tensor, (t.tolist(),))
        n.meta["val"] = t
        nodes.append(n)
    out = g.call_function(op, tuple(nodes))
    out.meta["val"] = op(left, right)
    return out


@pytest.mark.parametrize("case", ["causal", "causal_q_first", "window", "strict", "docs_one", "docs_two", "unsorted",
                                  "float_vs_int", "batch_differs", "all"])
def test_outer_comparison_conjunct_decided_from_operands(case, monkeypatch):
    """transformers 5.17 builds the causal mask as kv_idx <= q_idx and docs[q] == docs[k] with index tensors
    [1, 1, S, 1] / [1, 1, 1, S]; at S = 65536 the [S, S] conjunct is too large to evaluate (the H200 8B step read it
    as a 4 GiB tensor). Each conjunct is decided from its operands; the answer must equal the dense evaluation."""
    import operator
    from fxopt.kernels.attention_masks import allowed_mask
    from fxopt.patterns import attention_mask as AM
    monkeypatch.setattr(AM, "MAX_EVAL_NUMEL", 100)   # the [.., 24, 24] comparisons count as too large
    S, W = 24, 5
    i = torch.arange(S)
    q, k = i[None, None, :, None], i[None, None, None, :]
    op, left, right, want = {
        "causal": (operator.le, k, q, (True, 0)),
        "causal_q_first": (operator.ge, q, k, (True, 0)),
        "window": (operator.gt, k, q - W, (False, W)),
        "strict": (operator.lt, k, q, None),
        "docs_one": (operator.eq, torch.zeros(1, 1, S, 1), torch.zeros(1, 1, 1, S), "all"),
        "docs_two": (operator.eq, (q >= 10).long(), (k >= 10).long(), None),
        "unsorted": (operator.le, k.flip(-1), q, None),
        "float_vs_int": (operator.le, k, q.double() + 0.5, (True, 0)),
        "batch_differs": (operator.le, torch.cat([k, k + 1]), torch.cat([q, q]), None),
        "all": (operator.le, k, q + S, "all"),
    }[case]
    node = _cmp(op, left, right)
    got = AM._outer_flags(node, S, S)
    assert got == want, (case, got)
    dense = op(left, right).expand(-1, -1, S, S)
    if got == "all":
        assert bool(dense.all())
    elif got is not None:
        assert torch.equal(dense[0, 0], allowed_mask(S, S, got[0], got[1], None, "cpu"))

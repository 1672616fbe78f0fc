"""Option validation (API.md): unknown keys and bad values are ValueErrors naming what is valid."""
import pytest

from fxopt.config import PATTERNS, parse, parse_budget


def test_defaults():
    c = parse(None, environ={})
    assert c.patterns == frozenset(PATTERNS) and c.memory_budget is None and not c.strict and c.inductor


@pytest.mark.parametrize("opts,needle", [
    ({"bogus": 1}, "valid keys"),
    ({"patterns": ["rmsnorm"]}, "valid names"),
    ({"disable": "nope"}, "valid names"),
    ({"patterns": 3}, "list of pattern names"),
    ({"strict": "yes"}, "True or False"),
    ({"inductor": 1}, "True or False"),
    ({"memory_budget": 1.5}, "fraction in (0, 1]"),
    ({"memory_budget": 0.0}, "fraction in (0, 1]"),
    ({"memory_budget": -3}, "must be > 0"),
    ({"memory_budget": "lots"}, "12GiB"),
    ({"memory_budget": True}, "fraction"),
])
def test_bad_options(opts, needle):
    with pytest.raises(ValueError, match=None) as e:
        parse(opts, environ={})
    assert needle in str(e.value)


def test_patterns_and_disable():
    c = parse({"patterns": ["rms_norm", "rope"], "disable": ["rope"]}, environ={})
    assert c.patterns == {"rms_norm"}
    c = parse({}, environ={"FXOPT_DISABLE": "rope, attention"})
    assert "rope" not in c.patterns and "attention" not in c.patterns and "rms_norm" in c.patterns
    with pytest.raises(ValueError, match="FXOPT_DISABLE"):
        parse({}, environ={"FXOPT_DISABLE": "ropee"})


def test_strict_env():
    assert parse({}, environ={"FXOPT_STRICT": "1"}).strict
    assert not parse({}, environ={"FXOPT_STRICT": "0"}).strict
    with pytest.raises(ValueError, match="FXOPT_STRICT"):
        parse({}, environ={"FXOPT_STRICT": "true"})


@pytest.mark.parametrize("value,expected", [("12GiB", 12 * 2**30), ("800MiB", 800 * 2**20), ("2GB", 2 * 10**9),
                                            ("1.5 gib", int(1.5 * 2**30)), (1000, 1000), (0.25, 0.25), (None, None)])
def test_budget_parsing(value, expected):
    assert parse_budget(value) == expected


def test_mode_validation():
    assert parse({}, mode="max-autotune", environ={}).inductor
    with pytest.raises(ValueError, match="mode"):
        parse({}, mode="turbo", environ={})


def test_cudagraphs_option_and_modes_reach_inductor():
    from fxopt.dynamo_backend import inductor_mode_patches
    assert parse({}, environ={}).cudagraphs is False and inductor_mode_patches(parse({}, environ={})) == {}
    assert inductor_mode_patches(parse({"cudagraphs": True}, environ={})) == {"triton.cudagraphs": True}
    assert inductor_mode_patches(parse({}, mode="reduce-overhead", environ={})) == {"triton.cudagraphs": True}
    assert inductor_mode_patches(parse({}, mode="default", environ={})) == {}
    p = inductor_mode_patches(parse({}, mode="max-autotune-no-cudagraphs", environ={}))
    assert p.get("max_autotune") is True and "triton.cudagraphs" not in p
    with pytest.raises(ValueError, match="cudagraphs.*inductor"):
        parse({"cudagraphs": True, "inductor": False}, environ={})
    with pytest.raises(ValueError, match="True or False"):
        parse({"cudagraphs": "yes"}, environ={})
    assert parse({}, environ={"FXOPT_CUDAGRAPHS": "1"}).cudagraphs
    assert not parse({"inductor": False}, environ={"FXOPT_CUDAGRAPHS": "1"}).cudagraphs   # aot_eager: env ignored
    with pytest.raises(ValueError, match="FXOPT_CUDAGRAPHS"):
        parse({}, environ={"FXOPT_CUDAGRAPHS": "yes"})


def test_cudagraphs_patch_is_handed_to_inductor_and_cpu_graphs_still_run(monkeypatch, fresh_dynamo):
    """The option reaches compile_fx's config patches; on CPU tensors Inductor skips the capture and the result is
    unchanged (CUDA graphs themselves are exercised by the GPU benchmarks, run_suite.py `cudagraphs`)."""
    import torch
    import torch._inductor.compile_fx as cfx
    seen = []
    real = cfx.compile_fx

    def spy(gm, inputs, *a, **k):
        seen.append(dict(k.get("config_patches") or {}))
        return real(gm, inputs, *a, **k)
    monkeypatch.setattr(cfx, "compile_fx", spy)

    def f(x, w):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    x, w = torch.randn(3, 8), torch.randn(8)
    out = torch.compile(f, backend="fxopt", options={"cudagraphs": True})(x, w)
    assert seen and seen[0].get("triton.cudagraphs") is True   # (compile_fx re-enters itself without patches)
    torch.testing.assert_close(out, f(x, w))


def test_recompute_no_dropout_is_on_unless_0(monkeypatch):
    from fxopt.recompute.cost import recompute_no_dropout
    monkeypatch.delenv("FXOPT_RECOMPUTE_NO_DROPOUT", raising=False)
    assert recompute_no_dropout()
    for value, want in (("", True), ("1", True), ("0", False)):
        monkeypatch.setenv("FXOPT_RECOMPUTE_NO_DROPOUT", value)
        assert recompute_no_dropout() is want
    monkeypatch.setenv("FXOPT_RECOMPUTE_NO_DROPOUT", "yes")
    with pytest.raises(ValueError, match="FXOPT_RECOMPUTE_NO_DROPOUT must be 0 or 1"):
        recompute_no_dropout()

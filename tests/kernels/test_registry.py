"""Shared kernel plumbing: while a CUDA graph is being recorded no tuner may time or synchronize."""
import time

import pytest
import torch

from fxopt.kernels import attention, lora, nf4, registry


def test_capturing_is_false_outside_a_capture():
    assert registry.capturing() is False


def test_tuners_do_not_time_while_capturing(monkeypatch):
    """lora's measured choices, nf4's fused-GEMM configs and attention's block configs: under capture each takes a
    choice without timing (bench_ms synchronizes: not permitted while recording) and caches nothing (nf4's
    guard is the same two lines around its tuner; its GPU path cannot run here)."""
    def no_bench(*a, **k):
        raise AssertionError("timed while capturing")
    for mod in (lora, nf4, attention):
        monkeypatch.setattr(mod, "capturing", lambda: True)
        monkeypatch.setattr(mod, "bench_ms", no_bench)

    table, ran = {}, []
    out = lora._run_choice("FXOPT_TEST_CHOICE", table, ("k",), {"a": lambda: ran.append("a") or 1,
                                                                 "b": lambda: ran.append("b") or 2},
                           default="b", measure=True)
    assert out == 2 and ran == ["b"] and table == {}
    table[("k",)] = "a"                       # an earlier, uncaptured call measured "a": capture keeps it
    assert lora._run_choice("FXOPT_TEST_CHOICE", table, ("k",), {"a": lambda: 1, "b": lambda: 2},
                            default="b", measure=True) == 1

    monkeypatch.setattr(attention, "interpreting", lambda: False)   # the GPU path of the block-config tuner
    monkeypatch.delenv("FXOPT_ATTN_FWD_CONFIG", raising=False)
    seen = []
    attention.launch_tuned("fwd", ("capture-test",), seen.append, 64)
    assert len(seen) == 1 and seen[0] in attention.CONFIGS["fwd"] and ("fwd", ("capture-test",)) not in attention.TUNED


def test_fxopt_tune_0_takes_defaults_without_timing(monkeypatch):
    """FXOPT_TUNE=0 (quick compiles): lora's measured choices take their default, attention its first fitting
    config, with no timing; unset, the same calls time the candidates."""
    timed = []
    for mod in (lora, attention):
        monkeypatch.setattr(mod, "bench_ms", lambda fn, **k: timed.append(fn) or 1.0)
    monkeypatch.setattr(attention, "interpreting", lambda: False)
    monkeypatch.delenv("FXOPT_ATTN_FWD_CONFIG", raising=False)
    monkeypatch.delenv("FXOPT_ATTN_AUTOTUNE", raising=False)
    cands = {"a": lambda: 1, "b": lambda: 2}

    monkeypatch.setenv("FXOPT_TUNE", "0")
    assert not registry.tuning()
    table = {}
    assert lora._run_choice("FXOPT_TEST_CHOICE", table, ("k",), cands, default="b", measure=True) == 2
    seen = []
    attention.launch_tuned("fwd", ("tune0-test",), seen.append, 64)
    fitting = [c for c in attention.CONFIGS["fwd"] if attention.fits("fwd", c, 64)]
    assert timed == [] and table == {} and seen == fitting[:1]

    monkeypatch.setenv("FXOPT_TUNE", "1")
    assert lora._run_choice("FXOPT_TEST_CHOICE", table, ("k",), cands, default="b", measure=True) in (1, 2)
    assert len(timed) == 2 and table[("k",)] in cands
    seen = []                                 # fp32 (IEEE dots) attention: the smallest tiles, untimed
    attention.launch_tuned("fwd", ("fp32-test",), seen.append, 64, tune=False)
    assert len(timed) == 2 and seen == [min(fitting, key=lambda c: attention.smem_bytes("fwd", c, 64))]


def test_attention_head_dim_256_times_its_own_configs(monkeypatch):
    """Head dim 256 has its own candidates, all within the shared memory and register estimates, so the tuner
    times each (the d<=128 lists left dk/dv one fitting config there); the fastest is kept for the key."""
    monkeypatch.setattr(attention, "interpreting", lambda: False)
    monkeypatch.delenv("FXOPT_TUNE", raising=False)
    monkeypatch.delenv("FXOPT_ATTN_AUTOTUNE", raising=False)
    for kind in ("fwd", "dkdv", "dq"):
        monkeypatch.delenv(f"FXOPT_ATTN_{kind.upper()}_CONFIG", raising=False)
        listed = attention.CONFIGS_D256[kind]
        assert attention.candidates(kind, 256) == listed and attention.candidates(kind, 128) == attention.CONFIGS[kind]
        assert all(attention.fits(kind, c, 256) for c in listed)
        fast = listed[-1]
        monkeypatch.setattr(attention, "bench_ms", lambda fn: fn())
        ran = []
        attention.launch_tuned(kind, ("d256-test",), lambda c: ran.append(c) or (0.5 if c == fast else 1.0), 256)
        assert ran == listed + [fast] and attention.TUNED.pop((kind, ("d256-test",))) == fast


def test_a_choice_made_before_skips_the_tuning_checks(monkeypatch):
    """Once a key has its choice, _run_choice runs it without asking whether it may time or is capturing (host time
    on every call); a new key still asks."""
    asked = []
    monkeypatch.setattr(lora, "capturing", lambda: asked.append("capturing") or True)
    monkeypatch.delenv("FXOPT_TEST_CHOICE", raising=False)
    monkeypatch.delenv("FXOPT_TUNE", raising=False)
    table = {("known",): "b"}
    cands = {"a": lambda: 1, "b": lambda: 2}
    assert lora._run_choice("FXOPT_TEST_CHOICE", table, ("known",), cands, default="a", measure=True) == 2
    assert asked == []
    assert lora._run_choice("FXOPT_TEST_CHOICE", table, ("new",), cands, default="a", measure=True) == 1
    assert asked == ["capturing"] and ("new",) not in table   # capturing: the default, untimed, not recorded


def test_measured_choices_are_logged(monkeypatch):
    """Each measured first-call choice is logged with every candidate's time (benchmarks record the log)."""
    monkeypatch.setattr(lora, "bench_ms", lambda fn: {1: 2.0, 2: 0.5}[fn()])
    monkeypatch.setattr(registry, "TUNING_LOG", [])
    monkeypatch.delenv("FXOPT_TUNE", raising=False)
    out = lora._run_choice("FXOPT_TEST_CHOICE", {}, ("log-test",), {"a": lambda: 1, "b": lambda: 2}, default="a",
                           measure=True)
    assert out == 2
    assert registry.TUNING_LOG == [("lora", "('log-test',)", "b", {"a": 2.0, "b": 0.5})]


# Caches in fxopt/kernels and where each device tensor in them is made before the first run. Made lazily on the
# first run instead, under CUDA graphs the tensor lands in the graph's pool, a live allocation no graph output owns
# (H200: the NF4 code book, 13b6842; a dequantization lookup table, f7eef8b: "Detected 1 tensor(s) in the
# cudagraph pool not tracked as outputs").
CACHES = {"nf4._nf4_code_cached": "patterns/lora.py makes it at compile time (replace_lora calls nf4_code)",
          "registry.triton_available": "a bool, no tensor",
          "registry._cuda_sms": "an int, no tensor"}


def test_every_cache_in_kernels_is_made_before_the_first_run():
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[2] / "fxopt"
    found = {f"{p.stem}.{name}" for p in (root / "kernels").glob("*.py")
             for name in re.findall(r"@functools\.(?:lru_cache|cache)\b[^\n]*\n(?:@[^\n]*\n)*def (\w+)", p.read_text())}
    assert found == set(CACHES), f"caches in fxopt/kernels without a compile-time maker: {sorted(found - set(CACHES))}"
    assert "nf4_code(device)" in (root / "patterns" / "lora.py").read_text()


@pytest.mark.gpu
def test_bench_ms_times_the_gpu_not_the_host():
    """A run with 1 ms of host work and microseconds of GPU work times as the GPU's (the spin ahead of the timed
    runs lets the host queue them all); without it each timed run waited ~1 ms on the host."""
    x = torch.zeros(1, device="cuda")

    def host_heavy():
        time.sleep(1e-3)
        x.add_(1)
    assert registry.bench_ms(host_heavy) < 0.3


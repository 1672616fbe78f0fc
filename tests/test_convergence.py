"""Short convergence check (benchmarks/convergence.py at toy size): a 2-layer Llama trained 30 steps on CPython's
English text, eager and fxopt from the same weights, seeds and batches; the loss curves agree and go down."""
import pytest
import torch

from benchmarks import convergence as C

pytest.importorskip("tokenizers")
pytest.importorskip("datasets")
pytestmark = pytest.mark.filterwarnings("ignore")

STEPS = 30
# Per-step |loss_fxopt - loss_eager| over the 30 steps, measured (torch 2.13 CPU): fp32 max 1.4e-6 (same math up to
# summation order); bf16 max 9.8e-4 (eager rounds every op's output to bf16, the fused ops keep fp32 inside).
TOL = {"fp32": {"max_abs": 2e-5}, "bf16": {"max_abs": 1e-2}}


@pytest.fixture
def reference_ops(monkeypatch):
    """fxopt ops run their PyTorch reference (read per call from TRITON_INTERPRET): the Triton kernels' numerics are
    tests/kernels/'s job; this test is about the rewritten graph over many steps. One thread: on a shared 2-core
    machine two threads spin-wait (measured 10x slower steps)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    text = C.load_text()
    tok = C.train_tokenizer(text, 512)
    train, _ = C.make_datasets(tok, text, seq=32)
    data = C.batches(train, batch=4, steps=STEPS, seed=0)
    cfg = C.model_config(tok.get_vocab_size() + 1, layers=2, hidden=64, seq=32)
    return cfg, data


def test_batches_are_real_text_in_a_fixed_order(setup):
    cfg, data = setup
    assert len(data) == STEPS and tuple(data[0].shape) == (4, 32) and data[0].dtype == torch.int64
    assert int(data[0].max()) < cfg.vocab_size and len(set(data[0].flatten().tolist())) > 20
    again = C.batches(C.make_datasets(C.train_tokenizer(C.load_text(), 512), C.load_text(), seq=32)[0], 4, 3, 0)
    assert all(torch.equal(a, b) for a, b in zip(again, data))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fxopt_loss_curve_matches_eager(setup, dtype, fresh_dynamo, reference_ops):
    cfg, data = setup
    eager = C.train(cfg, data, C.DTYPES[dtype], compiled=False, lr=3e-3, warmup=5)
    fx = C.train(cfg, data, C.DTYPES[dtype], compiled=True, lr=3e-3, warmup=5)
    st = C.compare(eager["losses"], fx["losses"], smooth=5)
    assert C.check(st, TOL[dtype]) == [], st
    m = fx["report"]["matched"]
    assert m["attention"] == 2 and m["rms_norm"] == 5 and m["rope"] == 2 and m["swiglu"] == 2, m
    assert m["linear_cross_entropy"] == 1, m          # the compiled function returns only the loss
    assert fx["report"]["fallbacks"] == [] and fx["report"]["graphs"] == 1
    assert st["final_smoothed_fxopt"] < eager["losses"][0] - 0.5      # it learns


def test_gpu_script_runs_on_cpu_at_the_tiny_shape(tmp_path, fresh_dynamo, reference_ops):
    """benchmarks/convergence_gpu.py end to end at train_step's "tiny" shape (bf16, LoRA, BPE ids inside the shape's
    vocab 512): three runs, files, verdict; then the time guard (no step may start) leaves a partial result."""
    import json
    import os

    from benchmarks import convergence_gpu as G
    out = str(tmp_path / "c")
    small = ["--device", "cpu", "--shape", "tiny", "--vocab", "300", "--batch", "2", "--seq", "32", "--warmup", "2",
             "--no-inductor"]
    rc = G.main(small + ["--steps", "8", "--out", out])
    with open(out + ".json") as f:
        r = json.load(f)
    runs = r["runs"]["bf16"]
    assert rc == 0 and r["verdict"] == "pass" and not r["partial"] and r["failures"] == [], r["failures"]
    assert all(len(runs[n]["losses"]) == 8 and runs[n]["tok_per_s"] > 0 for n in ("eager", "fxopt", "eager_perturbed"))
    assert runs["eager"]["init"] == runs["fxopt"]["init"] != runs["eager_perturbed"]["init"]
    m = runs["fxopt"]["report"]["matched"]
    assert m["lora"] == 14 and m["linear_cross_entropy"] == 1 and m["attention"] == 2, m
    assert r["vocab"]["model"] == 512 and r["vocab"]["tokenizer_ids"] == 301 and r["lora"]["alpha"] == 32
    assert set(r["stats"]) >= {"bf16", "bf16_eager_perturbed"} and os.path.getsize(out + ".png") > 10_000

    rc = G.main(small + ["--steps", "8", "--time-limit", "5", "--out", out + "_t"])
    with open(out + "_t.json") as f:
        r = json.load(f)
    assert rc == 2 and r["partial"] and r["verdict"] == "incomplete" and r["runs"]["bf16"] == {}, r

    # several noise samples and an fxopt variant: the variant's environment reaches its compile and no other
    assert "FXOPT_DISABLE" not in os.environ
    rc = G.main(small + ["--steps", "4", "--noise-seeds", "2", "--fxopt-variant", "nolora:FXOPT_DISABLE=lora",
                         "--out", out + "_v"])
    with open(out + "_v.json") as f:
        r = json.load(f)
    runs = r["runs"]["bf16"]
    assert rc == 0 and r["planned"] == ["eager", "fxopt", "eager_perturbed", "eager_perturbed_2", "fxopt_nolora"]
    assert runs["eager_perturbed"]["init"] != runs["eager_perturbed_2"]["init"]
    assert runs["fxopt_nolora"]["report"]["matched"].get("lora", 0) == 0 and runs["fxopt"]["report"]["matched"]["lora"] == 14
    assert r["stats"]["bf16_noise_max"]["samples"] == 2 and "bf16_fxopt_nolora" in r["stats"]
    assert "FXOPT_DISABLE" not in os.environ
    with pytest.raises(SystemExit, match="NAME:KEY=VAL"):
        G.main(small + ["--fxopt-variant", "nolora", "--out", out + "_bad"])

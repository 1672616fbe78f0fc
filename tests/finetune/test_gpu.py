"""GPU: `fxopt finetune` with the automatic precision (bf16 on the H200) and Inductor; packed vs padded batches
(tokens/s counts real tokens only, so the ratio is the speedup from not computing padding)."""
import json
import os
import statistics

import pytest
import torch

from fxopt.finetune import finetune

from tests.finetune.conftest import write_jsonl

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory, offline):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    d = tmp_path_factory.mktemp("llama_gpu")
    tok = offline.train_tokenizer()
    m = offline.tiny_llama(len(tok), layers=4, hidden=512, max_position_embeddings=2048)
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _tok_s(out_dir, skip=5):
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "log.jsonl"))]
    return statistics.median(r["tok_s"] for r in rows[skip:])


def test_packed_vs_padded_bf16(gpu_model, paragraphs, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": p} for p in paragraphs[:600]])
    common = dict(seq_len=1024, batch_size=4, max_steps=30, progress=False, quiet=True, save_steps=None,
                  cache_dir=str(tmp_path / "c"))
    packed = finetune(gpu_model, data, output_dir=str(tmp_path / "packed"), **common)
    assert packed.precision == "bf16" and all(x == x for x in packed.losses)
    padded = finetune(gpu_model, data, output_dir=str(tmp_path / "padded"), packing=False, export="", **common)
    tp, tq = _tok_s(packed.output_dir), _tok_s(padded.output_dir)
    info = packed.data_info
    print(f"\npacking: {info['documents']} docs -> {info['packed_rows']} rows ({100 * info['packed_fill']:.0f}% full); "
          f"padding to seq_len would be {100 * info['pad_fraction_at_seq_len']:.0f}%; "
          f"tok/s packed {tp:.0f} vs padded {tq:.0f} (x{tp / tq:.2f})")
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(packed.merged_dir, dtype=torch.bfloat16).cuda()
    ids = torch.tensor([list(range(3, 60))], device="cuda")
    out = merged.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_fp32_turns_on_tf32(gpu_model, jsonl, tmp_path):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs Ampere+")
    r = finetune(gpu_model, jsonl, precision="fp32", max_steps=2, seq_len=256, progress=False, quiet=True,
                 export="", output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"))
    assert r.precision == "fp32" and torch.backends.cuda.matmul.allow_tf32


def test_fp16_grad_scaler(gpu_model, jsonl, tmp_path):
    r = finetune(gpu_model, jsonl, precision="fp16", max_steps=3, seq_len=256, progress=False, quiet=True,
                 export="", output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), save_steps=3)
    assert r.precision == "fp16" and all(x == x for x in r.losses)
    st = torch.load(os.path.join(r.output_dir, "checkpoint-3", "training_state.pt"), weights_only=False)
    assert st["scaler"] is not None

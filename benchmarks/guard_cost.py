"""Dynamo's guards on a compiled QLoRA step, on CPU: how many of each kind, and the time of one guard check, for
tiny random Llama models of several depths (peft LoRA on every linear over bitsandbytes NF4, compiled as
train_step.py's loss-only function with fxopt and aot_eager). The guards are Dynamo's, made while it traces HF's,
peft's and bitsandbytes' Python; a backend cannot remove them. Under CUDA graphs the step's first kernel waits for
this check (the 8B step with graphs: "TorchDynamo Cache Lookup" 7.6 ms of CPU time in its profile, tag
cg-21g-s17).

usage: python benchmarks/guard_cost.py [--layers 4 16] [--out benchmarks/results/guard_cost_cpu.json]
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             max_position_embeddings=256, head_dim=16, use_cache=False, tie_word_embeddings=False)


def kinds(manager, out):
    """Count the leaf guards under a guard manager by their class name (TENSOR_MATCH, LAMBDA_GUARD, ...)."""
    for g in manager.get_leaf_guards():
        name = type(g).__name__
        out[name] = out.get(name, 0) + 1
    children = list(manager.get_child_managers())
    if hasattr(manager, "get_key_value_managers"):   # a dict's guards sit under its key and value managers
        for key_mgr, value_mgr in manager.get_key_value_managers().values():
            children += [mgr for mgr in (key_mgr, value_mgr) if mgr is not None]
    for child in children:
        kinds(child, out)
    return out


def measure(layers, reps=200):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.modeling_outputs import CausalLMOutput
    import fxopt  # noqa: F401 - registers the backend
    from fxopt.coverage import tiny_config
    cfg = tiny_config("llama", SMALL, num_hidden_layers=layers)
    folder = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.float32, device_map="cpu")
    m.config.use_cache = False
    m.loss_type = "ForCausalLM"
    model = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")).train()

    def loss_only(**batch):
        return CausalLMOutput(loss=model(**batch).loss)
    f = torch.compile(loss_only, backend="fxopt", options={"inductor": False})
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    for _ in range(2):
        f(input_ids=ids, labels=ids).loss.backward()
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    entries = _debug_get_cache_entry_list(loss_only.__code__)
    gm = entries[0].guard_manager
    # loss_only's frame: its argument and its closure cells (model, CausalLMOutput)
    frame = {"batch": {"input_ids": ids, "labels": ids},
             **{n: c.cell_contents for n, c in zip(loss_only.__code__.co_freevars, loss_only.__closure__)}}
    assert gm.check(frame), gm.check_verbose(frame)
    t0 = time.perf_counter()
    for _ in range(reps):
        gm.check(frame)
    us = (time.perf_counter() - t0) / reps * 1e6
    count = kinds(gm.root, {})
    epilogue = len(gm.root.get_epilogue_lambda_guards()) if hasattr(gm.root, "get_epilogue_lambda_guards") else 0
    count["epilogue LAMBDA_GUARD (Python, checked last)"] = epilogue
    return dict(layers=layers, cache_entries=len(entries), check_us=round(us, 1), us_per_layer=round(us / layers, 1),
                leaf_guards=sum(count.values()), by_kind=dict(sorted(count.items(), key=lambda kv: -kv[1])))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    import torch
    from benchmarks.kernel_bench.common import environment
    rows = []
    for n in a.layers:
        torch._dynamo.reset()
        rows.append(measure(n))
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        env = environment(command="python " + " ".join(sys.argv))
        json.dump(dict(env, device="cpu", what=__doc__.split("\n\n")[0], rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()

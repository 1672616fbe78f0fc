"""LoRA fine-tuning compiled with fxopt on several GPUs, under DDP or FSDP2, launched with torchrun.

    torchrun --nproc-per-node 2 examples/multi_gpu_lora.py              # DDP; a tiny random Llama on English text
    torchrun --nproc-per-node 2 examples/multi_gpu_lora.py --fsdp2      # FSDP2: fully_shard + compile per layer
    torchrun --nproc-per-node 2 examples/multi_gpu_lora.py --model DIR  # your model folder
    python examples/multi_gpu_lora.py                                   # one process: the same code, world size 1

One process per GPU over NCCL; without CUDA the same runs on the CPU over gloo. Each step's global batch is cut
into one slice per rank, so the loss curve does not depend on the number of GPUs (up to reduction order).
- DDP: `torch.compile(DDP(model), backend="fxopt")` as one graph (`optimize_ddp = False`): DDPOptimizer would cut the
  graph at gradient-bucket boundaries and a cut inside a pattern loses that match; LoRA gradients are small.
- FSDP2: `fully_shard` each decoder layer and compile it (`layer.compile(backend="fxopt")`), then shard the root;
  the embedding, final norm, LM head and loss run eager (torchtitan's recipe).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
Measured on two H200s: benchmarks/results/multi_gpu_h200x2.md (benchmarks/multi_gpu.py, the benchmark version).
"""
from __future__ import annotations

import argparse
import os
import sys

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in MULTICAST_OFF.items():   # before torch.distributed starts
    os.environ.setdefault(_k, _v)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offline_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local HF model folder (default: a tiny random Llama)")
    p.add_argument("--fsdp2", action="store_true", help="FSDP2 (fully_shard per decoder layer) instead of DDP")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=8, help="rows per step over all ranks")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--no-inductor", action="store_true", help="hand off to aot_eager (fast compile, CPU tests)")
    p.add_argument("--init-method", default="env://", help="process-group rendezvous (torchrun sets env://)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fxopt
    import fxopt.hf

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" in os.environ or args.init_method != "env://":
            dist.init_process_group("nccl" if cuda else "gloo", init_method=args.init_method,
                                    rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of the {world} ranks")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32

    # every rank builds the same weights (seeded) or loads the same folder
    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        tok = offline_text.train_tokenizer()
        model = offline_text.tiny_llama(len(tok)).to(dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM")).to(device)
    options = {"inductor": not args.no_inductor}

    if world > 1 and args.fsdp2:
        from torch.distributed.fsdp import fully_shard
        for layer in fxopt.hf.decoder_layers(model):
            fully_shard(layer)
            layer.compile(backend="fxopt", options=options)
        fully_shard(model)
        step_model = model
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        torch._dynamo.config.optimize_ddp = False
        step_model = torch.compile(DDP(model, device_ids=[device.index] if cuda else None), backend="fxopt",
                                   options=options)
    else:
        step_model = torch.compile(model, backend="fxopt", options=options)

    blocks = offline_text.token_blocks(tok, args.seq_len, n_blocks=args.steps * args.global_batch)
    ids = torch.tensor(blocks["input_ids"])
    per = args.global_batch // world
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for step in range(args.steps):
        start = (step * args.global_batch) % max(1, len(ids) - args.global_batch + 1)
        rows = ids[start + rank * per:start + (rank + 1) * per].to(device)
        loss = step_model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().float()
        if world > 1:   # each rank's loss is over its slice; the step's loss is their mean (equal slices)
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        if rank == 0:
            print(f"step {step:3d} loss {losses[-1]:.4f}", flush=True)
    report = fxopt.last_report()
    if rank == 0:
        print(report)
    if report is None or not sum(report.matched.values()):
        raise SystemExit(f"rank {rank}: fxopt matched nothing")
    return dict(losses=losses, matched=dict(report.matched), world=world, fsdp2=args.fsdp2)


if __name__ == "__main__":
    out = main()
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()

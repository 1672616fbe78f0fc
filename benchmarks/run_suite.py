"""Run a list of train-step benchmarks, each in its own process with a timeout; append one JSON line per run.

  python benchmarks/run_suite.py quick --out $OUT/train_step.jsonl
  python benchmarks/run_suite.py qlora8b --only nogc          # a regex over the run ids
  python benchmarks/run_suite.py full --list                  # show the run ids, run nothing

A run that fails (package missing, crash, OOM, timeout) still gives a row, with "error". The whole suite stops
starting runs when --time-limit is near (default 530 s where $OUT is set, i.e. on the device machine, whose
commands are cut at 600 s), and records the runs it skipped. Full child logs go to <out>.log.
"""
import argparse, importlib.util, json, os, re, shutil, signal, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_STEP = os.path.join(HERE, "train_step.py")


def run(shape, mode, variant, gc=False, batch=4, seq=2048, steps=8, warmup=3, timeout=420, loss_only=False,
        profile=False, fxopt_options=None, tag="", mem_peak=False):
    return dict(shape=shape, mode=mode, variant=variant, gc=gc, batch=batch, seq=seq, steps=steps, warmup=warmup,
                timeout=timeout, loss_only=loss_only, profile=profile, fxopt_options=fxopt_options, tag=tag,
                mem_peak=mem_peak)


def run_id(r):
    lo = "-lossonly" if r.get("loss_only") else ""
    tag = f"-{r['tag']}" if r.get("tag") else ""
    return f"{r['shape']}-{r['mode']}-b{r['batch']}x{r['seq']}-{'gc' if r['gc'] else 'nogc'}-{r['variant']}{lo}{tag}"


def grid(shape, mode, variants, gcs=(False,), **kw):
    return [run(shape, mode, v, gc=g, **kw) for g in gcs for v in variants]


# fxopt runs right after eager in each group, so a suite cut short by its time limit still measures it.
QUICK = grid("1b", "lora", ["eager", "fxopt", "inductor", "liger", "unsloth"], steps=6, warmup=2, timeout=300)
QLORA8B = (grid("8b", "qlora", ["eager", "fxopt", "inductor", "unsloth"], gcs=(True, False), batch=2, steps=6,
                warmup=2, timeout=420)
           + grid("8b", "qlora", ["fxopt"], gcs=(False, True), batch=2, steps=6, warmup=2, timeout=300, loss_only=True,
                  profile=True))
# The speed-memory frontier of 1B LoRA: fxopt at fractions of its save-everything activation peak.
# torch's own activation_memory_budget at the same fractions, for comparison (issue 10).
BUDGETS1B = (grid("1b", "lora", ["fxopt:0.8", "fxopt:0.6", "fxopt:0.4"], steps=6, warmup=2, timeout=200,
                  loss_only=True)
             + grid("1b", "lora", ["inductor:0.8", "inductor:0.6"], steps=6, warmup=2, timeout=200))
# The 8B QLoRA points of the frontier (issue 10: three budgets at each shape; unsloth with checkpointing: 10.1k tok/s
# at 7.08 GiB), without gradient checkpointing, fxopt planning the recomputation.
# Resident 5.84 GiB + activations 19.62 GiB without a budget (train_step_h200.md): 1.2GiB of activations aims at
# the 7 GiB point (if infeasible, the row names the smallest achievable budget).
BUDGETS8B = grid("8b", "qlora", ["fxopt:0.5", "fxopt:0.2", "fxopt:1.2GiB"], batch=2, steps=4, warmup=2, timeout=240,
                 loss_only=True)
# What linear_cross_entropy does to the whole step (issue 6): the same fxopt run with that one pattern off.
# Profiled: without it the step measured 90 ms slower (41.5k vs 76.7k tok/s), far above the op's own ~20 ms.
NOLCE1B = grid("1b", "lora", ["fxopt"], steps=6, warmup=2, timeout=200, loss_only=True, profile=True,
               fxopt_options={"disable": ["linear_cross_entropy"]}, tag="no-lce")
# CUDA graphs (fxopt option "cudagraphs"): the 8B QLoRA step waited on the CPU (GPU busy 249 of 462 ms); replayed
# as graphs, the per-op CPU cost is paid once. Plus the 1B step, and the 1B budget point aimed at <= 10.9 GiB.
CUDAGRAPHS = (grid("8b", "qlora", ["fxopt"], batch=2, steps=6, warmup=3, timeout=300, loss_only=True, profile=True,
                   fxopt_options={"cudagraphs": True}, tag="cg")
              + grid("1b", "lora", ["fxopt", "fxopt:0.75"], steps=6, warmup=3, timeout=200, loss_only=True,
                     profile=True, fxopt_options={"cudagraphs": True}, tag="cg"))
# The frontier again with CUDA graphs (the first cudagraphs run: 1B 79.9k tok/s, fxopt:0.75 78.7k at 10.37 GiB; the
# runs without graphs measured CPU-bound when another process shared the host). 8B QLoRA: 0.6 aims at <= 21 GiB
# (resident 5.84 + 0.6 x 19.62), 1.2GiB at unsloth's 7.08 GiB point; 1B: 1.15GiB at unsloth's 3.71 GiB point.
CG8B = grid("8b", "qlora", ["fxopt:0.6", "fxopt:1.2GiB", "fxopt:0.2"], batch=2, steps=5, warmup=3, timeout=200,
            loss_only=True, fxopt_options={"cudagraphs": True}, tag="cg")
CG1B = grid("1b", "lora", ["fxopt:0.6", "fxopt:0.4", "fxopt:1.15GiB"], steps=6, warmup=3, timeout=150, loss_only=True,
            fxopt_options={"cudagraphs": True}, tag="cg")
# The low-memory points after backward detaches were dropped and LCE chunks became plannable (fxopt plan, meta
# trace: smallest activation peak 1B 1.22 GiB, 8B 1.52 GiB): unsloth's checkpointed points are 3.71 GiB (1B) and
# 7.08 GiB (8B) in all; resident 2.43 / 5.78 GiB.
LOWMEM = (grid("1b", "lora", ["fxopt:1.25GiB", "fxopt:0.4"], steps=6, warmup=3, timeout=150, loss_only=True,
               fxopt_options={"cudagraphs": True}, tag="cg")
          + grid("8b", "qlora", ["fxopt:1.6GiB", "fxopt:0.2"], batch=2, steps=5, warmup=3, timeout=200, loss_only=True,
                 fxopt_options={"cudagraphs": True}, tag="cg"))
# The same low budgets with FXOPT_RECOMPUTE_NO_DROPOUT=1 (set by gpu_session.sh stage lowmem_sdpa): the SDPA calls
# the dispatch keeps become recomputable; fxopt plan's smallest (fxopt's attention) is 1.22 GiB (1B) / 1.52 GiB (8B),
# the H200 compile's was 1.55 / 2.31 GiB with SDPA's outputs saved.
LOWMEM_SDPA = (grid("1b", "lora", ["fxopt:1.25GiB"], steps=6, warmup=3, timeout=150, loss_only=True,
                    fxopt_options={"cudagraphs": True}, tag="cg-sdparc")
               + grid("8b", "qlora", ["fxopt:1.6GiB", "fxopt:0.2"], batch=2, steps=5, warmup=3, timeout=200,
                      loss_only=True, fxopt_options={"cudagraphs": True}, tag="cg-sdparc"))
# Host offload (option "offload"): 8B QLoRA under 7.0 GiB in all (~5.78 GiB resident), against unsloth's checkpointed
# 10.1k tok/s at 7.08 GiB. fxopt plan (meta): smallest predicted activation peak 1.52 GiB -> 0.96 with offloading.
OFFLOAD8B = grid("8b", "qlora", ["fxopt:1.15GiB", "fxopt:1.35GiB"], batch=2, steps=5, warmup=3, timeout=260,
                 loss_only=True, fxopt_options={"cudagraphs": True, "offload": True}, tag="cg-offload")
# The same with offloads priced as hidden by compute up to the forward's copy capacity (the 8B plan at 1.15 GiB:
# recompute 61 -> 34 ms predicted, 0.94 -> 5.8 GiB offloaded per step), and the 1B low-memory point with offload
# (1B without offload: 50.3k tok/s at 3.68 GiB).
OFFLOAD_HIDDEN = (grid("8b", "qlora", ["fxopt:1.15GiB", "fxopt:1.35GiB"], batch=2, steps=5, warmup=3, timeout=260,
                       loss_only=True, fxopt_options={"cudagraphs": True, "offload": True}, tag="cg-offload-hidden")
                  + grid("1b", "lora", ["fxopt:1.25GiB"], steps=6, warmup=3, timeout=170, loss_only=True,
                         fxopt_options={"cudagraphs": True, "offload": True}, tag="cg-offload-hidden"))
OFFLOAD8B_HIDDEN = OFFLOAD_HIDDEN[:2]


def offload8b_point(tag):
    """The 8B 1.15 GiB offload point with CUDA graphs, profiled per stream; the caller's FXOPT_OFFLOAD_* knobs (set
    in gpu_session.sh, recorded in the row) choose the variant, `tag` names it."""
    return grid("8b", "qlora", ["fxopt:1.15GiB"], batch=2, steps=5, warmup=3, timeout=260, loss_only=True,
                profile=True, fxopt_options={"cudagraphs": True, "offload": True}, tag=tag)


OFFLOAD8B_PROF = offload8b_point("cg-offload")                      # defaults: does the compute stream wait?
OFFLOAD8B_D2 = offload8b_point("cg-offload-d2")                     # FXOPT_OFFLOAD_DEPTH=2
OFFLOAD8B_D2_HIDDEN = offload8b_point("cg-offload-hidden-d2")       # + FXOPT_OFFLOAD_BW (hidden price)
OFFLOAD8B_CAP = offload8b_point("cg-offload-hidden-d2-cap")         # + FXOPT_OFFLOAD_CAPACITY 0.5, 0.7 (s11a)
# The 8B points after the flat NF4 dequantization kernel (1.7x faster than the tile kernel alone at 4096 x 14336):
# no checkpointing at 0.7 (14.59k tok/s at 19.44 GiB before), and the 7 GiB point with offload (10.7-10.8k at 6.92).
DEQUANT8B = (grid("8b", "qlora", ["fxopt:0.7"], batch=2, steps=5, warmup=3, timeout=200, loss_only=True,
                  fxopt_options={"cudagraphs": True}, tag="cg-flatdq")
             + offload8b_point("cg-offload-flatdq"))
# The 0.7 point profiled: 13.9k tok/s at 18.20 GiB (72c55cd) against 14.59k at 19.44 (bf161d9), with ~4 ms of planned
# recompute in both plans (fxopt plan: gated_mlp, rms_norm, a few attentions); where do the 15 ms go?
PROF07_8B = grid("8b", "qlora", ["fxopt:0.7"], batch=2, steps=5, warmup=3, timeout=220, loss_only=True, profile=True,
                 fxopt_options={"cudagraphs": True}, tag="cg-prof07")
# The 8B point that fills 21 GiB (0.7 = 13.6 GB of activations -> 18.30 GiB in all; 15.1 GiB of activations ->
# 20.64 GiB measured at 670c1c0, tag cg-loraterm-21g, with a Triton LoRA-term kernel since removed: it took 16.3 ms
# of the step against ~8 ms for cuBLAS's K=16 GEMMs; its suites ran the 0.7 point, cg-loraterm-07, and the 7 GiB
# offload point, cg-offload-loraterm). The same point after the removal:
FINAL21_8B = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                  profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-s12")
# The same point with the skinny kernel's split sums in-kernel (b03dd37 ran 15,460 tok/s at 20.67 GiB, 896 separate
# reductions 3.2 ms). Measured (672d3aa): 15,285 tok/s at 20.67 GiB; the reductions went, the skinny kernels took
# 19.7 ms instead of 17.0 (the last program of each tile sums after the others), so the change was removed.
SPLIT21_8B = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                  profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-splitsum")
# The same point without CUDA graphs (the default): where the host time goes (profile["host"], cProfile). At
# 7c6901b the 8B step without graphs measured 8,860 tok/s, the GPU busy 249 of 462 ms (waiting on the host).
NOCG21_8B = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                 profile=True, tag="nocg-21g")
# The same two points after the direct Triton launches and the LoRA op's host trims (this session's s17c).
NOCG21_8B_S17 = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                     profile=True, tag="nocg-21g-s17")
NOCG21_8B_S17F = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                      profile=True, tag="nocg-21g-s17-fast")   # with the direct launches working (HookChain fix)
CG21_8B_S17 = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                   profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-s17")
# The no-graph point again, its rows now with each timed step's garbage collections and the allocator's device calls
# (the 0.36-0.45 s spread of step times at 846d1cd is unexplained).
NOCG21_8B_S18 = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=6, warmup=3, timeout=300, loss_only=True,
                     profile=True, tag="nocg-21g-s18")
# The same with graphs after the backward's dy pass (lora_dy: dxa and dB from one read of dy). cg-21g-s17 (c417361,
# before it): 15,142 tok/s at 20.67 GiB, the skinny products 17.3 ms and their split sums 2.2 ms of GPU time.
CG21_8B_S18 = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                   profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-s18-dypass")
# The same with the dy pass at the config the lora_dy sweep found best (stage s18c, FXOPT_LORA_DY_CONFIG).
CG21_8B_S18C = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                    profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-s18-dypass-swept")
# LoRA calls on one input as one op (q/k/v, gate/up: fxopt::lora_nf4_group), with and without it (FXOPT_LORA_GROUP=0,
# set by gpu_session.sh) on the same machine; cg-21g-s18-dypass (575d9f8): 15,723 tok/s at 20.67 GiB.
CG21_8B_GROUP = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                     profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-s19-group")
CG21_8B_NOGROUP = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                       profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-s19-nogroup")
# The 7 GiB point (offload; recomputes ~189 of 224 NF4 linears' forwards) grouped: 11,680 at 600c67b (cg-offload-s12).
OFFLOAD8B_GROUP = offload8b_point("cg-offload-s19-group")
OFFLOAD8B_NOGROUP = offload8b_point("cg-offload-s19-nogroup")   # FXOPT_LORA_GROUP=0
# The 7 GiB point at HEAD, then on the same machine the hidden-priced plan within half the forward's copy capacity,
# two copies in flight (FXOPT_OFFLOAD_BW / _CAPACITY / _DEPTH, recorded in the row; s11a staged it, never ran)
OFFLOAD8B_S20 = offload8b_point("cg-offload-s20")
OFFLOAD8B_S20_CAP = offload8b_point("cg-offload-s20-cap")
# The 21 GiB point with the adds next to RMSNorm in its kernels (patterns/rms_norm_add.py), and without them
# (FXOPT_NORM_ADD=0, set by gpu_session.sh) on the same machine; cg-21g-s19-group (5d40742): 15,957 tok/s.
CG21_8B_S20 = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                   profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-s20-normadd")
CG21_8B_S20_OFF = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=5, warmup=3, timeout=300, loss_only=True,
                       profile=True, fxopt_options={"cudagraphs": True}, tag="cg-21g-s20-nonormadd")
# The 1B LoRA 3.7 GiB point (goal 50k tok/s; 50,255 at 3.68 GiB at 5fa08bb, cg-sdparc) with the dense group op, whose
# calls the plan may recompute.
LOWMEM1B_GROUP = grid("1b", "lora", ["fxopt:1.25GiB"], steps=6, warmup=3, timeout=140, loss_only=True,
                      fxopt_options={"cudagraphs": True}, tag="cg-s19-group")
# Without graphs (host-bound: nocg-21g-s18 7,164 tok/s): the group op makes 4 LoRA calls per layer of 7.
NOCG21_8B_GROUP = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=6, warmup=3, timeout=300, loss_only=True,
                       tag="nocg-21g-s19-group")
NOCG21_8B_NOGROUP = grid("8b", "qlora", ["fxopt:15.1GiB"], batch=2, steps=6, warmup=3, timeout=300, loss_only=True,
                         tag="nocg-21g-s19-nogroup")
# 8B QLoRA at 65,536 tokens (batch 1; issue 13's longest-sequence point) at HEAD: 4,961 tok/s at 21.34 GiB at
# c068010 (tag seq65k-cg-offload-sdpaprice); the warm-up (compile + CUDA graph recording) took 263.5 s at 600c67b.
SEQ65K_8B = grid("8b", "qlora", ["fxopt:16GiB"], batch=1, seq=65536, steps=1, warmup=2, timeout=560, loss_only=True,
                 fxopt_options={"cudagraphs": True, "offload": True}, tag="seq65k-s13")
# The 7 GiB offload point after the planner's lm_head + loss chunk change (fxopt plan: 4096 -> 512 rows, offloads
# 1.0 -> 0.57 GB); 11,699 tok/s at 6.92 GiB before (670c1c0, cg-offload-loraterm).
OFFLOAD8B_S15 = offload8b_point("cg-offload-s12")
# torch's own activation_memory_budget on the 8B QLoRA step at fxopt's budgets (issue 10 asks for it in the same
# run): Inductor without a budget measured 10.8k tok/s at 35.9 GiB (anchors), ~190 s of compilation each.
AMB8B = grid("8b", "qlora", ["inductor:0.6", "inductor:0.2"], batch=2, steps=5, warmup=3, timeout=280)
# Issue 13's other shapes with fxopt as it runs best (CUDA graphs, loss-only forward): Gemma2-like (soft-capped
# eager attention, GeGLU, head dim 256, vocab 256000); anchors: Inductor 26.6k tok/s at 68.0 GiB, unsloth failed.
# Qwen2-7B-like LoRA bf16 at batch 2 (anchors have no Qwen2 row; run eager beside it for a same-run baseline).
ARCHS = (grid("gemma2-2b", "lora", ["fxopt"], steps=6, warmup=3, timeout=290, loss_only=True,
              fxopt_options={"cudagraphs": True}, tag="cg")
         + grid("qwen2-7b", "lora", ["fxopt"], batch=2, steps=5, warmup=3, timeout=290, loss_only=True,
                fxopt_options={"cudagraphs": True}, tag="cg")
         + grid("qwen2-7b", "lora", ["eager"], gcs=(True,), batch=2, steps=5, warmup=2, timeout=200))
# The Gemma2-like row profiled with head dim 256's own attention configs (34.3k tok/s at 25.17 GiB before).
GEMMA2_D256 = grid("gemma2-2b", "lora", ["fxopt"], steps=6, warmup=3, timeout=280, loss_only=True, profile=True,
                   fxopt_options={"cudagraphs": True}, tag="cg-d256")
# The Qwen2 rows alone (the Gemma2-like row was measured in the fifth session: 34.3k tok/s at 25.17 GiB).
QWEN2 = ARCHS[1:]
# The 1B smallest plan with the allocator's history over the warm-up (what is live at the peak): with the SDPA calls
# recomputable it measured 3.83 GiB (2.43 resident + 1.40; planned 1.22 GiB of activations).
MEMPEAK1B = grid("1b", "lora", ["fxopt:1.25GiB"], steps=4, warmup=3, timeout=200, loss_only=True,
                 fxopt_options={"cudagraphs": True}, tag="cg-sdparc-mem", mem_peak=True)
# Where the step's GPU time goes (torch.profiler, one step after timing).
PROFILE1B = grid("1b", "lora", ["fxopt"], steps=4, warmup=2, timeout=200, loss_only=True, profile=True)
FULL = (
    grid("1b", "lora", ["eager", "fxopt", "fxopt:8GiB", "inductor", "liger", "unsloth"])
    + grid("1b", "lora", ["eager", "fxopt", "inductor", "unsloth"], gcs=(True,))
    + grid("1b", "full", ["eager", "fxopt", "inductor", "liger"])
    + grid("8b", "qlora", ["eager", "fxopt", "fxopt:0.5", "inductor", "liger", "unsloth"], gcs=(True, False), batch=2,
           timeout=480)
    + grid("gemma2-2b", "lora", ["eager", "fxopt", "inductor", "liger", "unsloth"], timeout=480)
    + grid("qwen2-7b", "lora", ["eager", "fxopt", "inductor", "liger", "unsloth"], gcs=(True,), batch=2, timeout=480)
    + grid("qwen2-7b", "qlora", ["eager", "fxopt", "inductor", "unsloth"], gcs=(True,), batch=2, timeout=480)
)
# One device call's worth of what is new: fxopt with and without a memory budget, plus a same-run eager baseline
# (the anchors hold Inductor, Liger and unsloth at these shapes from the same kind of machine).
# fxopt compiles the loss-only forward, as fxopt.hf.compile_for_trainer does (logits dead -> linear_cross_entropy).
STEP1B = (grid("1b", "lora", ["eager"], steps=6, warmup=2, timeout=200)
          + grid("1b", "lora", ["fxopt", "fxopt:4GiB"], steps=6, warmup=2, timeout=240, loss_only=True))
# CPU smoke test of this machinery (shape "tiny", --device cpu): no GPU needed.
SMOKE = grid("tiny", "lora", ["eager", "fxopt", "liger"], batch=2, seq=64, steps=3, warmup=1, timeout=300)
SUITES = {"quick": QUICK, "step1b": STEP1B, "profile1b": PROFILE1B, "budgets1b": BUDGETS1B, "nolce1b": NOLCE1B,
          "cudagraphs": CUDAGRAPHS, "cg8b": CG8B, "cg1b": CG1B, "lowmem": LOWMEM, "amb8b": AMB8B,
          "lowmem_sdpa": LOWMEM_SDPA, "offload8b": OFFLOAD8B, "offload_hidden": OFFLOAD_HIDDEN,
          "offload8b_hidden": OFFLOAD8B_HIDDEN,
          "offload8b_prof": OFFLOAD8B_PROF, "offload8b_d2": OFFLOAD8B_D2, "offload8b_d2_hidden": OFFLOAD8B_D2_HIDDEN,
          "offload8b_cap": OFFLOAD8B_CAP, "dequant8b": DEQUANT8B[:1], "offload8b_flatdq": DEQUANT8B[1:],
          "prof07_8b": PROF07_8B, "final21_8b": FINAL21_8B, "split21_8b": SPLIT21_8B, "nocg21_8b": NOCG21_8B,
          "nocg21_8b_s17": NOCG21_8B_S17, "nocg21_8b_s17f": NOCG21_8B_S17F, "cg21_8b_s17": CG21_8B_S17,
          "nocg21_8b_s18": NOCG21_8B_S18, "cg21_8b_s18": CG21_8B_S18,
          "cg21_8b_s18c": CG21_8B_S18C, "cg21_8b_group": CG21_8B_GROUP, "cg21_8b_nogroup": CG21_8B_NOGROUP,
          "nocg21_8b_group": NOCG21_8B_GROUP, "offload8b_group": OFFLOAD8B_GROUP,
          "offload8b_nogroup": OFFLOAD8B_NOGROUP, "lowmem1b_group": LOWMEM1B_GROUP,
          "nocg21_8b_nogroup": NOCG21_8B_NOGROUP, "offload8b_s20": OFFLOAD8B_S20,
          "offload8b_s20_cap": OFFLOAD8B_S20_CAP, "cg21_8b_s20": CG21_8B_S20, "cg21_8b_s20_off": CG21_8B_S20_OFF,
          "seq65k_8b": SEQ65K_8B, "offload8b_s15": OFFLOAD8B_S15,
          "gemma2_d256": GEMMA2_D256,
          "archs": ARCHS, "qwen2": QWEN2, "mempeak1b": MEMPEAK1B,
          "budgets8b": BUDGETS8B, "qlora8b": QLORA8B, "full": FULL, "smoke": SMOKE}

NEEDS = {"liger": ["liger_kernel"], "unsloth": ["unsloth", "bitsandbytes"], "fxopt": ["fxopt"]}


def missing_packages(r):
    need = list(NEEDS.get(r["variant"].split(":")[0], []))
    if r["mode"] == "qlora":
        need.append("bitsandbytes")
    return [m for m in dict.fromkeys(need) if importlib.util.find_spec(m) is None]


def tail(text, n_lines=6, n_chars=1500):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return "\n".join(lines[-n_lines:])[-n_chars:]


def run_child(argv, timeout, log_fh=None, title="", cold=True):
    """Run argv in a new process group; kill the group on timeout. Returns (status, row, wall_s).

    status: ok | oom | error | timeout; row: the child's last RESULT dict, or one made from its stderr.
    cold: fresh, empty Inductor and Triton caches, so warm-up seconds are first-compile seconds; the child's
    TMPDIR is that same folder, removed afterwards (a killed unsloth run leaves no 16 GB checkpoint behind).
    """
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cache = tempfile.mkdtemp(prefix="fxopt_bench_run_") if cold else None
    if cache:
        env.update(TMPDIR=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # inductor's compile workers too
        out, err = proc.communicate()
        timed_out = True
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    wall = round(time.time() - t0, 1)
    if log_fh:
        log_fh.write(f"===== {title} rc={proc.returncode} wall={wall}s\n$ {' '.join(argv)}\n--- stdout\n{out}\n"
                     f"--- stderr\n{err}\n")
        log_fh.flush()
    rows = []
    for line in out.splitlines():
        if line.startswith("RESULT "):
            try:
                rows.append(json.loads(line[len("RESULT "):]))
            except json.JSONDecodeError:
                pass
    row = rows[-1] if rows else {}
    if timed_out:
        row.setdefault("error", f"timeout after {timeout:.0f} s")
        return "timeout", row, wall
    if not rows:
        row["error"] = f"no RESULT line (exit code {proc.returncode}): " + (tail(err, 2, 400) or "no stderr")
    if "error" in row:
        row.setdefault("stderr_tail", tail(err))
        return ("oom" if row.get("oom") else "error"), row, wall
    return "ok", row, wall


def child_argv(r, device):
    argv = [sys.executable, TRAIN_STEP, "--shape", r["shape"], "--mode", r["mode"], "--variant", r["variant"],
            "--batch", str(r["batch"]), "--seq", str(r["seq"]), "--steps", str(r["steps"]),
            "--warmup", str(r["warmup"])]
    if r["gc"]:
        argv.append("--gc")
    if r.get("loss_only"):
        argv.append("--loss-only")
    if r.get("profile"):
        argv.append("--profile")
    if r.get("mem_peak"):
        argv.append("--mem-peak")
    if r.get("fxopt_options"):
        argv += ["--fxopt-options", json.dumps(r["fxopt_options"])]
    if device != "cuda":
        argv += ["--device", device]
    return argv


def summary(status, row, wall):
    if status == "ok":
        return (f"{row['tok_per_s']:>8,} tok/s  {row['tflops']:6.1f} TFLOP/s  peak {row['peak_gib']:6.2f} GiB  "
                f"warm-up {row['warm_s']:6.1f} s  (wall {wall:.0f} s)")
    word = "SKIPPED" if status == "skipped" else f"FAILED ({status})"
    return f"{word}: {str(row.get('error', ''))[:200]}  (wall {wall:.0f} s)"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite", choices=sorted(SUITES))
    default_out = os.path.join(os.environ["OUT"], "train_step.jsonl") if os.environ.get("OUT") else \
        os.path.join(HERE, "results", "train_step.jsonl")
    p.add_argument("--out", default=default_out, help=f"JSONL to append to (default {default_out})")
    p.add_argument("--only", default=None, help="regex: run only the ids that match (see --list)")
    p.add_argument("--skip", default=None, help="regex: leave out the ids that match")
    p.add_argument("--list", action="store_true", help="print the run ids and exit")
    p.add_argument("--time-limit", type=float, default=530 if os.environ.get("OUT") else None,
                   help="seconds for the whole suite; runs that would start later are recorded as skipped")
    p.add_argument("--device", default="cuda", help="cpu only with the smoke suite")
    p.add_argument("--warm-caches", action="store_true",
                   help="share Inductor/Triton caches between runs (default: each run compiles from cold)")
    a = p.parse_args()

    runs = [r for r in SUITES[a.suite] if (not a.only or re.search(a.only, run_id(r)))
            and not (a.skip and re.search(a.skip, run_id(r)))]
    if a.list:
        for r in runs:
            print(run_id(r), f"steps {r['steps']} warm-up {r['warmup']} timeout {r['timeout']} s")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    t_start, n_ok = time.time(), 0
    print(f"suite {a.suite}: {len(runs)} runs -> {a.out}" + (f" (time limit {a.time_limit:.0f} s)" if a.time_limit
                                                             else ""), flush=True)
    with open(a.out, "a") as out_fh, open(os.path.splitext(a.out)[0] + ".log", "a") as log_fh:
        for i, r in enumerate(runs, 1):
            rid = run_id(r)
            keys = ("shape", "mode", "variant", "gc", "loss_only", "batch", "seq", "steps", "warmup")
            base = dict(suite=a.suite, run_id=rid, tag=r.get("tag", ""), **{k: r[k] for k in keys})
            timeout = r["timeout"]
            left = a.time_limit - (time.time() - t_start) if a.time_limit else None
            missing = missing_packages(r)
            if missing:
                status, row, wall = "skipped", dict(error=f"not installed: {', '.join(missing)}", skipped=True), 0.0
            elif left is not None and left < 60:
                status, row, wall = "skipped", dict(error=f"skipped: suite time limit ({left:.0f} s left)",
                                                    skipped=True), 0.0
            else:
                if left is not None:
                    timeout = min(timeout, left - 15)
                status, row, wall = run_child(child_argv(r, a.device), timeout, log_fh, rid, cold=not a.warm_caches)
            row = {**base, **row, "status": status, "wall_s": wall}
            out_fh.write(json.dumps(row, default=str) + "\n")
            out_fh.flush()
            n_ok += status == "ok"
            print(f"[{i}/{len(runs)}] {rid:<44} {summary(status, row, wall)}", flush=True)
            if status in ("error", "oom") and row.get("stderr_tail"):
                print("    " + row["stderr_tail"].replace("\n", "\n    ")[-600:], flush=True)
    print(f"suite {a.suite}: {n_ok}/{len(runs)} ok in {time.time() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

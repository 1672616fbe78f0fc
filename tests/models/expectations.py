"""The coverage matrix's declared expectations: what each architecture's math SHOULD match, per model.

Counts are for the tiny config below (SMALL, as /work/shared/tools/check_models.py builds it): L = 2 decoder layers.
`counts` is the plain model (any attention implementation unless `eager` says otherwise); with LoRA (peft r=4,
all-linear) the same counts plus `lora` (the LoRA'd nn.Linear / Conv1D modules; lm_head is never targeted), unless
`lora_counts` says otherwise. Every pattern an architecture does not match has its reason in `zero` (or in
ALWAYS_ZERO): tests/models/test_coverage_matrix.py checks that table is complete.
`xfail`: a pattern the math says should match but fxopt cannot match yet -> the cell is xfail(strict=True) for exactly
that pattern count, so it turns loud (XPASS -> failure) once it matches; any other problem still fails.
This file is data for the tests and for `python -m fxopt coverage`; fxopt itself knows no architecture.
"""
from __future__ import annotations

import dataclasses

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, head_dim=16,
             moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4, num_local_experts=4,
             num_experts_per_tok=2, n_routed_experts=4, first_k_dense_replace=0, sliding_window=8,
             use_cache=False, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
L = SMALL["num_hidden_layers"]
NO_KV = ("num_key_value_heads",)        # check_models.py drops it for these MHA-only configs

PATTERNS = ("attention", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "lora", "lora_nf4",
            "linear_cross_entropy")

ALWAYS_ZERO = {
    "linear_cross_entropy": "the model returns .logits, a graph output, so lm_head + loss cannot be fused "
                            "(fxopt/patterns/linear_cross_entropy.py); a loss-only compile fuses them",
    "lora_nf4": "no 4-bit weights here; QLoRA is tests/models/test_lora_models.py",
}
NOT_GATED = "the MLP is not gated (fc -> activation -> fc)"
NO_ROPE = "learned absolute position embeddings, no rotary"
RMS = "no RMSNorm (LayerNorm, with mean subtraction)"
LN = "no LayerNorm (RMSNorm only)"
SILU = "the gated MLP is silu(gate) * up: swiglu, not geglu"
GELU = "the gated MLP is gelu_tanh(gate) * up: geglu, not swiglu"
NO_GLU = "no gated MLP: " + NOT_GATED
MOE_PEFT = ("peft's all-linear also wraps the router and expert tensors (ParamWrapper: W + BA), which breaks the "
            "graph without fxopt; the decoder-layer graph is compiled once and reused, so the report counts one "
            "layer (+ the final norm); the ParamWrapper deltas are not `base(x) + B(A(x))`, so lora = q,k,v,o")


@dataclasses.dataclass(frozen=True)
class Arch:
    counts: dict                         # pattern -> count (plain model); absent = 0 with a reason in `zero`
    zero: dict                           # pattern -> why it matches nothing
    lora: int                            # LoRA'd linears per model
    attn: tuple = ("sdpa", "eager")      # attention implementations the model supports
    core: bool = True                    # the list (run every default CI); False: slow part only
    drop: tuple = ()                     # SMALL keys this config must not get
    overrides: dict = dataclasses.field(default_factory=dict)    # config fields beyond SMALL (and why, in a comment)
    eager: dict = dataclasses.field(default_factory=dict)        # counts that differ with attn="eager"
    lora_counts: dict | None = None      # the whole LoRA cell's counts, when not counts + lora (see `lora_why`)
    lora_why: str = ""
    adapters: tuple = ("plain", "lora")
    xfail: dict = dataclasses.field(default_factory=dict)        # pattern -> why it cannot match yet


def _llama_like(rms=2 * L + 1, glu="swiglu", lora=7 * L, **kw):
    zero = {"layer_norm": LN, ("geglu" if glu == "swiglu" else "swiglu"): SILU if glu == "swiglu" else GELU}
    zero.update(kw.pop("zero", {}))
    return Arch({"attention": L, "rms_norm": rms, "rope": L, glu: L}, zero, lora, **kw)


def _ln_model(ln, rope, lora, glu=None, zero=None, **kw):
    counts = {"attention": L, "layer_norm": ln}
    z = {"rms_norm": RMS}
    if rope:
        counts["rope"] = rope
    else:
        z["rope"] = NO_ROPE
    if glu:
        counts[glu] = L
        z["geglu" if glu == "swiglu" else "swiglu"] = SILU if glu == "swiglu" else GELU
    else:
        z["swiglu"] = z["geglu"] = NO_GLU
    z.update(zero or {})
    return Arch(counts, z, lora, **kw)


ARCHS: dict[str, Arch] = {
    # --- the list ---
    "llama": _llama_like(),                                   # rms: input + post-attention per layer + final
    "mistral": _llama_like(),
    "mixtral": _llama_like(                                   # swiglu: the routed experts' grouped_mm gated MLP,
        lora=4 * L, lora_counts={"attention": 1, "rms_norm": 3, "rope": 1, "swiglu": 1, "lora": 4},
        lora_why=MOE_PEFT),                                   # one per layer over all routed rows
    "qwen2": _llama_like(),
    "qwen2_moe": Arch({"attention": L, "rms_norm": 2 * L + 1, "rope": L, "swiglu": 2 * L},  # routed + shared expert
                      {"layer_norm": LN, "geglu": SILU}, 8 * L),  # lora: q,k,v,o + shared gate/up/down + its gate
    "qwen3": _llama_like(rms=4 * L + 1),                      # + q_norm, k_norm per layer
    "qwen3_moe": _llama_like(rms=4 * L + 1, lora=4 * L, lora_why=MOE_PEFT,
                             lora_counts={"attention": 1, "rms_norm": 5, "rope": 1, "swiglu": 1, "lora": 4}),
    "gemma": _llama_like(glu="geglu"),                        # rms (1 + w); gelu_pytorch_tanh gate
    "gemma2": _llama_like(rms=4 * L + 1, glu="geglu", attn=("eager",)),   # + pre/post-feedforward norms; attention
    #                                                            with logit softcapping (transformers: eager only)
    "gemma3_text": _llama_like(rms=6 * L + 1, glu="geglu"),   # gemma2's 4 norms + q_norm, k_norm
    "phi": _ln_model(L + 1, L, 6 * L),                        # parallel attn/MLP: one LN per layer; partial rotary
    "phi3": _llama_like(lora=4 * L),                          # fused qkv_proj and gate_up_proj (+ chunk)
    "gpt_neox": _ln_model(2 * L + 1, L, 4 * L, drop=NO_KV),   # partial rotary (rotary_pct 0.25)
    "gpt2": _ln_model(2 * L + 1, 0, 4 * L, drop=NO_KV),       # Conv1D linears (addmm), LoRA on them too
    "gptj": _ln_model(L + 1, 2 * L, 6 * L, drop=NO_KV,        # rope 2L: cos/sin are repeat_interleave'd per tensor,
                      overrides={"rotary_dim": 8}),           # so q and k form no shared pair; rotary_dim default 64
    #                                                           exceeds head_dim 16 (check_models.py's recipe fails)
    "falcon": _ln_model(L + 1, L, 4 * L),                     # parallel attn; FalconLinear is x @ W.T; eager `/=`
    "olmo": _ln_model(2 * L + 1, L, 7 * L, glu="swiglu"),     # non-parametric LayerNorm (no weight, no bias)
    "olmo2": _llama_like(rms=4 * L + 1),                      # post-attn/post-ffn norms + q_norm, k_norm (full width)
    "stablelm": _ln_model(2 * L + 1, L, 7 * L, glu="swiglu"), # partial rotary 0.25
    "starcoder2": _ln_model(2 * L + 1, L, 6 * L),             # c_fc -> gelu_tanh -> c_proj
    "granite": _llama_like(),                                 # embedding/residual/attention multipliers
    "cohere": _ln_model(L + 1, L, 7 * L, glu="swiglu"),       # CohereLayerNorm (no bias, parallel); interleaved rope
    "opt": _ln_model(2 * L + 1, 0, 6 * L, drop=NO_KV),        # relu fc1/fc2; q pre-scaled
    # --- more architectures (slow part only) ---
    "glm": _llama_like(lora=6 * L, core=False),               # fused gate_up; partial interleaved rope
    "glm4": _llama_like(rms=4 * L + 1, lora=6 * L, core=False),   # + post_self_attn / post_mlp norms
    "helium": _llama_like(core=False),
    "smollm3": _llama_like(core=False),
    "ministral": _llama_like(core=False),
    "ernie4_5": _llama_like(core=False),
    "seed_oss": _llama_like(core=False),
    "exaone4": _llama_like(rms=4 * L + 1, core=False),        # post-attn/post-ffn norms + q_norm, k_norm
    "hunyuan_v1_dense": _llama_like(rms=4 * L + 1, core=False),   # + query/key layernorm
    "lfm2": _llama_like(rms=4 * L + 1, core=False),           # operator/ffn norms + q/k layernorm (w1, w3, w2 MLP)
    "granitemoe": _llama_like(lora=4 * L, core=False),        # experts and router are not nn.Linear
    "olmoe": _llama_like(rms=4 * L + 1, lora=4 * L, core=False, lora_why=MOE_PEFT,
                         lora_counts={"attention": 1, "rms_norm": 5, "rope": 1, "swiglu": 1, "lora": 4}),
    "cohere2": _ln_model(L + 1, L, 7 * L, glu="swiglu", core=False),
    "nemotron": _ln_model(2 * L + 1, L, 6 * L, core=False),   # LayerNorm1P (1 + w); relu^2 up/down MLP
    "persimmon": _ln_model(4 * L + 1, L, 4 * L, core=False),  # + q/k LayerNorm; relu^2 MLP
    "codegen": _ln_model(L + 1, 2 * L, 4 * L, core=False, overrides={"rotary_dim": 8}),  # as gptj
    "gpt_bigcode": _ln_model(2 * L + 1, 0, 4 * L, core=False),
    "biogpt": _ln_model(2 * L + 1, 0, 6 * L, core=False),
    # RMSNorm spelled x * pow(mean(x^2) + eps, -0.5) (normalize makes it rsqrt): 8 per layer (q/k/v norms, the v
    # norm without weight; input, post-attention, pre/post-feedforward, per-layer-input) + final + per-layer
    # projection norm; geglu: the MLP and the per-layer-input gate (gelu(gate(x)) * per_layer_input); rope on q
    # and k separately; attention: the sliding layer only, the full-attention layer has head dim 512 (> 256)
    "gemma4_text": Arch({"attention": 1, "rms_norm": 8 * L + 2, "rope": 2 * L, "geglu": 2 * L},
                        {"layer_norm": LN, "swiglu": GELU}, 19, core=False),   # lora: all 19 nn.Linear modules
    # rotate_half as cat((x2, -x1)): the rotation by -theta (the op gets -sin); rms_norm: q/k norms, input and
    # post-attention norms per layer, the final norm applied twice (before the layers and after); relu^2 MLP
    "nanochat": Arch({"attention": L, "rms_norm": 4 * L + 2, "rope": L},
                     {"layer_norm": LN, "swiglu": "relu^2 fc1/fc2 MLP, not gated", "geglu": "not gated"}, 6 * L,
                     core=False),
    # MLA (multi-head latent attention): rope on the q/k slices split off for it (k's one head shared), spelled as
    # rope_interleave (even/odd features, de-interleaved output: the interleaved op + a permuting copy); q_a/kv_a
    # RMSNorms; routed + shared experts per layer. Its config needs MLA sizes beyond SMALL.
    "deepseek_v3": Arch({"attention": L, "rms_norm": 4 * L + 1, "rope": L, "swiglu": 2 * L},
                        {"layer_norm": LN, "geglu": SILU}, 0, core=False, adapters=("plain",), drop=("head_dim",),
                        overrides=dict(num_key_value_heads=4, head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                       v_head_dim=16, kv_lora_rank=16, q_lora_rank=24, n_group=1, topk_group=1)),
    "arcee": Arch({"attention": L, "rms_norm": 2 * L + 1, "rope": L},
                  {"layer_norm": LN, "swiglu": "relu^2 up/down MLP, not gated", "geglu": "not gated"}, 6 * L,
                  core=False),
    "apertus": Arch({"attention": L, "rms_norm": 4 * L + 1, "rope": L},   # + q_norm, k_norm
                    {"layer_norm": LN, "swiglu": "xIELU up/down MLP, not gated", "geglu": "not gated"}, 6 * L,
                    core=False),
    "bitnet": Arch({"attention": L, "rms_norm": 4 * L + 1, "rope": L},    # + attn/ffn sub-norms
                   {"layer_norm": LN, "swiglu": "gated relu^2 (relu(gate)^2 * up): no fxopt GLU for relu^2",
                    "geglu": "gated relu^2, not gelu"}, 7 * L, core=False),
    # ALiBi scores baddbmm(alibi, q, k^T) on 3-D [B*H, S, D] (the bias viewed [B, H, 1, S] for the kernel), + mask
    "bloom": _ln_model(2 * L + 2, 0, 4 * L, attn=("eager",), core=False, drop=NO_KV,  # + embedding LayerNorm
                       zero={"rope": "ALiBi position bias, no rotary"}),
    # ALiBi: scores = q @ k^T * s + alibi (a constant bias the kernel reads), then masked_fill(causal): two steps
    "mpt": _ln_model(2 * L + 1, 0, 4 * L, attn=("eager",), core=False,
                     zero={"rope": "ALiBi position bias, no rotary"}),
    # fp32 scores of upcast q/k, where(causal buffer, s, torch.tensor(min)) then + the causal mask: two steps
    "gpt_neo": _ln_model(2 * L + 1, 0, 6 * L, attn=("eager",), core=False, drop=NO_KV,
                         overrides={"attention_types": [[["global", "local"], 1]], "window_size": 8}),  # 2 layers
    # bmm on 3-D [B*H, S, D] q/k/v, the scores viewed 4-D around the mask, clamped at finfo.min
    "xglm": _ln_model(2 * L + 1, 0, 6 * L, attn=("eager",), core=False,
                      zero={"rope": "sinusoidal absolute positions, no rotary"}),
    "gpt_oss": Arch({"rms_norm": 2 * L + 1, "rope": L},
                    {"attention": "attention sinks: a learned logit column is concatenated before softmax (the "
                                  "fxopt attention op has no sinks)",
                     "layer_norm": LN,
                     "swiglu": "clamped GLU (gate * sigmoid(1.702 gate) * (up + 1)), not silu(gate) * up",
                     "geglu": "not gelu"}, 4 * L, attn=("eager",), core=False),   # rope: the half-width spelling
    "llama4_text": Arch({"attention": L, "rms_norm": 4 * L + 1, "rope": L, "swiglu": 2 * L},  # + qk norm (L2, no
                        {"layer_norm": LN, "geglu": SILU}, 0, core=False, adapters=("plain",)),  # weight)
}
# Not in the matrix: phimoe (sparsemixer samples experts in training: eager vs eager already differ), jamba and
# falcon_h1 (mamba layers: 20-25 s per cell here), qwen3_next / doge (the tiny config fails eagerly), dbrx, dots1,
# zamba2 (their configs need more than SMALL); qwen3_5_text and lara_mini: torch's own aot_eager fails their backward
# (a view of a non-contiguous softplus gradient), which this matrix's hand-off uses; with Inductor, plain and fxopt,
# one step runs and the losses agree (checked on the CPU, transformers 5.24).


def counts_for(name: str, attn: str, adapter: str) -> dict:
    """Full pattern -> count expectation of one cell."""
    a = ARCHS[name]
    out = dict.fromkeys(PATTERNS, 0)
    if adapter == "lora" and a.lora_counts is not None:
        out.update(a.lora_counts)
        return out
    out.update(a.counts)
    if attn == "eager":
        out.update(a.eager)
    if adapter == "lora":
        out["lora"] = a.lora
    return out


def cells(core_only: bool = False):
    """Every (arch, attn, adapter) of the matrix."""
    return [(n, t, d) for n, a in ARCHS.items() if a.core or not core_only for t in a.attn for d in a.adapters]


def default_cell(name: str):
    """The one cell per architecture that runs in default CI: sdpa when supported, plain."""
    a = ARCHS[name]
    return (name, "sdpa" if "sdpa" in a.attn else a.attn[0], "plain")


def spec(name: str) -> dict:
    a = ARCHS[name]
    return {"drop": a.drop, "overrides": a.overrides}

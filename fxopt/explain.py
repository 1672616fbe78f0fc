"""`fxopt explain`: what fxopt matches in a model, layer by layer, and why a candidate was rejected.

    fxopt explain llama                      # a tiny config of a transformers architecture
    fxopt explain path/to/config.json        # a config file (real sizes; layers cut to --layers)
    fxopt explain path/to/model_folder       # a folder written by save_pretrained (its config.json only)

The model is built from the config with random weights on the CPU (matching does not depend on weight values),
with at most --layers layers and a vocabulary cut to --vocab, then compiled with fxopt handing off to aot_eager
(no Inductor, fast) and run for one forward + backward on a [batch, seq] batch of token ids. Where each match and
rejection happened comes from dynamo's `nn_module_stack` of the candidate node.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import difflib
import json
import os
import re
import sys
import tempfile

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=256, max_position_embeddings=512)
OUTSIDE = "(outside layers)"


class ExplainError(Exception):
    """A user error (bad target, unknown architecture): printed without a traceback."""


# ----------------------------------------------------------------------------------------------- building

def _config_from_name(name: str, vocab: int, layers: int):
    from transformers import CONFIG_MAPPING, AutoConfig
    if name not in CONFIG_MAPPING:
        near = difflib.get_close_matches(name, list(CONFIG_MAPPING.keys()), n=3)
        raise ExplainError(f"unknown architecture {name!r}: not a transformers model type"
                           + (f" (did you mean {', '.join(near)}?)" if near else "")
                           + "; give a model type like llama, mistral, qwen2, gemma, phi3, gpt_neox, "
                             "a config.json file or a model folder")
    kw = dict(TINY, vocab_size=min(vocab, TINY["vocab_size"]), num_hidden_layers=layers)
    try:
        return AutoConfig.for_model(name, **kw)
    except (TypeError, AttributeError):
        kw.pop("head_dim")
        return AutoConfig.for_model(name, **kw)


def load_config(target: str, layers: int, vocab: int):
    """(config, description) for a model type name, a config JSON file or a model folder."""
    from transformers import AutoConfig
    if os.path.isdir(target):
        if not os.path.isfile(os.path.join(target, "config.json")):
            raise ExplainError(f"{target}: no config.json in this folder (not a Hugging Face model folder)")
        cfg, what = AutoConfig.from_pretrained(target), f"folder {target}"
    elif target.endswith(".json") or os.sep in target or os.path.exists(target):
        if not os.path.isfile(target):
            raise ExplainError(f"no such file or folder: {target}")
        try:
            with open(target) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ExplainError(f"{target}: not a JSON file ({e})") from None
        mt = d.pop("model_type", None) if isinstance(d, dict) else None
        if not mt:
            raise ExplainError(f"{target}: the config has no \"model_type\" (a transformers config.json has one)")
        try:
            cfg = AutoConfig.for_model(mt, **d)
        except ValueError as e:
            raise ExplainError(f"{target}: {e}") from None
        what = f"config {target}"
    else:
        cfg, what = _config_from_name(target, vocab, layers), f"tiny {target} config, {layers} layers"
    n_old = getattr(cfg, "num_hidden_layers", None)
    if isinstance(n_old, int) and n_old > layers:
        cfg.num_hidden_layers = layers
        for k, v in list(vars(cfg).items()):   # per-layer lists (layer_types, ...) follow the layer count
            if isinstance(v, list) and len(v) == n_old:
                setattr(cfg, k, v[:layers])
        what += f", {layers} of {n_old} layers"
    v_old = getattr(cfg, "vocab_size", None)
    if isinstance(v_old, int) and v_old > vocab:
        cfg.vocab_size = vocab
        what += f", vocab {v_old} cut to {vocab}"
    for k, v in list(vars(cfg).items()):   # special token ids beyond the (cut) vocabulary would break embeddings
        if k.endswith("token_id") and isinstance(v, int) and v >= cfg.vocab_size:
            setattr(cfg, k, None)
    cfg.use_cache = False
    return cfg, what


def _dtype(name, cfg):
    import torch
    if name:
        return getattr(torch, name)
    d = vars(cfg).get("dtype") or vars(cfg).get("torch_dtype")   # (the torch_dtype property warns in 5.x)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float32


def build_model(cfg, mode: str, dtype, attn: str | None):
    """A random-weight causal LM on the CPU; `lora`: peft LoRA r=8 on every linear; `qlora`: NF4 base + LoRA."""
    from transformers import AutoModelForCausalLM
    kw = {"attn_implementation": attn} if attn else {}
    try:
        model = AutoModelForCausalLM.from_config(cfg, **kw)
    except ValueError as e:
        raise ExplainError(f"cannot build a causal LM for model type {cfg.model_type!r}: "
                           f"{str(e).splitlines()[0]}") from None
    model = model.to(dtype)
    if mode == "qlora":
        model = _quantize(model, dtype)
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    model.config.use_cache = False
    return model.train()


def _quantize(model, dtype):
    """Reload `model` with its linear layers in bitsandbytes NF4 (double quant), as QLoRA does."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ExplainError("--mode qlora needs bitsandbytes: pip install bitsandbytes") from None
    compute = dtype if dtype != torch.float32 else torch.bfloat16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb, device_map={"": "cpu"},
                                                    dtype=compute)


# ----------------------------------------------------------------------------------------------- locating

def module_path(node) -> str:
    """`model.layers.0.self_attn` from dynamo's nn_module_stack of `node` ('' outside any module)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)
    # the root is the compiled callable's local: L['self'], L['args'][0], L['mod'], ...
    return re.sub(r"^[LG]\.(args\.\d+|kwargs\.\w+|\w+)\.?|^self\.?", "", path).strip(".")


def block_of(path: str) -> tuple[str, str]:
    """('layers.0', 'self_attn.q_proj') from 'base_model.model.model.layers.0.self_attn.q_proj'."""
    parts = path.split(".") if path else []
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            return f"{parts[i - 1]}.{parts[i]}", ".".join(parts[i + 1:])
    return OUTSIDE, ".".join(parts[-2:])


@contextlib.contextmanager
def recording(entries: list):
    """Record where each pattern matched or rejected a candidate (wraps each Pattern's match/replace)."""
    from fxopt.patterns import PATTERNS
    from fxopt.patterns.match import NoMatch
    saved = [(p, p.match, p.replace) for p in PATTERNS]

    def wrap(p, match, replace):
        def rec_match(anchor):
            try:
                m = match(anchor)
            except NoMatch as e:
                entries.append(_entry(p.name, "rejected", anchor, str(e)))
                raise
            if isinstance(m, str):
                entries.append(_entry(p.name, "rejected", anchor, m))
            return m

        def rec_replace(graph, m):
            out = replace(graph, m)
            entries.append(_entry(p.name, "matched", m.anchor, ""))
            return out
        p.match, p.replace = rec_match, rec_replace

    try:
        for p, match, replace in saved:
            wrap(p, match, replace)
        yield
    finally:
        for p, match, replace in saved:
            p.match, p.replace = match, replace


def _entry(pattern, status, anchor, reason):
    path = module_path(anchor)
    block, sub = block_of(path)
    return dict(pattern=pattern, status=status, block=block, module=sub, path=path, node=anchor.name,
                reason=reason)


# ----------------------------------------------------------------------------------------------- running

def _progress(total, disable):
    try:
        from tqdm import tqdm
    except ImportError:   # tqdm comes with transformers; without it, no bar
        return contextlib.nullcontext(None)
    return tqdm(total=total, disable=True if disable else None, file=sys.stderr, leave=False,
                bar_format="{desc:<34}{bar:20} {n_fmt}/{total_fmt} [{elapsed}]")


def explain_model(model, options: dict | None = None, batch: int = 1, seq: int = 32, keep_logits: bool = False,
                  progress=None) -> dict:
    """Compile `model` with fxopt (aot_eager), run one forward + backward; returns the per-layer result dict."""
    import torch

    import fxopt
    from fxopt import config as _config
    from fxopt.hf import _loss_only_output

    opts = dict(options or {})
    opts.setdefault("inductor", False)
    _config.parse(opts)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    entries: list = []

    def recording_backend(gm, example_inputs):
        n = len(entries)
        try:
            return fxopt.backend(gm, example_inputs, options=opts)
        except BaseException:
            del entries[n:]   # dynamo restarts this graph: what it recorded does not count
            raise

    own_forward = vars(model).get("forward")   # an instance-level forward to put back afterwards, if any
    if not keep_logits:   # what fxopt.hf.compile_for_trainer does in training
        forward = model.forward
        model.forward = lambda *a, **k: _loss_only_output(forward(*a, **k))
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        dev = next(p.device for p in model.parameters())
        ids = torch.randint(3, max(4, vocab), (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
        compiled = torch.compile(model, backend=recording_backend)
        if progress is not None:
            progress.set_description_str("compiling (dynamo + fxopt + aot)")
        with recording(entries):
            out = compiled(input_ids=ids, labels=ids)
        if progress is not None:
            progress.update(1)
            progress.set_description_str("backward")
        loss = out["loss"] if isinstance(out, dict) else out[0]
        loss.backward()
        if progress is not None:
            progress.update(1)
    finally:
        if not keep_logits:
            if own_forward is None:
                del model.forward
            else:
                model.forward = own_forward
    report = fxopt.last_report()
    failed = {f.what for f in report.fallbacks}
    entries = [e for e in entries if not (e["status"] == "matched" and e["pattern"] in failed)]
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    return dict(entries=entries, matched=report.matched, graphs=report.graphs,
                graph_breaks=[{"reason": r.splitlines()[0], "count": c} for r, c in breaks.items()],
                fallbacks=[{"what": f.what, "error": f.error} for f in report.fallbacks],
                patterns=sorted(report.matched), keep_logits=keep_logits, loss=float(loss.detach().float()))


def format_table(result: dict) -> str:
    """The per-layer table (matched count, `+Nr` where N candidates were rejected) and the rejection reasons."""
    entries = result["entries"]
    used = [p for p in result["patterns"] if any(e["pattern"] == p for e in entries)]
    blocks = list(dict.fromkeys(e["block"] for e in entries if e["block"] != OUTSIDE))
    blocks.sort(key=lambda b: (b.rsplit(".", 1)[0], int(b.rsplit(".", 1)[1])))
    if any(e["block"] == OUTSIDE for e in entries):
        blocks.append(OUTSIDE)
    cnt = collections.Counter((e["block"], e["pattern"], e["status"]) for e in entries)
    w0 = max([len(b) for b in blocks] + [len("total")]) + 2
    widths = [max(len(p), 6) + 2 for p in used]
    lines = ["".join([f"{'block':<{w0}}"] + [f"{p:>{w}}" for p, w in zip(used, widths)])]

    def cell(m, r):
        return "-" if not (m or r) else f"{m}" + (f" +{r}r" if r else "")

    for b in blocks:
        lines.append("".join([f"{b:<{w0}}"] + [f"{cell(cnt[b, p, 'matched'], cnt[b, p, 'rejected']):>{w}}"
                                               for p, w in zip(used, widths)]))
    tot_r = collections.Counter(e["pattern"] for e in entries if e["status"] == "rejected")
    lines.append("".join([f"{'total':<{w0}}"] + [f"{cell(result['matched'].get(p, 0), tot_r[p]):>{w}}"
                                                  for p, w in zip(used, widths)]))
    unused = [p for p in result["patterns"] if p not in used]
    if unused:
        lines.append(f"no candidates for: {', '.join(unused)}")
    if not entries:
        lines.append("fxopt found no candidates in this model")
    reasons = collections.defaultdict(list)
    for e in entries:
        if e["status"] == "rejected":
            reasons[(e["pattern"], e["reason"])].append(e["block"] + (f" {e['module']}" if e["module"] else ""))
    if reasons:
        lines.append("\nrejected (+Nr above):")
        for (p, why), where in reasons.items():
            shown = ", ".join(dict.fromkeys(where))
            lines.append(f"  {p} x{len(where)} [{shown[:100]}{'...' if len(shown) > 100 else ''}]: {why}")
    for f in result["fallbacks"]:
        lines.append(f"FALLBACK {f['what']}: {f['error']}")
    gb = sum(g["count"] for g in result["graph_breaks"])
    lines.append(f"\ndynamo: {result['graphs']} graph(s), {gb} graph break(s)")
    for g in result["graph_breaks"]:
        lines.append(f"  graph break x{g['count']}: {g['reason']}")
    if not result["keep_logits"]:
        lines.append("(compiled as fxopt.hf.compile_for_trainer does: the training forward returns only the loss; "
                     "--keep-logits for plain model.compile)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command

def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="per-layer table of what fxopt matches in a model, with rejected reasons",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a transformers model type (llama, qwen2, ...), a config .json file or a "
                                  "model folder")
    p.add_argument("--mode", choices=["full", "lora", "qlora"], default="full",
                   help="full fine-tune; peft LoRA r=8 on every linear; NF4 base + LoRA (needs bitsandbytes)")
    p.add_argument("--layers", type=int, default=2, help="build at most this many layers (default 2)")
    p.add_argument("--vocab", type=int, default=4096, help="cut the vocabulary to this size (default 4096)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the config's, else float32)")
    p.add_argument("--attn", help="attn_implementation, e.g. sdpa or eager (default: transformers' choice)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--options", default="{}", help='fxopt options as JSON, e.g. \'{"disable": ["rope"]}\'')
    p.add_argument("--keep-logits", action="store_true",
                   help="compile the plain forward (returns logits) instead of the loss-only training forward")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(fn=run)


def run(args) -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("fxopt explain needs transformers: pip install 'fxopt[hf]'", file=sys.stderr)
        return 2
    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ExplainError(f"--options must be a JSON object, got {args.options!r}")
        from fxopt import config as _config
        _config.parse(options)
        if args.layers < 1 or args.batch < 1 or args.seq < 2 or args.vocab < 8:
            raise ExplainError("--layers and --batch must be >= 1, --seq >= 2, --vocab >= 8")
        cfg, what = load_config(args.target, args.layers, args.vocab)
    except json.JSONDecodeError as e:
        print(f"fxopt explain: --options is not valid JSON: {e}", file=sys.stderr)
        return 2
    except (ExplainError, ValueError) as e:   # bad options / config values
        print(f"fxopt explain: {e}", file=sys.stderr)
        return 2
    dtype = _dtype(args.dtype, cfg)
    with _progress(3, disable=args.json) as bar:
        if bar is not None:
            bar.set_description_str("building the model")
        try:
            model = build_model(cfg, args.mode, dtype, args.attn)
        except ExplainError as e:
            print(f"fxopt explain: {e}", file=sys.stderr)
            return 2
        if bar is not None:
            bar.update(1)
        result = explain_model(model, options, args.batch, args.seq, args.keep_logits, progress=bar)
    result.update(target=args.target, model=what, model_type=cfg.model_type, mode=args.mode, dtype=str(dtype),
                  batch=args.batch, seq=args.seq)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"fxopt explain: {what} ({cfg.model_type}), mode {args.mode}, {dtype}, batch {args.batch} x seq "
              f"{args.seq}, aot_eager hand-off; cells: matched [+N rejected]\n")
        print(format_table(result))
    return 0

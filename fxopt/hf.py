"""Hugging Face helper: compile a model with fxopt for transformers' `Trainer` and TRL's trainers.

`TrainingArguments(torch_compile=True, torch_compile_backend="fxopt")` fails when the Trainer is built: accelerate
checks the name against its fixed list (accelerate 1.15: `ValueError: 'FXOPT' is not a valid DynamoBackend`).
The working path is to compile the model yourself before handing it to the Trainer, which is what this does:

    model = fxopt.hf.compile_for_trainer(model, inductor=True)      # same object, compiled in place
    Trainer(model=model, args=TrainingArguments(...), ...).train()

Nothing here knows a model type: it relies only on `nn.Module.compile`, peft's `get_base_model()`, transformers'
`base_model` property and the `loss`/`logits` fields of HF model outputs.
"""
from __future__ import annotations

import dataclasses
import functools
import types

import torch

from fxopt import config as _config


def _loss_only_output(out):
    """`out` with only its loss when it is an HF output holding logits and a loss; else `out` unchanged."""
    if not dataclasses.is_dataclass(out) or getattr(out, "loss", None) is None:
        return out
    if "logits" not in {f.name for f in dataclasses.fields(out)}:
        return out
    return type(out)(loss=out.loss)


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of an HF causal LM (below a peft wrapper): `model.get_base_model().base_model`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is inner:
        raise ValueError(f"{type(inner).__name__} has no separate decoder stack (`base_model`); "
                         "compile the whole model instead (backbone_only=False)")
    return body


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks of a model: its largest nn.ModuleList whose children all have one class (found by
    structure, not by model type). What FSDP2 shards and compiles one at a time (torchtitan's recipe)."""
    lists = [m for m in model.modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of identical blocks: cannot shard and compile "
                         "it per decoder layer; wrap and compile the whole model instead")
    return max(lists, key=len)


def compile_for_trainer(model: torch.nn.Module, *, keep_logits: bool = False, backbone_only: bool = False,
                        **options) -> torch.nn.Module:
    """Compile `model` in place with fxopt for a `Trainer`/`SFTTrainer`; returns `model` (the same object).

    options: fxopt's options (API.md), e.g. `inductor=False`, `disable=["rope"]`, `memory_budget="12GiB"`;
      checked now, so a typo fails here and not at the first training step.
    keep_logits=False: in training, a forward that computed a loss returns only the loss (`out.logits` is None),
      so the logits stay inside the compiled graph and lm_head + cross-entropy fuse (`linear_cross_entropy`).
      `Trainer.compute_loss` only reads `outputs["loss"]` in training; pass True if your code reads the logits
      there. Evaluation and calls without labels return the full output.
    backbone_only=True: compile only the decoder stack (`backbone(model)`), not the LM head and loss. For TRL's
      SFTTrainer (TRL >= 1.0 computes the loss with its own chunked LM head, which dynamo splits into several
      graphs): the layers still get fxopt's kernels.
    """
    _config.parse(options)
    if backbone_only:
        backbone(model).compile(backend="fxopt", options=options)
        return model
    if not keep_logits:
        model.forward = _loss_only_forward(model.forward, model)
    model.compile(backend="fxopt", options=options)
    return model


def _loss_only_forward(forward, model):
    """`forward` wrapped to drop the logits in training; a method of `model` (so deepcopy rebinds it)."""
    func = getattr(forward, "__func__", None)
    if func is None or getattr(forward, "__self__", None) is not model:
        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            out = forward(*args, **kwargs)
            return _loss_only_output(out) if model.training else out
        return wrapper

    @functools.wraps(func)   # keeps the signature the Trainer inspects (num_items_in_batch, label columns)
    def loss_only_forward(self, *args, **kwargs):
        out = func(self, *args, **kwargs)
        return _loss_only_output(out) if self.training else out
    return types.MethodType(loss_only_forward, model)

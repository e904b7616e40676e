"""A GPTMini as a transformers folder: weights, ``config.json`` and tokenizer, in the layout of
GPT-2 (``GPT2LMHeadModel``) or of Llama (``LlamaForCausalLM``), whichever the variant is.

    write_hf(model, tokenizer, folder)  # then, with no pocketgpt installed:
    AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)

The default GPTMini is GPT-2's architecture (learned positions, pre-LayerNorm blocks, fused
q|k|v, GELU with the tanh approximation = ``gelu_new``, LayerNorm eps 1e-5), so its export is a
renaming: GPT-2 keeps its linear layers as ``Conv1D`` with (in, out) weights, the transpose of
``nn.Linear``'s (out, in). A model built with ``bias=false`` gets zero biases, which GPT-2
always has.

RoPE + RMSNorm + SwiGLU is Llama's block, and our conventions are its own: RoPE rotates the
pairs (i, i + hs/2) (rotate-half, so q and k rows need no permuting) at frequencies
``base^(-2i/hs)`` (``rope_theta`` = ``rope_base``); RMSNorm has a weight and no bias, eps 1e-5
inside the root; SwiGLU is ``proj(silu(gate) * up)`` with ``fc``'s first ``d_ff`` rows the gate
(Llama's ``gate_proj``) and the next ``d_ff`` the up (``up_proj``). The fused q|k|v splits into
``q_proj``, ``k_proj``, ``v_proj`` with as many key/value heads as query heads.
``attention_bias`` and ``mlp_bias`` follow ``bias``. Nothing here imports transformers: the
folder is plain JSON and safetensors.

The tokenizer: our ``tokenizer.json`` (``Tokenizer.save_hf``: the same ids as ours) without its
post-processor, so ``tokenizer(text)`` adds no ``<bos>``/``<eos>``, as GPT-2's does not, and as
the model was trained (lines encoded without special tokens). The special tokens that exist
(``<bos>``, ``<eos>``, ``<pad>``, ``<unk>``) are mapped in ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pocketgpt.export.variants import check_exportable
from pocketgpt.model import NORM_EPS, GPTMini

SPECIAL_ROLES = {"bos_token": "bos_id", "eos_token": "eos_id", "pad_token": "pad_id"}


def gpt2_config(model: GPTMini, tokenizer: Any) -> dict[str, Any]:
    """The ``config.json`` of transformers' GPT2LMHeadModel for this model."""
    cfg = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        **_shared_config(model, tokenizer),
    }


def _shared_config(model: GPTMini, tokenizer: Any) -> dict[str, Any]:
    """The config.json keys both layouts write alike: cache, head tying, special ids, dtype."""
    return {
        "use_cache": True,
        "tie_word_embeddings": _tied(model),
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": "float32",
    }


def _tied(model: GPTMini) -> bool:
    return model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def gpt2_state_dict(model: GPTMini) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors from GPTMini's (contiguous CPU copies)."""

    def conv1d(linear: torch.nn.Linear) -> torch.Tensor:
        return linear.weight.t()  # (in, out): Conv1D computes x @ W + b

    def bias(module: torch.nn.Module, size: int) -> torch.Tensor:
        b = getattr(module, "bias", None)
        return b if b is not None else torch.zeros(size)  # bias=false: GPT-2's are zero

    C = model.config.d_model
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": model.tok_emb.weight,
        "transformer.wpe.weight": model.pos_emb.weight,
        "transformer.ln_f.weight": model.ln_f.weight,
        "transformer.ln_f.bias": bias(model.ln_f, C),
    }
    for i, block in enumerate(model.blocks):
        h = f"transformer.h.{i}."
        attn, ff = block.attn, block.ff
        out |= {
            h + "ln_1.weight": block.ln1.weight,
            h + "ln_1.bias": bias(block.ln1, C),
            h + "attn.c_attn.weight": conv1d(attn.qkv),  # (C, 3C): q | k | v, as ours
            h + "attn.c_attn.bias": bias(attn.qkv, 3 * C),
            h + "attn.c_proj.weight": conv1d(attn.proj),
            h + "attn.c_proj.bias": bias(attn.proj, C),
            h + "ln_2.weight": block.ln2.weight,
            h + "ln_2.bias": bias(block.ln2, C),
            h + "mlp.c_fc.weight": conv1d(ff.fc),
            h + "mlp.c_fc.bias": bias(ff.fc, ff.fc.out_features),
            h + "mlp.c_proj.weight": conv1d(ff.proj),
            h + "mlp.c_proj.bias": bias(ff.proj, C),
        }
    if not _tied(model):
        out["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def llama_config(model: GPTMini, tokenizer: Any) -> dict[str, Any]:
    """The ``config.json`` of transformers' LlamaForCausalLM for this (RoPE + RMSNorm + SwiGLU)
    model."""
    cfg = model.config
    theta = float(cfg.rope_base)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,  # plain multi-head attention
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": NORM_EPS,
        # transformers 5 reads rope_parameters, 4.x rope_theta: both, so either loads it
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        **_shared_config(model, tokenizer),
    }


def llama_state_dict(model: GPTMini) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's tensors from GPTMini's (contiguous CPU copies)."""
    C, d_ff = model.config.d_model, model.config.d_ff
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.tok_emb.weight,
        "model.norm.weight": model.ln_f.weight,
    }

    def linear(name: str, layer: torch.nn.Linear, rows: slice = slice(None)) -> None:
        out[name + ".weight"] = layer.weight[rows]  # (out, in), as nn.Linear's
        if layer.bias is not None:
            out[name + ".bias"] = layer.bias[rows]

    for i, block in enumerate(model.blocks):
        h = f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = block.ln1.weight
        out[h + "post_attention_layernorm.weight"] = block.ln2.weight
        qkv = block.attn.qkv  # rows: q | k | v, each head's hs rows in turn, as Llama's
        linear(h + "self_attn.q_proj", qkv, slice(0, C))
        linear(h + "self_attn.k_proj", qkv, slice(C, 2 * C))
        linear(h + "self_attn.v_proj", qkv, slice(2 * C, 3 * C))
        linear(h + "self_attn.o_proj", block.attn.proj)
        linear(h + "mlp.gate_proj", block.ff.fc, slice(0, d_ff))  # fc's rows: gate | up
        linear(h + "mlp.up_proj", block.ff.fc, slice(d_ff, 2 * d_ff))
        linear(h + "mlp.down_proj", block.ff.proj)
    if not _tied(model):
        out["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


# layout (export.variants.LAYOUTS) -> (config.json, tensors)
WRITERS = {"gpt2": (gpt2_config, gpt2_state_dict), "llama": (llama_config, llama_state_dict)}


def tokenizer_files(tokenizer: Any, max_len: int, scratch: Path) -> dict[str, str]:
    """{file name: text} of tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    ``scratch``: a folder for the tokenizer's own ``save_hf`` output (read back and edited).
    """
    raw = scratch / "tokenizer.source.json"
    tokenizer.save_hf(raw)
    data = json.loads(raw.read_text(encoding="utf-8"))
    raw.unlink()
    data["post_processor"] = None  # tokenizer(text) adds no specials: see the module doc
    names = list(tokenizer.special_tokens)
    specials = {
        role: names[getattr(tokenizer, attr)]
        for role, attr in (*SPECIAL_ROLES.items(), ("unk_token", "unk_id"))
        if getattr(tokenizer, attr) is not None
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",  # batched generation with a decoder-only model
    }
    dump = {"ensure_ascii": False, "indent": 2}
    return {
        "tokenizer.json": json.dumps(data, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, **dump) + "\n",
        "special_tokens_map.json": json.dumps(specials, **dump) + "\n",
    }


def write_hf(model: GPTMini, tokenizer: Any, folder: str | Path) -> Path:
    """Write the transformers folder's files into ``folder`` (an empty, temporary one: the
    caller renames it into place), in the layout of the model's variant (ExportError: none)."""
    folder = Path(folder)
    make_config, make_tensors = WRITERS[check_exportable(model.config.to_dict(), "hf")]
    save_file(make_tensors(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = make_config(model, tokenizer)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {
        k: config[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config[k] is not None
    }
    (folder / "generation_config.json").write_text(
        json.dumps(generation, indent=2) + "\n", encoding="utf-8"
    )
    for name, text in tokenizer_files(tokenizer, model.config.max_len, folder).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder

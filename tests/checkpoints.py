"""Tiny random checkpoints of several architectures, written through the real transformers classes."""

from __future__ import annotations

import os
import pathlib

from dataplane.models.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer

KINDS = ("llama", "mistral", "qwen2", "gpt2")

_DECODER_DEFAULTS = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
_DEFAULTS = {
    "llama": dict(_DECODER_DEFAULTS, tie_word_embeddings=False),
    "mistral": dict(_DECODER_DEFAULTS, tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(_DECODER_DEFAULTS, tie_word_embeddings=True),
    "gpt2": dict(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=3, n_head=4, n_positions=512, tie_word_embeddings=True),
}


def _classes(kind: str):
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
    }[kind]


def make_config(kind: str, **overrides):
    """Return the tiny default config of `kind` ("llama", "mistral", "qwen2", "gpt2") with `overrides` applied."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    config_cls, _ = _classes(kind)
    kwargs = dict(_DEFAULTS[kind], bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype="float32")
    kwargs.update(overrides)
    return config_cls(**kwargs)


def _reinit_(model, std: float = 0.05) -> None:
    """Re-draw every parameter (stronger than the default init) so that outputs are not degenerate."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                param.dim() == 1
                and ("norm" in name or name.split(".")[-2].startswith("ln"))
                and name.endswith("weight")
            ):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, std)


def build_model(kind: str, *, seed: int = 0, **overrides):
    """Build a seeded, randomly initialised float32 model of `kind` (see `make_config`)."""
    import torch

    config = make_config(kind, **overrides)
    _, model_cls = _classes(kind)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    _reinit_(model)
    model.tie_weights()
    return model


def write_checkpoint(
    kind: str, path: str | os.PathLike, *, seed: int = 0, max_shard_size: int | str | None = None, **overrides
) -> pathlib.Path:
    """Write a tiny random `kind` checkpoint (config, safetensors weights, byte-level tokenizer) to `path`.

    `max_shard_size` (e.g. "20KB") produces a sharded checkpoint with `model.safetensors.index.json`;
    `overrides` are passed to the config (e.g. `rope_parameters`, `tie_word_embeddings`, `attention_bias`).
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(kind, seed=seed, **overrides)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save_kwargs)
    build_byte_tokenizer().save_pretrained(path)
    return path


SHAPE_KEYS = {
    "llama": ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    + ("num_attention_heads", "num_key_value_heads"),
    "gpt2": ("model_type", "vocab_size", "n_embd", "n_layer", "n_head"),
}
SHAPE_KEYS["mistral"] = SHAPE_KEYS["qwen2"] = SHAPE_KEYS["llama"]


def edit_config(path: str | os.PathLike, *, keep=None, drop=(), **updates) -> dict:
    """Rewrite `path`/config.json: keep only the keys in `keep` (all when None), remove those in `drop`, then set
    `updates`; returns the written dict. `keep=SHAPE_KEYS[kind]` leaves a minimal config whose every other field
    takes the transformers default."""
    import json

    config_file = pathlib.Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    config = {k: v for k, v in config.items() if (keep is None or k in keep) and k not in drop}
    config.update(updates)
    config_file.write_text(json.dumps(config, indent=2))
    return config


def rewrite_tensors(source: str | os.PathLike, target: str | os.PathLike, edit) -> pathlib.Path:
    """Copy the single-file checkpoint `source` to `target` with its tensors passed through `edit` (a function
    from the name -> tensor dict to the dict to save)."""
    from safetensors.torch import load_file, save_file

    source, target = pathlib.Path(source), pathlib.Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    tensors = edit(load_file(source / "model.safetensors"))
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def hf_greedy_tokens(model_dir, prompts, new_tokens: int) -> list[list[int]]:
    """transformers' own greedy ``generate`` of exactly ``new_tokens`` tokens for each prompt, one at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=PAD_ID,
            )
            outputs.append(generated[0, len(prompt) :].tolist())
    return outputs

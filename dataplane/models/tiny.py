"""The embedded tiny model: a deterministic tiny Llama checkpoint with a byte-level tokenizer, for tests and
benchmarks (the default model is SmolLM2-135M-Instruct, `dataplane.models.default_model`)."""

from __future__ import annotations

import argparse
import os
import pathlib

from dataplane.models.model_cache import CHECKPOINT_FILES, install_atomically, is_installed, models_dir
from dataplane.models.model_cache import default_cache_dir as default_cache_dir

MODEL_NAME = "flexpipe-tiny-llama-v1"
SEED = 1234
BYTE_VOCAB = 256
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 260
REQUIRED_FILES = CHECKPOINT_FILES


def _bytes_to_unicode() -> list[str]:
    """GPT-2 byte-level alphabet, indexed by byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    chars, extra = [], 0
    for b in range(BYTE_VOCAB):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(BYTE_VOCAB + extra))
            extra += 1
    return chars


def build_byte_tokenizer():
    """Build a byte-level `PreTrainedTokenizerFast`: id i is byte i for i < 256, then `<s>`=256, `</s>`=257,
    `<pad>`=258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    assert set(byte_chars) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab.update({BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID, PAD_TOKEN: PAD_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def tiny_llama_config():
    """Return the `LlamaConfig` of the embedded tiny model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )


def _deterministic_state_dict(model, seed: int) -> dict:
    """Draw every parameter from a seeded generator in sorted name order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in sorted(model.state_dict().items()):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        state[name] = 1.0 + 0.1 * noise if param.dim() == 1 else 0.02 * noise
    return state


def _write_tiny_model(target: pathlib.Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    config = tiny_llama_config()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(_deterministic_state_dict(model, SEED), strict=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    model.save_pretrained(target)
    build_byte_tokenizer().save_pretrained(target)


def is_complete(path: os.PathLike | str) -> bool:
    """Return True if `path` holds a fully written tiny model."""
    return is_installed(path, REQUIRED_FILES)


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Write the tiny model into `<cache>/models/flexpipe-tiny-llama-v1` unless already complete; return its path.

    The checkpoint is built in a temporary sibling directory and renamed into place, so concurrent
    callers never observe a partially written model.
    """
    return install_atomically(models_dir(cache_dir) / MODEL_NAME, _write_tiny_model, REQUIRED_FILES)


def main(argv: list[str] | None = None) -> None:
    """CLI: write the tiny model if needed and print its path."""
    parser = argparse.ArgumentParser(description="Write the FlexPipe tiny model and print its path.")
    parser.add_argument(
        "--cache-dir", default=None, help="cache directory (default: $FLEXPIPE_CACHE_DIR or ~/.cache/flexpipe)"
    )
    args = parser.parse_args(argv)
    print(ensure_tiny_model(args.cache_dir))


if __name__ == "__main__":
    main()

"""The architecture facts FlexPipe needs, read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import CheckpointError, UnsupportedModelError

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GPT2_FAMILY = ("GPT2LMHeadModel",)
SUPPORTED_ARCHITECTURES = LLAMA_FAMILY + GPT2_FAMILY

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Normalised description of a supported decoder-only checkpoint.

    Invariants: ``family`` is "llama" or "gpt2"; ``num_heads`` is a multiple of
    ``num_kv_heads``; ``sliding_windows`` has one entry per layer (None = full attention).
    """

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    sliding_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype_bytes: int
    mlp_matrices: int
    raw_config: dict

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        architectures = config.get("architectures") or []
        architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise UnsupportedModelError(
                f"architecture {architectures or config.get('model_type')!r} is not supported; "
                f"FlexPipe serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            build = _llama_fields if architecture in LLAMA_FAMILY else _gpt2_fields
            fields = build(config)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"config.json of {architecture} is missing or has a bad field: {exc!r}") from exc
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype_name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
        spec = cls(
            architecture=architecture,
            eos_token_ids=eos_ids,
            bos_token_id=config.get("bos_token_id"),
            dtype_bytes=_DTYPE_BYTES.get(dtype_name, 4),
            raw_config=config,
            **fields,
        )
        if spec.num_heads % spec.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads {spec.num_heads} is not a multiple of num_key_value_heads {spec.num_kv_heads}"
            )
        return spec


def _sliding_windows(config: dict, num_layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if config.get("use_sliding_window") is False:
        return (None,) * num_layers
    return (window,) * num_layers


def _llama_fields(config: dict) -> dict:
    num_layers = int(config["num_hidden_layers"])
    num_heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return dict(
        family="llama",
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config["max_position_embeddings"]),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        hidden_act=str(config.get("hidden_act", "silu")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(config, num_layers),
        mlp_matrices=3,
    )


def _gpt2_fields(config: dict) -> dict:
    hidden = int(config["n_embd"])
    num_heads = int(config["n_head"])
    num_layers = int(config["n_layer"])
    return dict(
        family="gpt2",
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        intermediate_size=int(config.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(config["n_positions"]),
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        hidden_act=str(config.get("activation_function", "gelu_new")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        sliding_windows=(None,) * num_layers,
        mlp_matrices=2,
    )


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist or is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json; expected a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    return config

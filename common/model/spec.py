"""The architecture facts FlexPipe needs, read from a checkpoint's config.json and generation_config.json.

Every field is read with transformers' semantics for its architecture: a field config.json leaves out takes the
default of the transformers config class (the tables of ``common.model.architectures``), and every value transformers
accepts is either carried into ``ModelSpec`` for the adapters of ``dataplane.models`` to compute, or refused with a
``CheckpointError`` / ``UnsupportedModelError`` that names the field and the value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import CheckpointError
from common.model.architectures import resolve_architecture
from common.model.config_fields import ConfigFields, gpt2_fields, is_int, llama_fields, token_ids

GENERATION_CONFIG_FILE = "generation_config.json"

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Normalised description of a supported decoder-only checkpoint, with transformers' defaults resolved.

    Invariants: ``family`` is "llama" or "gpt2"; ``num_heads`` is a multiple of ``num_kv_heads``;
    ``sliding_windows`` and ``attention_scales`` have one entry per layer (window None = full attention; a key
    at distance d from a query is seen when d < window); ``qkv_bias``/``o_bias``/``mlp_bias`` say which
    projections carry a bias (GPT-2's Conv1D always do); ``attention_upcast`` computes attention in float32;
    ``rope_parameters`` (llama family; None for GPT-2) is the RoPE dict in transformers' standard form:
    ``rope_type`` of ``SUPPORTED_ROPE_TYPES``, ``rope_theta`` and, for yarn/longrope/llama3,
    ``original_max_position_embeddings`` always present, no ``partial_rotary_factor`` (the whole head rotates);
    ``eos_token_ids`` is the union, in order and without repeats, of config.json's ids (the config class
    default when the field is absent) and generation_config.json's ids.
    """

    architecture: str
    model_type: str
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
    attention_scales: tuple[float, ...]
    attention_upcast: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope_parameters: dict | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype_bytes: int
    mlp_matrices: int
    raw_config: dict

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelSpec:
        """The spec of the checkpoint directory ``model_dir``: its config.json and, when present, its
        generation_config.json. Raises CheckpointError (missing/malformed file or field) or UnsupportedModelError."""
        return cls.from_config(read_config(model_dir), read_generation_config(model_dir))

    @classmethod
    def from_config(cls, config: dict, generation_config: dict | None = None) -> ModelSpec:
        """The spec of a parsed config.json (and generation_config.json, ``{}``/None when there is none).

        Raises UnsupportedModelError when neither ``architectures`` nor ``model_type`` names a supported
        architecture or a value has no FlexPipe implementation, CheckpointError for a malformed or
        inconsistent field (the message names the field and the value)."""
        arch = resolve_architecture(config)
        fields = ConfigFields(config, arch)
        build = gpt2_fields if arch.family == "gpt2" else llama_fields
        eos_ids = token_ids(fields.value("eos_token_id"), "eos_token_id", "config.json")
        eos_ids += token_ids((generation_config or {}).get("eos_token_id"), "eos_token_id", GENERATION_CONFIG_FILE)
        bos = fields.value("bos_token_id")
        if bos is not None and not is_int(bos):
            raise CheckpointError(f"config.json field 'bos_token_id' must be an integer or null, got {bos!r}")
        dtype_name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
        spec = cls(
            architecture=arch.name,
            model_type=arch.model_type,
            family=arch.family,
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            bos_token_id=bos,
            dtype_bytes=_DTYPE_BYTES.get(dtype_name, 4),
            raw_config=config,
            **build(fields, arch),
        )
        if spec.num_heads % spec.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads {spec.num_heads} is not a multiple of num_key_value_heads {spec.num_kv_heads}"
            )
        return spec


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return value


def read_config(model_dir: str | Path) -> dict:
    """The parsed config.json of ``model_dir``. Raises CheckpointError when the directory or the file is
    missing or the file is not a JSON object."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist or is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json; expected a Hugging Face checkpoint directory")
    return _read_json_object(config_file)


def read_generation_config(model_dir: str | Path) -> dict:
    """The parsed generation_config.json of ``model_dir``, ``{}`` when there is none. Raises CheckpointError
    naming the file when it is not a JSON object."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    return _read_json_object(path) if path.is_file() else {}

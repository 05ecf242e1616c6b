"""The architecture facts FlexPipe needs, read from a checkpoint's config.json and generation_config.json.

Every field is read with transformers' semantics for its architecture: a field config.json leaves out takes the
default of the transformers config class (the tables below, from transformers 5.24), and every value transformers
accepts is either carried into ``ModelSpec`` for the adapters of ``dataplane.models`` to compute, or refused with a
``CheckpointError`` / ``UnsupportedModelError`` that names the field and the value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from common.errors import CheckpointError, InvalidRequestError, UnsupportedModelError

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
GPT2_FAMILY = ("GPT2LMHeadModel",)
SUPPORTED_ARCHITECTURES = LLAMA_FAMILY + GPT2_FAMILY

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
"""RoPE types of ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` that ``dataplane.models.rope`` computes."""

SUPPORTED_ACTIVATIONS = (
    "gelu",
    "gelu_10",
    "gelu_fast",
    "gelu_new",
    "gelu_python",
    "gelu_pytorch_tanh",
    "gelu_python_tanh",
    "gelu_accurate",
    "hardswish",
    "laplace",
    "leaky_relu",
    "linear",
    "mish",
    "quick_gelu",
    "relu",
    "relu2",
    "relu6",
    "sigmoid",
    "silu",
    "sqrtsoftplus",
    "swish",
    "tanh",
)
"""Names of ``transformers.activations.ACT2FN`` that ``dataplane.models.layers`` computes; ACT2FN's "prelu" and
"xielu" carry learned parameters FlexPipe does not load and are refused."""

GENERATION_CONFIG_FILE = "generation_config.json"

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_LEGACY_LAYER_TYPES = {"attention": "full_attention"}  # transformers.configuration_utils._LEGACY_LAYER_TYPE_REMAP
_USES_ORIGINAL_MAX = ("yarn", "longrope", "llama3")
_REQUIRED_ROPE_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}
_ABSENT = object()


@dataclass(frozen=True, slots=True)
class Architecture:
    """One supported architecture: its class, the ``model_type`` transformers' Auto classes build it from
    (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), and the defaults of ``config_class`` for every field that changes
    its math or its stop tokens (``None``: transformers derives the value, see ``ModelSpec.from_config``)."""

    name: str
    model_type: str
    family: str
    config_class: str
    defaults: Mapping[str, Any]


LLAMA = Architecture(
    "LlamaForCausalLM",
    "llama",
    "llama",
    "transformers.LlamaConfig",
    MappingProxyType(
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": None,
            "head_dim": None,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    ),
)
MISTRAL = Architecture(
    "MistralForCausalLM",
    "mistral",
    "llama",
    "transformers.MistralConfig",
    MappingProxyType(
        {
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": None,
            "hidden_act": "silu",
            "max_position_embeddings": 4096 * 32,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    ),
)
QWEN2 = Architecture(
    "Qwen2ForCausalLM",
    "qwen2",
    "llama",
    "transformers.Qwen2Config",
    MappingProxyType(
        {
            "vocab_size": 151936,
            "hidden_size": 4096,
            "intermediate_size": 22016,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "use_sliding_window": False,
            "sliding_window": 4096,
            "max_window_layers": 28,
            "layer_types": None,
            "bos_token_id": None,
            "eos_token_id": None,
        }
    ),
)
GPT2 = Architecture(
    "GPT2LMHeadModel",
    "gpt2",
    "gpt2",
    "transformers.GPT2Config",
    MappingProxyType(
        {
            "vocab_size": 50257,
            "n_positions": 1024,
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        }
    ),
)
ARCHITECTURES = {a.name: a for a in (LLAMA, MISTRAL, QWEN2, GPT2)}
MODEL_TYPES = {a.model_type: a for a in ARCHITECTURES.values()}
_GPT2_ALIASES = {  # transformers.GPT2Config.attribute_map
    "n_embd": "hidden_size",
    "n_positions": "max_position_embeddings",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
}


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
        fields = _Fields(config, arch)
        build = _gpt2_fields if arch.family == "gpt2" else _llama_fields
        eos_ids = _token_ids(fields.value("eos_token_id"), "eos_token_id", "config.json")
        eos_ids += _token_ids((generation_config or {}).get("eos_token_id"), "eos_token_id", GENERATION_CONFIG_FILE)
        bos = fields.value("bos_token_id")
        if bos is not None and not _is_int(bos):
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


def resolve_architecture(config: dict) -> Architecture:
    """The architecture of a parsed config.json: the first entry of ``architectures`` FlexPipe serves, else the
    one transformers' Auto classes build for ``model_type``. Raises UnsupportedModelError naming both values when
    neither resolves, CheckpointError when a served ``architectures`` entry contradicts a served ``model_type``."""
    architectures = config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list):
        raise CheckpointError(f"config.json field 'architectures' must be a list, got {architectures!r}")
    model_type = config.get("model_type")
    by_type = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    named = next((ARCHITECTURES[a] for a in architectures if isinstance(a, str) and a in ARCHITECTURES), None)
    if named is not None:
        if by_type is not None and by_type is not named:
            raise CheckpointError(
                f"config.json names architecture {named.name!r} but model_type {model_type!r}, "
                f"which transformers builds as {by_type.name}"
            )
        return named
    if by_type is not None:
        return by_type
    raise UnsupportedModelError(
        f"architectures {architectures!r} and model_type {model_type!r} are not supported; FlexPipe serves "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (model types {', '.join(MODEL_TYPES)})"
    )


def resolve_max_model_len(spec: ModelSpec, requested: int | None) -> int:
    """The longest prompt + output, in tokens, a pipeline of ``spec`` serves.

    ``requested`` None or 0 gives the longest context the model allows; a positive value is honoured when at
    most that. The allowed context follows vLLM's ``_get_and_verify_max_len``: GPT-2 ``n_positions``; RoPE
    "default", "llama3", "longrope" ``max_position_embeddings``; "linear", "dynamic" ``max_position_embeddings
    * factor``; "yarn" ``max(max_position_embeddings, original_max_position_embeddings * factor)``.
    Raises InvalidRequestError for a negative value or one beyond the allowed context."""
    allowed = _allowed_context(spec)
    if requested is None or requested == 0:
        return allowed
    if not _is_int(requested) or requested < 0:
        raise InvalidRequestError(
            f"max_model_len must be a positive integer (0 or None: the model's), got {requested!r}"
        )
    if requested > allowed:
        raise InvalidRequestError(f"max_model_len {requested} exceeds the {allowed} tokens {_context_reason(spec)}")
    return requested


def _allowed_context(spec: ModelSpec) -> int:
    rope = spec.rope_parameters
    max_pos = spec.max_position_embeddings
    if rope is None or rope["rope_type"] in ("default", "llama3", "longrope"):
        return max_pos
    if rope["rope_type"] in ("linear", "dynamic"):
        return int(max_pos * rope["factor"])
    return max(max_pos, int(rope["original_max_position_embeddings"] * rope["factor"]))


def _context_reason(spec: ModelSpec) -> str:
    rope = spec.rope_parameters
    if rope is None:
        return f"of {spec.architecture}'s n_positions"
    text = f"{spec.architecture} allows with max_position_embeddings {spec.max_position_embeddings}"
    if rope["rope_type"] in ("default", "llama3", "longrope"):
        return f"{text} and rope_type {rope['rope_type']!r}"
    if rope["rope_type"] in ("linear", "dynamic"):
        return f"{text} and rope_type {rope['rope_type']!r} factor {rope['factor']}"
    return (
        f"{text}, rope_type 'yarn' factor {rope['factor']} and original_max_position_embeddings "
        f"{rope['original_max_position_embeddings']}"
    )


class _Fields:
    """config.json values of one architecture, each checked, with the architecture's default when absent."""

    def __init__(self, config: dict, arch: Architecture) -> None:
        self.config, self.arch = config, arch

    def value(self, name: str) -> Any:
        value = self.config.get(name, _ABSENT)
        if value is _ABSENT and self.arch is GPT2 and name in _GPT2_ALIASES:
            value = self.config.get(_GPT2_ALIASES[name], _ABSENT)
        return self.arch.defaults.get(name) if value is _ABSENT else value

    def refuse(self, name: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"config.json field {name!r} of {self.arch.name} must be {expected}, got {value!r}")

    def int(self, name: str, *, minimum: int = 1, nullable: bool = False) -> int | None:
        value = self.value(name)
        if value is None and nullable:
            return None
        if not _is_int(value) or value < minimum:
            raise self.refuse(name, value, f"an integer >= {minimum}" + (" or null" if nullable else ""))
        return value

    def float(self, name: str) -> float:
        value = self.value(name)
        if not (_is_int(value) or isinstance(value, float)):
            raise self.refuse(name, value, "a number")
        return float(value)

    def bool(self, name: str) -> bool:
        value = self.value(name)
        if not isinstance(value, bool):
            raise self.refuse(name, value, "true or false")
        return value

    def activation(self, name: str) -> str:
        value = self.value(name)
        if value not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(
                f"{name} {value!r} of {self.arch.name} is not supported; FlexPipe computes "
                f"{', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        return value


def _llama_fields(f: _Fields, arch: Architecture) -> dict:
    num_layers = f.int("num_hidden_layers")
    num_heads = f.int("num_attention_heads")
    hidden = f.int("hidden_size")
    if arch is LLAMA and hidden % num_heads:
        raise CheckpointError(  # transformers.LlamaConfig.validate_architecture
            f"hidden_size {hidden} of LlamaForCausalLM is not a multiple of num_attention_heads {num_heads}"
        )
    head_dim = f.int("head_dim", nullable=True) or hidden // num_heads
    max_pos = f.int("max_position_embeddings")
    if arch is LLAMA:
        qkv_bias = o_bias = f.bool("attention_bias")
        mlp_bias = f.bool("mlp_bias")
    else:  # MistralAttention/MistralMLP: no biases; Qwen2Attention: q, k, v biases only; Qwen2MLP: none
        qkv_bias, o_bias, mlp_bias = arch is QWEN2, False, False
    return dict(
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=f.int("num_key_value_heads", nullable=True) or num_heads,
        head_dim=head_dim,
        intermediate_size=f.int("intermediate_size"),
        max_position_embeddings=max_pos,
        norm_eps=f.float("rms_norm_eps"),
        hidden_act=f.activation("hidden_act"),
        tie_word_embeddings=f.bool("tie_word_embeddings"),
        sliding_windows=_SLIDING_WINDOWS[arch.name](f, num_layers),
        attention_scales=(head_dim**-0.5,) * num_layers,
        attention_upcast=False,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        rope_parameters=_rope_parameters(f, max_pos),
        mlp_matrices=3,
    )


def _gpt2_fields(f: _Fields, arch: Architecture) -> dict:
    hidden = f.int("n_embd")
    num_heads = f.int("n_head")
    num_layers = f.int("n_layer")
    if hidden % num_heads:
        raise CheckpointError(f"n_embd {hidden} of GPT2LMHeadModel is not a multiple of n_head {num_heads}")
    head_dim = hidden // num_heads
    base_scale = head_dim**-0.5 if f.bool("scale_attn_weights") else 1.0
    by_layer = f.bool("scale_attn_by_inverse_layer_idx")
    return dict(
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        intermediate_size=f.int("n_inner", nullable=True) or 4 * hidden,
        max_position_embeddings=f.int("n_positions"),
        norm_eps=f.float("layer_norm_epsilon"),
        hidden_act=f.activation("activation_function"),
        tie_word_embeddings=f.bool("tie_word_embeddings"),
        sliding_windows=(None,) * num_layers,
        attention_scales=tuple(base_scale / float(i + 1) if by_layer else base_scale for i in range(num_layers)),
        attention_upcast=f.bool("reorder_and_upcast_attn"),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        rope_parameters=None,
        mlp_matrices=2,
    )


def _layer_types(f: _Fields, num_layers: int) -> list[str] | None:
    layer_types = f.value("layer_types")
    if layer_types is None:
        return None
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise f.refuse("layer_types", layer_types, f"a list of {num_layers} layer types (num_hidden_layers)")
    layer_types = [_LEGACY_LAYER_TYPES.get(kind, kind) for kind in layer_types]
    odd = sorted({str(kind) for kind in layer_types} - {"full_attention", "sliding_attention"})
    if odd:
        raise UnsupportedModelError(
            f"layer_types {odd} of {f.arch.name} are not supported; FlexPipe serves full_attention and "
            "sliding_attention layers"
        )
    return layer_types


def _llama_windows(f: _Fields, num_layers: int) -> tuple[int | None, ...]:
    """LlamaConfig has no sliding window; LlamaModel masks every layer causally, but transformers' DynamicCache
    would build sliding cache layers from a stray ``sliding_window``/``layer_types``, which drop keys while
    decoding. Such a checkpoint has no one meaning and is refused."""
    window = f.config.get("sliding_window")
    if window is not None:
        raise UnsupportedModelError(
            f"sliding_window {window!r} of LlamaForCausalLM is not supported: LlamaModel attends fully in its "
            "forward while transformers' cache keeps only the window when decoding"
        )
    layer_types = _layer_types(f, num_layers)
    if layer_types is not None and "sliding_attention" in layer_types:
        raise UnsupportedModelError(
            f"layer_types {layer_types} of LlamaForCausalLM is not supported: LlamaModel has no sliding layers"
        )
    return (None,) * num_layers


def _mistral_windows(f: _Fields, num_layers: int) -> tuple[int | None, ...]:
    """MistralModel masks every layer with ``sliding_window`` (None: full attention); a ``layer_types`` entry
    only changes transformers' cache, so one that disagrees with the mask is refused."""
    window = f.int("sliding_window", nullable=True)
    layer_types = _layer_types(f, num_layers)
    expected = "full_attention" if window is None else "sliding_attention"
    if layer_types is not None and any(kind != expected for kind in layer_types):
        raise UnsupportedModelError(
            f"layer_types {layer_types} of MistralForCausalLM is not supported with sliding_window {window!r}: "
            f"MistralModel gives every layer {expected}"
        )
    return (window,) * num_layers


def _qwen2_windows(f: _Fields, num_layers: int) -> tuple[int | None, ...]:
    """Qwen2Config: ``sliding_window`` counts only with ``use_sliding_window``; without ``layer_types``, layers
    ``i >= max_window_layers`` slide. A sliding_attention layer without a window fails in Qwen2Model and is refused."""
    use_window = f.bool("use_sliding_window")
    window = f.int("sliding_window", nullable=True) if use_window else None
    layer_types = _layer_types(f, num_layers)
    if layer_types is None:
        first_sliding = f.int("max_window_layers", minimum=0)
        return tuple(window if i >= first_sliding else None for i in range(num_layers))
    if window is None and "sliding_attention" in layer_types:
        raise CheckpointError(
            f"layer_types {layer_types} of Qwen2ForCausalLM has sliding_attention layers but no window "
            f"(use_sliding_window {use_window!r}, sliding_window {f.value('sliding_window')!r})"
        )
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


_SLIDING_WINDOWS = {LLAMA.name: _llama_windows, MISTRAL.name: _mistral_windows, QWEN2.name: _qwen2_windows}


def _rope_parameters(f: _Fields, max_pos: int) -> dict:
    """RoPE parameters as ``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` and ``standardize_rope_params``
    leave them when the rotary embedding of LlamaModel, MistralModel or Qwen2Model is built: for yarn, longrope
    and llama3, a top-level ``original_max_position_embeddings`` (Phi-3 style) overrides the RoPE dict's, which
    defaults to ``max_position_embeddings``."""
    config = f.config
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise f.refuse("rope_parameters", rope, "an object")
    if any(isinstance(value, dict) for value in rope.values()):
        raise UnsupportedModelError(f"rope_parameters per layer type {rope!r} are not supported")
    rope = dict(rope)
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope['rope_type']!r} is not supported; supported types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    rope.setdefault("rope_theta", config.get("rope_theta", f.arch.defaults["rope_theta"]))
    theta = rope["rope_theta"]
    if not (_is_int(theta) or isinstance(theta, float)) or theta <= 0:
        raise f.refuse("rope_theta", theta, "a positive number")
    partial = rope.pop("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial is not None and partial != 1 and rope["rope_type"] != "default":
        raise UnsupportedModelError(
            f"partial_rotary_factor {partial!r} with rope_type {rope['rope_type']!r} is not supported: "
            f"{f.arch.name} rotates whole heads (its default RoPE ignores the factor, scaled ones fail in transformers)"
        )
    if rope["rope_type"] in _USES_ORIGINAL_MAX:
        original = config.get("original_max_position_embeddings", rope.get("original_max_position_embeddings"))
        rope["original_max_position_embeddings"] = max_pos if original is None else original
        if not _is_int(rope["original_max_position_embeddings"]) or rope["original_max_position_embeddings"] < 1:
            raise f.refuse("original_max_position_embeddings", original, "a positive integer")
    for key in _REQUIRED_ROPE_KEYS.get(rope["rope_type"], ()):
        if key not in rope:
            raise CheckpointError(f"rope_parameters of rope_type {rope['rope_type']!r} lack {key!r}: {rope!r}")
    factor = rope.get("factor")
    if rope["rope_type"] in ("linear", "dynamic", "yarn") and (
        not (_is_int(factor) or isinstance(factor, float)) or factor <= 0
    ):
        raise f.refuse("rope_parameters.factor", factor, "a positive number")
    return rope


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(value: Any, name: str, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(_is_int(v) for v in values):
        raise CheckpointError(f"{source} field {name!r} must be an integer, a list of integers or null, got {value!r}")
    return tuple(values)


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

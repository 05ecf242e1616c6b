"""Reading one architecture's config.json fields with transformers' semantics: each value checked, each absent
field given the config class default, every refusal naming the field and the value."""

from __future__ import annotations

from typing import Any

from common.errors import CheckpointError, UnsupportedModelError
from common.model.architectures import (
    GPT2,
    LLAMA,
    MISTRAL,
    QWEN2,
    SUPPORTED_ACTIVATIONS,
    SUPPORTED_ROPE_TYPES,
    Architecture,
)

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

_GPT2_ALIASES = {  # transformers.GPT2Config.attribute_map
    "n_embd": "hidden_size",
    "n_positions": "max_position_embeddings",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
}


class ConfigFields:
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
        if not is_int(value) or value < minimum:
            raise self.refuse(name, value, f"an integer >= {minimum}" + (" or null" if nullable else ""))
        return value

    def float(self, name: str) -> float:
        value = self.value(name)
        if not (is_int(value) or isinstance(value, float)):
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


def llama_fields(f: ConfigFields, arch: Architecture) -> dict:
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


def gpt2_fields(f: ConfigFields, arch: Architecture) -> dict:
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


def _layer_types(f: ConfigFields, num_layers: int) -> list[str] | None:
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


def _llama_windows(f: ConfigFields, num_layers: int) -> tuple[int | None, ...]:
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


def _mistral_windows(f: ConfigFields, num_layers: int) -> tuple[int | None, ...]:
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


def _qwen2_windows(f: ConfigFields, num_layers: int) -> tuple[int | None, ...]:
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


def _rope_parameters(f: ConfigFields, max_pos: int) -> dict:
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
    if not (is_int(theta) or isinstance(theta, float)) or theta <= 0:
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
        if not is_int(rope["original_max_position_embeddings"]) or rope["original_max_position_embeddings"] < 1:
            raise f.refuse("original_max_position_embeddings", original, "a positive integer")
    for key in _REQUIRED_ROPE_KEYS.get(rope["rope_type"], ()):
        if key not in rope:
            raise CheckpointError(f"rope_parameters of rope_type {rope['rope_type']!r} lack {key!r}: {rope!r}")
    factor = rope.get("factor")
    if rope["rope_type"] in ("linear", "dynamic", "yarn") and (
        not (is_int(factor) or isinstance(factor, float)) or factor <= 0
    ):
        raise f.refuse("rope_parameters.factor", factor, "a positive number")
    return rope


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def token_ids(value: Any, name: str, source: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(is_int(v) for v in values):
        raise CheckpointError(f"{source} field {name!r} must be an integer, a list of integers or null, got {value!r}")
    return tuple(values)

"""The architectures FlexPipe serves and the transformers defaults of each, as declarative tables.

Each table cites the transformers config class (transformers 5.24) its defaults come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from common.errors import CheckpointError, UnsupportedModelError

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

"""ModelSpec against transformers' own config classes and modules, which serve as the independent reference."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json

import msgspec
import pytest
import torch
from transformers import AutoConfig, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from common import events as ev
from common.errors import CheckpointError, InvalidRequestError, UnsupportedModelError
from common.model.architectures import ARCHITECTURES, SUPPORTED_ACTIVATIONS
from common.model.context import resolve_max_model_len
from common.model.spec import ModelSpec
from controlplane.deploy.plan import plan_pipeline

MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def hf_config(config: dict):
    """The transformers config object of a config.json dict (the class its ``model_type`` names)."""
    return type(AutoConfig.for_model(config["model_type"])).from_dict(copy.deepcopy(config))


def transformers_facts(config: dict) -> dict:
    """Every ModelSpec field that changes the math, as transformers' config and modules (built on the meta
    device) resolve it for ``config``."""
    c = hf_config(config)
    model_type = c.model_type
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    layers = c.num_hidden_layers
    with torch.device("meta"):
        if model_type == "gpt2":
            attentions = [modeling.GPT2Attention(c, layer_idx=i) for i in range(layers)]
            mlp = modeling.GPT2MLP(c.n_inner if c.n_inner is not None else 4 * c.hidden_size, c)
            return dict(
                vocab_size=c.vocab_size,
                hidden_size=c.hidden_size,
                num_layers=layers,
                num_heads=c.num_attention_heads,
                num_kv_heads=c.num_attention_heads,
                head_dim=attentions[0].head_dim,
                intermediate_size=mlp.c_fc.nf,
                max_position_embeddings=c.max_position_embeddings,
                norm_eps=c.layer_norm_epsilon,
                hidden_act=c.activation_function,
                tie_word_embeddings=c.tie_word_embeddings,
                sliding_windows=(None,) * layers,
                attention_scales=tuple(a.scaling for a in attentions),
                attention_upcast=c.reorder_and_upcast_attn,
                qkv_bias=attentions[0].c_attn.bias is not None,
                o_bias=attentions[0].c_proj.bias is not None,
                mlp_bias=mlp.c_fc.bias is not None,
                rope_parameters=None,
                eos_token_ids=eos_tuple(c.eos_token_id),
            )
        prefix = PREFIX[model_type]
        attentions = [getattr(modeling, f"{prefix}Attention")(c, layer_idx=i) for i in range(layers)]
        mlp = getattr(modeling, f"{prefix}MLP")(c)
    getattr(modeling, f"{prefix}RotaryEmbedding")(c)  # standardizes c.rope_parameters once more, as the model does
    if model_type == "mistral":  # MistralModel.forward masks every layer with config.sliding_window
        windows = (getattr(c, "sliding_window", None),) * layers
    else:
        windows = tuple(getattr(a, "sliding_window", None) for a in attentions)
    rope = dict(c.rope_parameters)
    if rope["rope_type"] == "default":  # compute_default_rope_parameters rotates the whole head
        rope.pop("partial_rotary_factor", None)
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=attentions[0].head_dim,
        intermediate_size=mlp.gate_proj.out_features,
        max_position_embeddings=c.max_position_embeddings,
        norm_eps=c.rms_norm_eps,
        hidden_act=c.hidden_act,
        tie_word_embeddings=c.tie_word_embeddings,
        sliding_windows=windows,
        attention_scales=tuple(a.scaling for a in attentions),
        attention_upcast=False,
        qkv_bias=attentions[0].q_proj.bias is not None,
        o_bias=attentions[0].o_proj.bias is not None,
        mlp_bias=mlp.gate_proj.bias is not None,
        rope_parameters=rope,
        eos_token_ids=eos_tuple(c.eos_token_id),
    )


def eos_tuple(value) -> tuple[int, ...]:
    return () if value is None else tuple(value) if isinstance(value, list) else (value,)


def assert_matches_transformers(config: dict) -> ModelSpec:
    spec = ModelSpec.from_config(copy.deepcopy(config))
    for field, expected in transformers_facts(config).items():
        assert getattr(spec, field) == expected, (
            f"{field}: FlexPipe {getattr(spec, field)!r}, transformers {expected!r}"
        )
    return spec


@pytest.mark.parametrize("arch", list(ARCHITECTURES.values()), ids=lambda a: a.model_type)
def test_default_tables_are_the_transformers_config_class_defaults(arch):
    config_class = type(AutoConfig.for_model(arch.model_type))
    assert arch.config_class == f"transformers.{config_class.__name__}"
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch.model_type] == arch.name
    declared = {f.name: f.default for f in dataclasses.fields(config_class)}
    for name, value in arch.defaults.items():
        expected = config_class.default_theta if name == "rope_theta" else declared[name]
        assert value == expected and type(value) is type(expected), f"{arch.name}.{name}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_absent_fields_take_the_transformers_defaults(model_type):
    spec = assert_matches_transformers({"model_type": model_type})
    assert spec.architecture == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


VARIANTS = {
    "llama_everything_set": {
        "model_type": "llama",
        "attention_bias": True,
        "mlp_bias": True,
        "head_dim": 256,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
        "hidden_act": "gelu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "eos_token_id": [2, 7],
    },
    "llama_v4_rope": {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 5e5},
    "llama_partial_default_rope": {"model_type": "llama", "partial_rotary_factor": 0.5},
    "llama_yarn_top_level_original": {
        "model_type": "llama",
        "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
        "original_max_position_embeddings": 1024,
    },
    "llama_longrope_defaults": {
        "model_type": "llama",
        "head_dim": 8,
        "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    },
    "mistral_no_window": {"model_type": "mistral", "sliding_window": None},
    "mistral_window_head_dim": {"model_type": "mistral", "sliding_window": 1024, "head_dim": 64},
    "mistral_consistent_layer_types": {"model_type": "mistral", "layer_types": ["sliding_attention"] * 32},
    "qwen2_window_from_max_window_layers": {
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 512,
        "max_window_layers": 20,
    },
    "qwen2_window_default_size": {"model_type": "qwen2", "use_sliding_window": True},
    "qwen2_window_off": {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 512},
    "qwen2_layer_types": {
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 256,
        "layer_types": ["sliding_attention", "full_attention"] * 16,
    },
    "qwen2_legacy_layer_types": {"model_type": "qwen2", "layer_types": ["attention"] * 32},
    "qwen2_head_dim": {"model_type": "qwen2", "head_dim": 64, "num_key_value_heads": None},
    "gpt2_unscaled": {"model_type": "gpt2", "scale_attn_weights": False},
    "gpt2_inverse_layer_idx": {"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True},
    "gpt2_mlp": {"model_type": "gpt2", "reorder_and_upcast_attn": True, "n_inner": 1000, "activation_function": "relu"},
    "gpt2_aliases": {
        "model_type": "gpt2",
        "hidden_size": 256,
        "num_attention_heads": 8,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
    },
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_set_fields_mean_what_they_mean_in_transformers(name):
    assert_matches_transformers(VARIANTS[name])


def test_architecture_resolves_from_model_type_as_the_auto_classes_do():
    for model_type in MODEL_TYPES:
        expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        for architectures in ([], None, ["SomethingForSequenceClassification"]):
            config = {"model_type": model_type, "architectures": architectures}
            assert ModelSpec.from_config(config).architecture == expected
        assert ModelSpec.from_config({"architectures": [expected]}).architecture == expected
    with pytest.raises(UnsupportedModelError) as excinfo:
        ModelSpec.from_config({"architectures": ["FalconForCausalLM"], "model_type": "falcon"})
    assert "FalconForCausalLM" in str(excinfo.value) and "'falcon'" in str(excinfo.value)
    with pytest.raises(UnsupportedModelError, match="None"):
        ModelSpec.from_config({})
    with pytest.raises(CheckpointError, match="MistralForCausalLM.*'llama'"):
        ModelSpec.from_config({"architectures": ["MistralForCausalLM"], "model_type": "llama"})


EOS_VALUES = {"absent": None, "int": 5, "list": [6, 5], "null": "null"}


@pytest.mark.parametrize("in_config", sorted(EOS_VALUES))
@pytest.mark.parametrize("in_generation", ["absent", "no_file", "int", "list", "null"])
def test_stop_ids_are_the_union_of_config_and_generation_config(tmp_path, in_config, in_generation):
    config = {"model_type": "llama", "vocab_size": 64}
    if in_config != "absent":
        config["eos_token_id"] = None if in_config == "null" else EOS_VALUES[in_config]
    (tmp_path / "config.json").write_text(json.dumps(config))
    if in_generation != "no_file":
        generation = {"bos_token_id": 1}
        if in_generation != "absent":
            generation["eos_token_id"] = {"int": 9, "list": [9, 6], "null": None}[in_generation]
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    expected = eos_tuple(AutoConfig.from_pretrained(tmp_path).eos_token_id)
    if in_generation != "no_file":
        expected += eos_tuple(GenerationConfig.from_pretrained(tmp_path).eos_token_id)
    assert ModelSpec.from_dir(tmp_path).eos_token_ids == tuple(dict.fromkeys(expected))


def test_generation_config_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (tmp_path / "generation_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        ModelSpec.from_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        ModelSpec.from_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, "2"]}))
    with pytest.raises(CheckpointError, match="generation_config.json.*eos_token_id"):
        ModelSpec.from_dir(tmp_path)


REFUSALS = [
    ({"model_type": "llama", "eos_token_id": "2"}, CheckpointError, ("eos_token_id", "'2'")),
    ({"model_type": "llama", "eos_token_id": [2, 1.5]}, CheckpointError, ("eos_token_id", "1.5")),
    ({"model_type": "llama", "eos_token_id": True}, CheckpointError, ("eos_token_id", "True")),
    ({"model_type": "llama", "hidden_size": "64"}, CheckpointError, ("hidden_size", "'64'")),
    ({"model_type": "llama", "num_hidden_layers": 0}, CheckpointError, ("num_hidden_layers", "0")),
    ({"model_type": "llama", "rms_norm_eps": None}, CheckpointError, ("rms_norm_eps", "None")),
    ({"model_type": "llama", "tie_word_embeddings": "yes"}, CheckpointError, ("tie_word_embeddings", "'yes'")),
    ({"model_type": "llama", "attention_bias": 1}, CheckpointError, ("attention_bias", "1")),
    ({"model_type": "llama", "hidden_size": 100}, CheckpointError, ("hidden_size", "100")),
    ({"model_type": "llama", "num_key_value_heads": 5}, CheckpointError, ("num_key_value_heads", "5")),
    ({"model_type": "llama", "hidden_act": "xielu"}, UnsupportedModelError, ("hidden_act", "'xielu'")),
    ({"model_type": "gpt2", "activation_function": "prelu"}, UnsupportedModelError, ("activation_function", "prelu")),
    ({"model_type": "gpt2", "n_embd": 100, "n_head": 12}, CheckpointError, ("n_embd", "100")),
    ({"model_type": "llama", "sliding_window": 16}, UnsupportedModelError, ("sliding_window", "16")),
    (
        {"model_type": "llama", "layer_types": ["sliding_attention"] * 32},
        UnsupportedModelError,
        ("layer_types", "sliding_attention"),
    ),
    ({"model_type": "mistral", "sliding_window": 0}, CheckpointError, ("sliding_window", "0")),
    (
        {"model_type": "mistral", "layer_types": ["full_attention"] * 32},
        UnsupportedModelError,
        ("layer_types", "sliding_window", "4096"),
    ),
    (
        {"model_type": "qwen2", "layer_types": ["sliding_attention"] * 32},
        CheckpointError,
        ("layer_types", "use_sliding_window", "False"),
    ),
    ({"model_type": "qwen2", "layer_types": ["full_attention"] * 3}, CheckpointError, ("layer_types", "32")),
    (
        {"model_type": "qwen2", "layer_types": ["chunked_attention"] * 32},
        UnsupportedModelError,
        ("layer_types", "chunked_attention"),
    ),
    ({"model_type": "qwen2", "rope_parameters": {"rope_type": "mrope"}}, UnsupportedModelError, ("rope_type", "mrope")),
    (
        {
            "model_type": "llama",
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
        },
        UnsupportedModelError,
        ("partial_rotary_factor", "0.5", "linear"),
    ),
    ({"model_type": "llama", "rope_scaling": {"type": "dynamic"}}, CheckpointError, ("factor", "dynamic")),
    (
        {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": "2"}},
        CheckpointError,
        ("factor", "'2'"),
    ),
    ({"model_type": "llama", "rope_theta": -1.0}, CheckpointError, ("rope_theta", "-1.0")),
    (
        {"model_type": "llama", "rope_parameters": {"full_attention": {"rope_type": "default"}}},
        UnsupportedModelError,
        ("rope_parameters", "full_attention"),
    ),
]


@pytest.mark.parametrize("config,error,words", REFUSALS, ids=lambda v: None)
def test_refusals_name_the_field_and_the_value(config, error, words):
    with pytest.raises(error) as excinfo:
        ModelSpec.from_config(config)
    for word in words:
        assert word in str(excinfo.value)


def test_every_activation_transformers_has_is_served_or_refused():
    from transformers.activations import ACT2CLS

    refused = set(ACT2CLS) - set(SUPPORTED_ACTIVATIONS)
    assert refused == {"prelu", "xielu"}  # activations with learned parameters
    assert set(SUPPORTED_ACTIVATIONS) <= set(ACT2CLS)


ROPE_CONTEXTS = {
    # name: (extra config, allowed context); max_position_embeddings is 4096 unless the case sets it
    "default": ({}, 4096),
    "linear": ({"rope_parameters": {"rope_type": "linear", "factor": 4.0}}, 16384),
    "dynamic": ({"rope_scaling": {"type": "dynamic", "factor": 2.5}}, 10240),
    "yarn_original_shorter": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}},
        8192,
    ),
    "yarn_max_longer": (
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024}},
        4096,
    ),
    "yarn_default_original": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, 16384),
    "longrope": (
        {
            "head_dim": 8,
            "rope_parameters": {
                "rope_type": "longrope",
                "short_factor": [1.0] * 4,
                "long_factor": [4.0] * 4,
                "original_max_position_embeddings": 1024,
            },
        },
        4096,
    ),
    "llama3": (
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            }
        },
        4096,
    ),
    "gpt2": ({"model_type": "gpt2", "n_positions": 4096}, 4096),
}


@pytest.mark.parametrize("name", sorted(ROPE_CONTEXTS))
def test_max_model_len_within_what_the_rope_scaling_allows(name):
    extra, allowed = ROPE_CONTEXTS[name]
    spec = ModelSpec.from_config({"model_type": "llama", "max_position_embeddings": 4096, **extra})
    assert resolve_max_model_len(spec, None) == resolve_max_model_len(spec, 0) == allowed
    assert resolve_max_model_len(spec, allowed) == allowed
    assert resolve_max_model_len(spec, 100) == 100
    with pytest.raises(InvalidRequestError) as excinfo:
        resolve_max_model_len(spec, allowed + 1)
    assert str(allowed + 1) in str(excinfo.value) and str(allowed) in str(excinfo.value)
    if spec.rope_parameters is not None:
        assert spec.rope_parameters["rope_type"] in str(excinfo.value)
    with pytest.raises(InvalidRequestError):
        resolve_max_model_len(spec, -1)


def test_deploy_plan_resolves_max_model_len(tmp_path):
    config = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    request = ev.DeployPipeline(cmd_id="c", pipeline_id="p", model_dir=str(tmp_path), num_stages=1)
    assert plan_pipeline(request).max_model_len == 256
    assert plan_pipeline(msgspec.structs.replace(request, max_model_len=200)).max_model_len == 200
    with pytest.raises(InvalidRequestError, match="257"):
        plan_pipeline(msgspec.structs.replace(request, max_model_len=257))

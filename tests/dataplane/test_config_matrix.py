"""A matrix of config.json variants per architecture: FlexPipe's logits against transformers' own forward.

Each variant is a tiny random checkpoint written by transformers' ``save_pretrained`` (then, for some, its
config.json edited the way real checkpoints differ); FlexPipe runs it as one in-process stage.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import SHAPE_KEYS, edit_config, write_checkpoint
from test_hf_equivalence import mixed_prompts, run_stages
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

from common.model.architectures import SUPPORTED_ACTIVATIONS
from common.model.spec import ModelSpec
from dataplane.models.layers import ACTIVATIONS

ROPE_THETA = 10000.0
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": ROPE_THETA,
    "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
    "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0],
    "original_max_position_embeddings": 16,
}

# name: (kind, write_checkpoint overrides, edit_config arguments); prompts reach 63 tokens.
VARIANTS = {
    "llama/no_architectures": ("llama", {}, {"drop": ("architectures",)}),
    "llama/minimal": ("llama", {}, {"keep": SHAPE_KEYS["llama"]}),
    "llama/tied": ("llama", {"tie_word_embeddings": True}, {}),
    "llama/biases": ("llama", {"attention_bias": True, "mlp_bias": True}, {}),
    "llama/head_dim": ("llama", {"head_dim": 32}, {}),
    "llama/mqa": ("llama", {"num_key_value_heads": 1}, {}),
    "llama/mha": ("llama", {"num_key_value_heads": 4, "hidden_act": "gelu_new", "rms_norm_eps": 1e-3}, {}),
    "llama/rope_linear_beyond_max": (
        "llama",
        {"max_position_embeddings": 24, "rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 5e4}},
        {},
    ),
    "llama/rope_dynamic_v4_keys": (
        "llama",
        {"max_position_embeddings": 24},
        {
            "drop": ("rope_parameters",),
            "rope_scaling": {"type": "dynamic", "factor": 3.0},
            "rope_theta": 20000.0,
        },
    ),
    "llama/partial_rotary_default_rope": ("llama", {}, {"partial_rotary_factor": 0.5}),
    "llama/rope_yarn_top_level_original": (
        "llama",
        {"max_position_embeddings": 32, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
        {"original_max_position_embeddings": 8},
    ),
    "mistral/no_architectures": ("mistral", {}, {"drop": ("architectures",)}),
    "mistral/minimal": ("mistral", {}, {"keep": SHAPE_KEYS["mistral"]}),
    "mistral/window": ("mistral", {"sliding_window": 6}, {}),
    "mistral/window_null": ("mistral", {"sliding_window": None}, {}),
    "mistral/head_dim_mqa": ("mistral", {"head_dim": 24, "num_key_value_heads": 1, "sliding_window": 9}, {}),
    "mistral/rope_yarn_beyond_max": (
        "mistral",
        {
            "max_position_embeddings": 32,
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": ROPE_THETA,
            },
        },
        {},
    ),
    "qwen2/no_architectures": ("qwen2", {}, {"drop": ("architectures",)}),
    "qwen2/minimal": ("qwen2", {"tie_word_embeddings": False}, {"keep": SHAPE_KEYS["qwen2"]}),
    "qwen2/untied": ("qwen2", {"tie_word_embeddings": False}, {}),
    "qwen2/window_above_max_window_layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
        {},
    ),
    "qwen2/window_off": ("qwen2", {"use_sliding_window": False, "sliding_window": 6}, {}),
    "qwen2/layer_types": (
        "qwen2",
        {},
        {
            "use_sliding_window": True,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
    "qwen2/head_dim": ("qwen2", {"head_dim": 32}, {}),
    "qwen2/rope_longrope": ("qwen2", {"max_position_embeddings": 64, "rope_parameters": LONGROPE}, {}),
    "gpt2/no_architectures": ("gpt2", {}, {"drop": ("architectures",)}),
    "gpt2/minimal": ("gpt2", {"n_positions": 1024}, {"keep": SHAPE_KEYS["gpt2"]}),
    "gpt2/untied": ("gpt2", {"tie_word_embeddings": False}, {}),
    "gpt2/unscaled": ("gpt2", {"scale_attn_weights": False}, {}),
    "gpt2/inverse_layer_idx_upcast": (
        "gpt2",
        {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
        {},
    ),
    "gpt2/n_inner_relu": ("gpt2", {"n_inner": 100, "activation_function": "relu"}, {}),
    "gpt2/quick_gelu": ("gpt2", {"activation_function": "quick_gelu"}, {}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and does not stall when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def variant_checkpoint(path, kind, overrides, edits):
    model_dir = write_checkpoint(kind, path, **overrides)
    if edits:
        edit_config(model_dir, **edits)
    return model_dir


def transformers_logits(model, prompt: list[int], next_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last-token logits of ``prompt`` and of one decode step of ``next_token`` over transformers' cache,
    as ``generate`` runs a sequence alone."""
    with torch.no_grad():
        prefill = model(torch.tensor([prompt]), use_cache=True)
        step = model(torch.tensor([[next_token]]), cache=prefill.cache, use_cache=True)
    return prefill.logits[0, -1], step.logits[0, -1]


def assert_matches(model_dir, prompts, atol=1e-4):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefill, next_tokens, decode = run_stages(model_dir, [8], prompts)
    for i, prompt in enumerate(prompts):
        ref_prefill, ref_decode = transformers_logits(model, prompt, next_tokens[i])
        torch.testing.assert_close(prefill[i], ref_prefill, atol=atol, rtol=0, msg=f"prefill of prompt {i}")
        assert next_tokens[i] == int(ref_prefill.argmax())
        torch.testing.assert_close(decode[i], ref_decode, atol=atol, rtol=0, msg=f"decode of prompt {i}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_transformers(tmp_path, name):
    kind, overrides, edits = VARIANTS[name]
    model_dir = variant_checkpoint(tmp_path, kind, overrides, edits)
    prompts = mixed_prompts(4, seed=3) + [list(range(3, 63))]
    assert_matches(model_dir, prompts)


def test_window_shorter_than_the_prompt_changes_the_output(tmp_path):
    """The sliding-window variants above are not full attention in disguise."""
    window = variant_checkpoint(tmp_path / "w", "mistral", {"sliding_window": 6, "seed": 5}, {})
    full = variant_checkpoint(tmp_path / "f", "mistral", {"sliding_window": None, "seed": 5}, {})
    prompt = [list(range(5, 45))]
    assert not torch.allclose(run_stages(window, [8], prompt)[0], run_stages(full, [8], prompt)[0], atol=1e-4)
    assert ModelSpec.from_dir(window).sliding_windows == (6, 6, 6)
    qwen = variant_checkpoint(
        tmp_path / "q", "qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, {}
    )
    assert ModelSpec.from_dir(qwen).sliding_windows == (None, 6, 6)


SEQ_LEN_DEPENDENT = {
    "dynamic": {"max_position_embeddings": 24, "rope_parameters": {"rope_type": "dynamic", "factor": 3.0}},
    "longrope": {"max_position_embeddings": 64, "rope_parameters": LONGROPE},
}


@pytest.mark.parametrize("rope", sorted(SEQ_LEN_DEPENDENT))
def test_sequence_output_does_not_depend_on_its_batch(tmp_path, rope):
    """A long sequence (beyond the rescaling threshold) and a short one batched together give what each gives
    alone, which is what transformers gives for each alone."""
    model_dir = variant_checkpoint(tmp_path, "llama", SEQ_LEN_DEPENDENT[rope], {})
    long, short = list(range(7, 57)), [11, 12, 13, 14, 15]
    together = run_stages(model_dir, [8], [long, short])
    for index, prompt in ((0, long), (1, short)):
        alone = run_stages(model_dir, [8], [prompt])
        torch.testing.assert_close(together[0][index], alone[0][0], atol=1e-5, rtol=0)
        assert together[1][index] == alone[1][0]
        torch.testing.assert_close(together[2][index], alone[2][0], atol=1e-5, rtol=0)
    assert_matches(model_dir, [long, short])


def test_activations_compute_what_transformers_computes():
    x = torch.linspace(-12, 12, 2001)
    for name in SUPPORTED_ACTIVATIONS:
        torch.testing.assert_close(ACTIVATIONS[name](x), ACT2FN[name](x), atol=1e-6, rtol=1e-6, msg=name)

"""RopeSpec against transformers' own RoPE code, which serves as the independent reference."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from common.errors import CheckpointError, UnsupportedModelError
from dataplane.models.rope import (
    SUPPORTED_ROPE_TYPES,
    RopeSpec,
    apply_rotary,
    apply_rotary_interleaved,
    interleave_rotary_rows,
    rotation,
)

HEAD_DIM = 16
ATOL = 1e-6

SHORT_FACTOR = [1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.8]
LONG_FACTOR = [1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 9.0, 12.0]

# name: (rope_parameters, max_position_embeddings, largest position in the batch)
CASES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 64, 50),
    "linear": ({"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}, 64, 50),
    "dynamic_short": ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 64, 40),
    "dynamic_at_limit": ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 64, 63),
    "dynamic_long": ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, 64, 200),
    "yarn_minimal": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
        128,
        100,
    ),
    "yarn_full": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 16,
            "beta_slow": 2,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "truncate": False,
            "rope_theta": 50000.0,
        },
        128,
        120,
    ),
    "yarn_attention_factor": (
        {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8, "rope_theta": 10000.0},
        128,
        100,
    ),
    "yarn_partial": (
        {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
        128,
        100,
    ),
    "longrope_short": (
        {
            "rope_type": "longrope",
            "short_factor": SHORT_FACTOR,
            "long_factor": LONG_FACTOR,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
        },
        128,
        20,
    ),
    "longrope_long": (
        {
            "rope_type": "longrope",
            "short_factor": SHORT_FACTOR,
            "long_factor": LONG_FACTOR,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
        },
        128,
        100,
    ),
    "longrope_factor_attention": (
        {
            "rope_type": "longrope",
            "short_factor": SHORT_FACTOR,
            "long_factor": LONG_FACTOR,
            "factor": 2.0,
            "attention_factor": 1.1,
            "original_max_position_embeddings": 32,
            "rope_theta": 10000.0,
        },
        128,
        100,
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,  # puts one frequency in the smoothed band
            "rope_theta": 500000.0,
        },
        256,
        200,
    ),
    # positions beyond max_position_embeddings, up to the context resolve_max_model_len allows
    "default_beyond": ({"rope_type": "default", "rope_theta": 10000.0}, 64, 150),
    "linear_beyond": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 64, 255),
    "dynamic_far_beyond": ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, 64, 127),
    "yarn_beyond": (
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
        64,
        255,
    ),
}


def llama_config(rope_parameters=None, max_position_embeddings=64, **kwargs):
    return LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=copy.deepcopy(rope_parameters),
        **kwargs,
    )


def flat_positions(largest):
    """A flat batch of three sequences: a short prefill, a decode token, and a prefill ending at `largest`."""
    return torch.cat([torch.arange(0, 7), torch.tensor([largest // 2]), torch.arange(largest - 9, largest + 1)])


def reference_inv_freq(config, seq_len=None):
    """inv_freq and attention scaling as the Llama rotary embedding and `dynamic_rope_update` obtain them."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    if seq_len is not None:
        seq_len = torch.tensor(seq_len, dtype=torch.int64)  # dynamic_rope_update passes max(position_ids) + 1
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


def reference_cos_sin(config, positions, dtype=torch.float32, rotary_cls=LlamaRotaryEmbedding):
    rotary = rotary_cls(config)  # fresh: the transformers module keeps state between calls
    cos, sin = rotary(torch.zeros(1, dtype=dtype), positions[None, :])
    return cos[0], sin[0]


def assert_matches_transformers(spec, config, largest, rotary_cls=LlamaRotaryEmbedding):
    seq_len = largest + 1
    if config.rope_parameters["rope_type"] == "longrope":
        original = config.rope_parameters["original_max_position_embeddings"]
        ref_seq_len = original + 1 if seq_len > original else None  # as longrope_frequency_update chooses
    elif config.rope_parameters["rope_type"] == "dynamic":
        ref_seq_len = seq_len if seq_len > config.max_position_embeddings else None  # as dynamic_frequency_update
    else:
        ref_seq_len = None
    ref_inv_freq, ref_scaling = reference_inv_freq(config, ref_seq_len)
    inv_freq, scaling = spec.inv_freq_and_scaling(seq_len)
    assert inv_freq.dtype == torch.float32
    assert inv_freq.shape == (spec.rotary_dim // 2,) == ref_inv_freq.shape
    torch.testing.assert_close(inv_freq, ref_inv_freq, atol=ATOL, rtol=0)
    assert scaling == pytest.approx(ref_scaling, abs=1e-12)

    positions = flat_positions(largest)
    ref_cos, ref_sin = reference_cos_sin(config, positions, rotary_cls=rotary_cls)
    cos, sin = spec.cos_sin(positions, torch.float32)
    assert cos.shape == sin.shape == (positions.numel(), spec.rotary_dim)
    torch.testing.assert_close(cos, ref_cos, atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_v5_config_matches_transformers(name):
    rope_parameters, max_pos, largest = CASES[name]
    config = llama_config(rope_parameters, max_pos)
    spec = RopeSpec.from_hf_config(config.to_dict(), HEAD_DIM)
    assert spec.rope_type == rope_parameters["rope_type"]
    assert spec.rotary_dim == int(HEAD_DIM * rope_parameters.get("partial_rotary_factor", 1.0))
    assert spec.max_position_embeddings == max_pos
    assert_matches_transformers(spec, config, largest)


def sequence_batch(context_lens, q_lens):
    """Flat positions of sequences laid out as BatchInput lays them out, with each sequence's slice."""
    context_lens, q_lens = np.array(context_lens), np.array(q_lens)
    pieces = [torch.arange(c - q, c) for c, q in zip(context_lens, q_lens)]
    bounds = np.cumsum([0, *q_lens])
    return torch.cat(pieces), context_lens, q_lens, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("name", ["dynamic_long", "longrope_long"])
def test_tables_are_chosen_per_sequence(name):
    """Each sequence of a flat batch gets the table transformers computes when it runs alone (seq_len = its
    context length), whatever it is batched with."""
    rope_parameters, max_pos, _ = CASES[name]
    config = llama_config(rope_parameters, max_pos)
    spec = RopeSpec.from_hf_config(config.to_dict(), HEAD_DIM)
    # prefills and decodes on both sides of the threshold (64 for dynamic, 32 for longrope)
    positions, context_lens, q_lens, slices = sequence_batch([200, 7, 64, 33, 32, 150, 90], [9, 7, 1, 1, 5, 1, 90])
    cos, sin = spec.cos_sin(positions, torch.float32, context_lens, q_lens)
    for rows in slices:
        ref_cos, ref_sin = reference_cos_sin(config, torch.arange(0, int(positions[rows][-1]) + 1))
        torch.testing.assert_close(cos[rows], ref_cos[positions[rows]], atol=ATOL, rtol=0)
        torch.testing.assert_close(sin[rows], ref_sin[positions[rows]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["dynamic_short", "longrope_short", "longrope_long", "llama3", "default"])
def test_one_table_when_every_sequence_shares_it(name):
    rope_parameters, max_pos, _ = CASES[name]
    spec = RopeSpec.from_hf_config(llama_config(rope_parameters, max_pos).to_dict(), HEAD_DIM)
    contexts = [40, 50, 60] if name != "longrope_long" else [40, 50, 100]
    positions, context_lens, q_lens, _ = sequence_batch(contexts, [3, 1, 20])
    per_sequence = spec.cos_sin(positions, torch.float32, context_lens, q_lens)
    whole_batch = spec.cos_sin(positions, torch.float32)
    for got, expected in zip(per_sequence, whole_batch):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_dynamic_recomputes_only_beyond_max_position_embeddings():
    spec = RopeSpec.from_hf_config(llama_config(*CASES["dynamic_long"][:2]).to_dict(), HEAD_DIM)
    default, _ = spec.inv_freq_and_scaling(None)
    torch.testing.assert_close(spec.inv_freq_and_scaling(64)[0], default, atol=0, rtol=0)
    assert not torch.allclose(spec.inv_freq_and_scaling(65)[0], default)


def test_longrope_switches_factor_at_original_max():
    spec = RopeSpec.from_hf_config(llama_config(*CASES["longrope_long"][:2]).to_dict(), HEAD_DIM)
    short, _ = spec.inv_freq_and_scaling(32)
    long, _ = spec.inv_freq_and_scaling(33)
    torch.testing.assert_close(short * torch.tensor(SHORT_FACTOR), long * torch.tensor(LONG_FACTOR))
    assert not torch.allclose(short, long)


V4_CASES = {
    "no_scaling": ({"rope_theta": 1234.0, "rope_scaling": None}, 64, 50),
    "linear_type_key": ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 3.0}}, 64, 50),
    "dynamic_type_key": ({"rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, 64, 150),
    "yarn": (
        {
            "rope_theta": 1000000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        },
        128,
        100,
    ),
    "llama3": (
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
        256,
        200,
    ),
}


@pytest.mark.parametrize("name", sorted(V4_CASES))
def test_v4_config_matches_transformers(name):
    v4_keys, max_pos, largest = V4_CASES[name]
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": max_pos,
        **v4_keys,
    }
    config = LlamaConfig.from_dict(copy.deepcopy(raw))  # transformers converts the v4 keys, in place
    spec = RopeSpec.from_hf_config(raw, HEAD_DIM)
    assert spec.rope_type == config.rope_parameters["rope_type"]
    assert spec.theta == config.rope_parameters["rope_theta"]
    assert spec == RopeSpec.from_hf_config(config.to_dict(), HEAD_DIM)
    assert_matches_transformers(spec, config, largest)


def test_phi3_top_level_original_max_position_embeddings():
    """Phi-3 keeps original_max_position_embeddings at the top level of config.json and sets no factor."""
    raw = {
        "architectures": ["Phi3ForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "original_max_position_embeddings": 32,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": SHORT_FACTOR, "long_factor": LONG_FACTOR},
        "pad_token_id": None,
        "eos_token_id": None,
        "bos_token_id": None,
    }
    config = Phi3Config.from_dict(copy.deepcopy(raw))  # transformers edits the dict in place
    spec = RopeSpec.from_hf_config(raw, HEAD_DIM)
    assert dict(spec.params)["original_max_position_embeddings"] == 32
    for largest in (20, 100):
        assert_matches_transformers(spec, config, largest, rotary_cls=Phi3RotaryEmbedding)


def test_partial_rotary_default_matches_gpt_neox():
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config = GPTNeoXConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_parameters=rope_parameters
    )
    spec = RopeSpec.from_hf_config(config.to_dict(), HEAD_DIM)
    assert spec.rotary_dim == 8
    positions = flat_positions(50)
    ref_cos, ref_sin = GPTNeoXRotaryEmbedding(config)(torch.zeros(1), positions[None, :])
    cos, sin = spec.cos_sin(positions, torch.float32)
    torch.testing.assert_close(cos, ref_cos[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(sin, ref_sin[0], atol=ATOL, rtol=0)

    q, k = torch.randn(positions.numel(), 4, 16), torch.randn(positions.numel(), 2, 16)
    ref_q, ref_k = neox_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q, atol=ATOL, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k, atol=ATOL, rtol=0)
    torch.testing.assert_close(apply_rotary(q, cos, sin)[..., 8:], q[..., 8:], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_transformers(dtype):
    config = llama_config(*CASES["llama3"][:2])
    spec = RopeSpec.from_hf_config(config.to_dict(), HEAD_DIM)
    positions = flat_positions(200)
    cos, sin = spec.cos_sin(positions, dtype)
    ref_cos, ref_sin = reference_cos_sin(config, positions, dtype)
    assert cos.dtype == sin.dtype == dtype
    torch.testing.assert_close(cos, ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=0, rtol=0)

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(positions.numel(), 4, HEAD_DIM, generator=generator).to(dtype)
    k = torch.randn(positions.numel(), 2, HEAD_DIM, generator=generator).to(dtype)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q, atol=ATOL, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, HEAD_DIM // 2])
def test_interleaved_rotary_is_the_same_rotation_in_another_order(rotary_dim):
    """Projections with interleaved rows, rotated pairwise, give transformers' q and k in that order,
    so q.k (all attention reads) is unchanged."""
    config = llama_config(*CASES["llama3"][:2])
    spec = RopeSpec.from_hf_config(config.to_dict(), HEAD_DIM)
    spec = RopeSpec(spec.rope_type, spec.theta, rotary_dim, spec.max_position_embeddings, spec.params)
    positions = flat_positions(60)
    cos, sin = spec.cos_sin(positions, torch.float32)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(positions.numel(), 32, generator=generator)
    w_q = torch.randn(4 * HEAD_DIM, 32, generator=generator)
    w_k = torch.randn(2 * HEAD_DIM, 32, generator=generator)
    q, k = (x @ w_q.T).view(-1, 4, HEAD_DIM), (x @ w_k.T).view(-1, 2, HEAD_DIM)
    ref_q, ref_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    q_i = (x @ interleave_rotary_rows(w_q, 4, HEAD_DIM, rotary_dim).T).view(-1, 4, HEAD_DIM)
    k_i = (x @ interleave_rotary_rows(w_k, 2, HEAD_DIM, rotary_dim).T).view(-1, 2, HEAD_DIM)
    table = rotation(cos, sin)
    got_q, got_k = apply_rotary_interleaved(q_i, table), apply_rotary_interleaved(k_i, table)
    half = rotary_dim // 2
    order = torch.cat(
        (
            torch.stack((torch.arange(half), torch.arange(half) + half), 1).reshape(-1),
            torch.arange(rotary_dim, HEAD_DIM),
        )
    )
    torch.testing.assert_close(got_q, ref_q[..., order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, ref_k[..., order], atol=1e-5, rtol=1e-5)
    scores = torch.einsum("thd,tgd->thg", got_q, got_k)
    torch.testing.assert_close(scores, torch.einsum("thd,tgd->thg", ref_q, ref_k), atol=1e-4, rtol=1e-5)


def test_unknown_rope_type_names_the_supported_ones():
    raw = llama_config().to_dict()
    raw["rope_parameters"] = {"rope_type": "mrope", "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError) as excinfo:
        RopeSpec.from_hf_config(raw, HEAD_DIM)
    for rope_type in SUPPORTED_ROPE_TYPES:
        assert rope_type in str(excinfo.value)
    with pytest.raises(UnsupportedModelError):
        RopeSpec("mrope", 10000.0, HEAD_DIM, 64)


def test_missing_required_parameter_is_a_checkpoint_error():
    raw = llama_config().to_dict()
    raw["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}
    with pytest.raises(CheckpointError, match="low_freq_factor"):
        RopeSpec.from_hf_config(raw, HEAD_DIM)


def test_spec_is_hashable_with_resolved_defaults():
    spec = RopeSpec.from_hf_config(llama_config(*CASES["longrope_long"][:2]).to_dict(), HEAD_DIM)
    params = dict(spec.params)
    assert params["short_factor"] == tuple(SHORT_FACTOR)
    assert params["original_max_position_embeddings"] == 32
    assert [name for name, _ in spec.params] == sorted(params)
    assert hash(spec) == hash(RopeSpec.from_hf_config(llama_config(*CASES["longrope_long"][:2]).to_dict(), HEAD_DIM))

    yarn = dict(RopeSpec.from_hf_config(llama_config(*CASES["yarn_minimal"][:2]).to_dict(), HEAD_DIM).params)
    assert (yarn["beta_fast"], yarn["beta_slow"], yarn["truncate"]) == (32.0, 1.0, True)


def test_module_does_not_import_transformers():
    code = "import sys, dataplane.models.rope; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

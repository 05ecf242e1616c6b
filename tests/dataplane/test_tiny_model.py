"""Tests for the embedded tiny model and the tiny test-checkpoint builders."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from checkpoints import KINDS, write_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dataplane.models.tiny import BOS_ID, EOS_ID, MODEL_NAME, PAD_ID, VOCAB_SIZE, ensure_tiny_model

TEXTS = ["Hello, world!", "  two leading spaces\n\ttab", "héllo wörld — 世界 🚀", "", "a . b , c 's \x00\x7f"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


def test_location_and_env_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXPIPE_CACHE_DIR", str(tmp_path))
    path = ensure_tiny_model()
    assert path == tmp_path / "models" / MODEL_NAME
    assert not [p for p in path.parent.iterdir() if p.name != MODEL_NAME]


def test_loads_with_auto_classes(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == VOCAB_SIZE and cfg.num_hidden_layers == 4
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 4, 2)
    assert not cfg.tie_word_embeddings and model.dtype == torch.float32
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    ids = torch.tensor([tok("Hello")["input_ids"]])
    logits = model(ids).logits
    assert logits.shape == (1, 5, VOCAB_SIZE) and torch.isfinite(logits).all()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tiny_path, text):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_deterministic_across_cache_dirs(tiny_path, tmp_path):
    other = ensure_tiny_model(tmp_path)
    a, b = load_file(tiny_path / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tiny_path / name).read_bytes() == (other / name).read_bytes()
    norm = a["model.norm.weight"]
    assert not torch.allclose(norm, torch.ones_like(norm))


def test_idempotent(tmp_path):
    path = ensure_tiny_model(tmp_path)
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert ensure_tiny_model(tmp_path) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes


def test_concurrent_writers(tmp_path):
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_tiny_model(tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == [MODEL_NAME]
    AutoModelForCausalLM.from_pretrained(results[0])


@pytest.mark.parametrize("kind", KINDS)
def test_write_checkpoint_kinds(kind, tmp_path):
    path = write_checkpoint(kind, tmp_path / kind)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size == VOCAB_SIZE and model.dtype == torch.float32
    assert model.config.tie_word_embeddings == (kind in ("qwen2", "gpt2"))
    prompts = ["Hello world", "The quick brown fox", "1234567"]
    continuations = set()
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], VOCAB_SIZE) and torch.isfinite(logits).all()
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD_ID)
        continuations.add(tuple(out[0, ids.shape[1] :].tolist()))
    assert len(continuations) > 1


def test_write_checkpoint_seeded(tmp_path):
    a = load_file(write_checkpoint("llama", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(write_checkpoint("llama", tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(write_checkpoint("llama", tmp_path / "c", seed=4) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_write_checkpoint_overrides(tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    path = write_checkpoint(
        "llama", tmp_path / "o", rope_parameters=rope, attention_bias=True, tie_word_embeddings=True
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.model.layers[0].self_attn.q_proj.bias is not None and model.config.tie_word_embeddings


def test_write_checkpoint_sharded(tmp_path):
    path = write_checkpoint("mistral", tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((path / s).is_file() for s in shards)
    assert not (path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(write_checkpoint("mistral", tmp_path / "single"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError):
        write_checkpoint("bert", tmp_path)

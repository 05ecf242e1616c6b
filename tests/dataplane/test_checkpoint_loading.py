"""Checkpoint reading: sharded files, tied weights, and stages that read only their own tensors."""

from __future__ import annotations

import pytest
import torch
from checkpoints import rewrite_tensors
from test_hf_equivalence import mixed_prompts, run_stages
from transformers import AutoModelForCausalLM

from common.errors import CheckpointError
from common.model.spec import ModelSpec
from common.model.units import Layout, unit_names
from dataplane import LLM, SamplingParams
from dataplane.models import adapter_for
from dataplane.models.checkpoint import CheckpointReader
from dataplane.stage.executor import StageExecutor, StageSpec


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_each_stage_reads_exactly_its_units_tensors(checkpoint, kind):
    model_dir = checkpoint(kind, max_shard_size="20KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    reader = CheckpointReader(model_dir)
    spec = ModelSpec.from_dir(model_dir)
    adapter = adapter_for(spec, set(reader.weight_map))
    names = unit_names(spec.num_layers)
    layout = Layout.from_sizes([2, 3, 3], len(names))
    seen = set()
    for stage in range(layout.num_stages):
        units = layout.stage_units(stage, names)
        executor = StageExecutor(StageSpec(str(model_dir), tuple(units), 4, 16))
        expected = {n for u in units for n in adapter.tensor_names(u)}
        assert set(executor.tensors_read) == expected
        assert len(executor.tensors_read) == len(expected)
        seen |= expected
    assert seen == set(reader.weight_map)
    if spec.tie_word_embeddings:
        first = set(adapter.tensor_names("embed"))
        last = set(adapter.tensor_names("head"))
        assert first & last, "a tied embedding is loaded by both the first and the last stage"


def test_sharded_checkpoint_serves_the_same_tokens(checkpoint):
    prompts = [[1, 2, 3, 4], [9] * 17]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with LLM(checkpoint("qwen2"), num_stages=2) as whole:
        expected = [o.token_ids for o in whole.generate(prompts, params)]
    with LLM(checkpoint("qwen2", max_shard_size="20KB"), num_stages=2) as sharded:
        assert [o.token_ids for o in sharded.generate(prompts, params)] == expected


def assert_logits_match_transformers(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = mixed_prompts(3, seed=2)
    prefill, _, _ = run_stages(model_dir, [8], prompts)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            torch.testing.assert_close(prefill[i], model(torch.tensor([prompt])).logits[0, -1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,head", [("qwen2", "lm_head.weight"), ("gpt2", "lm_head.weight")])
def test_a_tied_checkpoint_that_holds_its_own_head_serves_it(tmp_path, checkpoint, kind, head):
    """transformers does not tie an lm_head.weight that differs from the embedding; neither does FlexPipe."""
    source = checkpoint(kind)
    assert ModelSpec.from_dir(source).tie_word_embeddings

    def add_head(tensors):
        embedding = next(t for name, t in tensors.items() if name.endswith(("embed_tokens.weight", "wte.weight")))
        return {**tensors, head: torch.randn_like(embedding) * 0.05}

    assert_logits_match_transformers(rewrite_tensors(source, tmp_path / "own_head", add_head))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_an_untied_checkpoint_without_its_head_is_refused(tmp_path, checkpoint, kind):
    source = checkpoint(kind, tie_word_embeddings=False)
    target = rewrite_tensors(
        source, tmp_path / "headless", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"}
    )
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        StageExecutor(StageSpec(str(target), ("L2.mlp", "head"), 4, 16))


def test_biases_come_from_the_config_not_from_the_checkpoint(tmp_path, checkpoint):
    """MistralAttention has no biases: transformers ignores bias tensors a checkpoint carries, and so does
    FlexPipe; a bias the config asks for and the checkpoint lacks is refused."""

    def add_biases(tensors):
        extra = {
            name.replace(".weight", ".bias"): torch.randn(t.shape[0]) * 0.5
            for name, t in tensors.items()
            if name.endswith("_proj.weight")
        }
        return {**tensors, **extra}

    padded = rewrite_tensors(checkpoint("mistral"), tmp_path / "biased", add_biases)
    executor = StageExecutor(StageSpec(str(padded), tuple(unit_names(3)), 4, 16))
    assert not any(name.endswith(".bias") for name in executor.tensors_read)
    assert_logits_match_transformers(padded)

    source = checkpoint("llama", attention_bias=True)
    target = rewrite_tensors(
        source, tmp_path / "unbiased", lambda t: {k: v for k, v in t.items() if not k.endswith("o_proj.bias")}
    )
    with pytest.raises(CheckpointError, match="o_proj.bias"):
        StageExecutor(StageSpec(str(target), ("L0.attn",), 4, 16))

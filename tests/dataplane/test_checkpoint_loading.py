"""Checkpoint reading: sharded files, tied weights, and stages that read only their own tensors."""

from __future__ import annotations

import pytest

from common.model.spec import ModelSpec, read_config
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
    spec = ModelSpec.from_config(read_config(model_dir))
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

"""Moving built units between workers: tensors out, a meta-device skeleton filled back in; the LRU parameter cache."""

import pytest
import torch

from common.errors import TransportError
from common.model.spec import ModelSpec, read_config
from dataplane.models import adapter_for
from dataplane.models.attention import new_kv_pool
from dataplane.models.batch import BatchInput
from dataplane.models.checkpoint import CheckpointReader
from dataplane.stage.param_cache import ParamCache
from dataplane.stage.unit_state import fill, skeleton, unit_bytes, unit_tensors, with_pool


@pytest.fixture(scope="module")
def parts(checkpoint):
    model_dir = checkpoint("qwen2")
    spec = ModelSpec.from_config(read_config(model_dir))
    reader = CheckpointReader(model_dir)
    return spec, reader, adapter_for(spec, set(reader.weight_map))


def built(parts, unit, pool=None):
    spec, reader, adapter = parts
    return adapter.build(unit, reader.read(adapter.tensor_names(unit), torch.float32), pool)


@pytest.mark.parametrize("unit", ["embed", "L0.attn", "L1.mlp", "head"])
def test_a_unit_rebuilt_from_its_tensors_computes_the_same(parts, unit):
    spec, reader, adapter = parts
    pool = (
        new_kv_pool(4, 16, spec.num_kv_heads, spec.head_dim, torch.float32, "cpu") if unit.endswith(".attn") else None
    )
    original = built(parts, unit, pool)
    copy = skeleton(adapter, unit, {n: reader.shape(n) for n in adapter.tensor_names(unit)}, torch.float32)
    assert all(t.is_meta for t in unit_tensors(copy).values())
    fill(copy, {k: v.clone() for k, v in unit_tensors(original).items()})
    copy = with_pool(copy, pool.clone() if pool is not None else None)
    batch = BatchInput.build([[5, 6, 7]], [0], [[0]], 16, "cpu")
    hidden = None if unit == "embed" else torch.randn(3, spec.hidden_size)
    torch.testing.assert_close(copy.forward(hidden, batch), original.forward(hidden, batch))


def test_filling_with_missing_or_misshapen_tensors_is_refused(parts):
    spec, reader, adapter = parts
    names = adapter.tensor_names("L0.mlp")
    tensors = unit_tensors(built(parts, "L0.mlp"))
    empty = lambda: skeleton(adapter, "L0.mlp", {n: reader.shape(n) for n in names}, torch.float32)  # noqa: E731
    with pytest.raises(TransportError, match="the unit needs"):
        fill(empty(), {k: v for k, v in tensors.items() if k != "norm"})
    with pytest.raises(TransportError, match="has shape"):
        fill(empty(), dict(tensors, norm=torch.zeros(3)))


def test_the_parameter_cache_keeps_the_most_recent_units_within_its_budget(parts):
    units = {name: built(parts, name) for name in ("L0.mlp", "L1.mlp", "L2.mlp")}
    size = unit_bytes(units["L0.mlp"])
    cache = ParamCache(2 * size)
    assert cache.put("L0.mlp", units["L0.mlp"]) and cache.put("L1.mlp", units["L1.mlp"])
    assert cache.get("L0.mlp") is not None  # L0 is now the most recently used
    assert cache.put("L2.mlp", units["L2.mlp"])
    assert cache.names() == ["L0.mlp", "L2.mlp"] and cache.used_bytes == 2 * size
    assert not ParamCache(size - 1).put("L0.mlp", units["L0.mlp"])
    attn = built(parts, "L0.attn", pool=torch.zeros(1))
    cache.put("L0.attn", attn)
    assert cache.get("L0.attn").kv_pool is None and attn.kv_pool is not None

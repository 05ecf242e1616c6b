"""Unit names and layouts."""

import pytest

from common.errors import PartitionError
from common.model.units import Layout, is_layer_boundary, unit_layer, unit_names


def test_unit_names_and_layers():
    names = unit_names(2)
    assert names == ["embed", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp", "head"]
    assert [unit_layer(n) for n in names] == [None, 0, 0, 1, 1, None]
    assert [is_layer_boundary(names, i) for i in range(1, 6)] == [True, False, True, False, True]


def test_layouts_from_counts_and_name_ranges_agree():
    names = unit_names(2)
    by_count = Layout.from_spec([2, 3, 1], names)
    by_name = Layout.from_spec([("embed", "L0.attn"), "L0.mlp..L1.mlp", ("head", "head")], names)
    assert by_count == by_name
    assert by_count.describe(names) == ["embed..L0.attn", "L0.mlp..L1.mlp", "head..head"]


@pytest.mark.parametrize("spec", [[2, 3], [3, 0, 3], [7], [("embed", "L5.attn")]])
def test_bad_layouts_are_refused(spec):
    with pytest.raises(PartitionError):
        Layout.from_spec(spec, unit_names(2))

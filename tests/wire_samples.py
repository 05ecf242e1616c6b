"""Sample control-bus events and hypothesis strategies for hostile messages, shared by wire and bus tests."""

import msgpack
import msgspec
from hypothesis import strategies as st

from common import events as ev
from common.wire import encode


def sample_value(info: msgspec.inspect.Type, depth: int = 0):
    """A deterministic, non-default value of a msgspec type (nested structs included)."""
    kind = type(info)
    if kind is msgspec.inspect.IntType:
        return 7
    if kind is msgspec.inspect.FloatType:
        return 1.5
    if kind is msgspec.inspect.BoolType:
        return True
    if kind is msgspec.inspect.StrType:
        return "x" * (depth + 1)
    if kind is msgspec.inspect.BytesType:
        return bytes(range(8 * (depth + 1)))
    if kind is msgspec.inspect.ListType:
        return [sample_value(info.item_type, depth + 1)]
    if kind is msgspec.inspect.DictType:
        return {sample_value(info.key_type, depth + 1): sample_value(info.value_type, depth + 1)}
    if kind is msgspec.inspect.UnionType:
        return sample_value(next(t for t in info.types if type(t) is not msgspec.inspect.NoneType), depth)
    if kind is msgspec.inspect.StructType:
        return sample_struct(info.cls, depth + 1)
    raise AssertionError(f"no sample for {info}")


def sample_struct(cls, depth: int = 0):
    info = msgspec.inspect.type_info(cls)
    values = {f.name: sample_value(f.type, depth) for f in info.fields if f.name != "v"}
    return cls(**values)


EVENTS = [sample_struct(cls) for cls in ev.CATALOGUE.values()]


msgpack_ints = st.integers(-(2**63), 2**64 - 1)
scalars = (
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.lists(msgpack_ints, max_size=3)
    | st.dictionaries(st.text(max_size=4), msgpack_ints, max_size=2)
)
event_like = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(ev.CATALOGUE)) | scalars},
    optional={
        key: scalars
        for key in (
            "v",
            "sender",
            "cmd_id",
            "reply_to",
            "pipeline_id",
            "worker_id",
            "device",
            "stages",
            "seq",
            "token_ids",
        )
    },
)
VALID = [encode(event) for event in EVENTS]


@st.composite
def mutated(draw) -> bytes:
    """A valid event with a byte flipped, bytes cut off, or junk appended."""
    data = bytearray(draw(st.sampled_from(VALID)))
    position = draw(st.integers(0, len(data) - 1))
    how = draw(st.sampled_from(["flip", "cut", "append"]))
    if how == "flip":
        data[position] = draw(st.integers(0, 255))
    elif how == "cut":
        del data[position:]
    else:
        data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


hostile = (
    st.binary(max_size=64)
    | mutated()
    | scalars.map(lambda v: msgpack.packb(v, use_bin_type=True))
    | event_like.map(lambda d: msgpack.packb(d, use_bin_type=True))
)

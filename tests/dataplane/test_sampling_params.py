"""Sampling parameters, prompts and the sampler as a caller sees them: typed, validated once, per row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import InvalidRequestError
from dataplane.engine.requests import normalize_prompts, token_ids
from dataplane.engine.sampling_params import SamplingParams
from dataplane.stage.sampler import sample
from dataplane.transport.messages import SamplingOptions

INT_FIELDS = {"max_tokens": 1, "top_k": -1, "seed": 0, "logprobs": 0}
FLOAT_FIELDS = {"temperature": (0.0, 1e4), "top_p": (1e-9, 1.0)}

any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.integers(-3, 400), max_size=3),
    st.integers(-5, 50).map(np.int64),
    st.floats(-2, 3, width=32).map(np.float32),
    st.just(np.bool_(True)),
)


def plain(value):
    return value.item() if isinstance(value, np.generic) else value


def acceptable(name: str, value) -> bool:
    """The rule the schema implements, written independently of it."""
    if isinstance(value, (bool, np.bool_)):
        return False
    value = plain(value)
    if name in INT_FIELDS:
        if value is None:
            return name in ("seed", "logprobs")
        if type(value) is not int:
            return False
        return value >= INT_FIELDS[name] and (name != "seed" or value < 2**63) and (name != "logprobs" or value <= 20)
    low, high = FLOAT_FIELDS[name]
    if type(value) not in (int, float) or math.isnan(value):
        return False
    return low <= value <= high if name == "temperature" else 0.0 < value <= high


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(INT_FIELDS) + sorted(FLOAT_FIELDS)), value=any_value)
def test_every_value_is_accepted_as_its_type_or_refused_naming_the_field(name, value):
    if acceptable(name, value):
        params = SamplingParams(**{name: value})
        stored = getattr(params, name)
        assert stored == plain(value) and type(stored) in (int, float, type(None))
        if name in INT_FIELDS and stored is not None:
            assert type(stored) is int
    else:
        with pytest.raises(InvalidRequestError, match=name):
            SamplingParams(**{name: value})


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(any_value, st.lists(any_value, max_size=3)))
def test_stop_token_ids_are_a_list_of_non_negative_integers(value):
    items = value if isinstance(value, list) else None
    ok = items is not None and all(
        not isinstance(v, (bool, np.bool_)) and type(plain(v)) is int and plain(v) >= 0 for v in items
    )
    if ok:
        assert SamplingParams(stop_token_ids=value).stop_token_ids == tuple(plain(v) for v in items)
    else:
        with pytest.raises(InvalidRequestError, match="stop_token_ids"):
            SamplingParams(stop_token_ids=value)


def test_numpy_reals_are_floats_and_integers_beyond_64_bits_are_refused():
    assert SamplingParams(temperature=np.float64(0.5), top_p=np.float16(0.5)).temperature == 0.5
    for field in ("max_tokens", "top_k", "seed"):
        with pytest.raises(InvalidRequestError, match=field):
            SamplingParams(**{field: 2**63})


def test_a_request_body_goes_through_the_same_schema_and_unknown_fields_are_refused_by_name():
    with pytest.raises(InvalidRequestError, match="frequency_penalty"):
        SamplingParams.from_dict({"max_tokens": 3, "frequency_penalty": 0.5})
    params = SamplingParams.from_dict({"max_tokens": np.int32(3), "seed": 9})
    assert params == SamplingParams(max_tokens=3, seed=9)
    for body, field in (({"seed": -1}, "seed"), ({"top_k": 2.0}, "top_k"), ({"logprobs": True}, "logprobs")):
        with pytest.raises(InvalidRequestError, match=field):
            SamplingParams.from_dict(body)


@settings(max_examples=300, deadline=None)
@given(prompt=st.lists(any_value, min_size=1, max_size=4))
def test_token_ids_must_be_integers(prompt):
    if all(not isinstance(v, (bool, np.bool_)) and type(plain(v)) is int for v in prompt):
        assert token_ids(prompt) == [plain(v) for v in prompt]
    else:
        with pytest.raises(InvalidRequestError, match="token id"):
            token_ids(prompt)


def test_prompt_shapes_are_recognised():
    assert normalize_prompts("hi") == ["hi"]
    assert normalize_prompts([1, 2]) == [[1, 2]]
    assert normalize_prompts(list(np.array([1, 2]))) == [[1, 2]], "a list of numpy integers is one prompt"
    assert normalize_prompts([[1, 2], None]) == [[1, 2], None], "each prompt judged on its own"
    assert normalize_prompts([[1], "a"]) == [[1], "a"]
    assert normalize_prompts([1.5, 2.5]) == [[1.5, 2.5]], "a single prompt; its entries are judged later"
    assert token_ids(np.array([3, 4])) == [3, 4]
    for bad in (3, None, {"a": 1}):
        with pytest.raises(InvalidRequestError):
            normalize_prompts(bad)


def options(**kw) -> SamplingOptions:
    return SamplingOptions(**{"temperature": 0.0, **kw})


def test_a_nan_row_fails_alone_and_the_greedy_row_beside_it_is_unchanged():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    alone, _, _ = sample(logits[1:2], [options()], [0])
    broken = logits.clone()
    broken[0, 7] = float("nan")
    broken[2] = float("inf")
    tokens, _, failures = sample(broken, [options(temperature=0.7, seed=1), options(), options()], [0, 0, 0])
    assert set(failures) == {0, 2} and tokens[0] == tokens[2] == -1
    assert tokens[1] == alone[0] == int(logits[1].argmax())


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    logits = torch.randn(2, 60)
    for top_p in (1e-50, 1e-320):
        tokens, _, failures = sample(logits, [options(temperature=1.0, top_p=top_p, seed=4)] * 2, [0, 0])
        assert not failures and tokens == logits.argmax(-1).tolist()


def test_a_vanishing_temperature_is_greedy_and_never_overflows():
    logits = torch.randn(4, 100) * 50
    for temperature in (1e-30, 1e-12, 1e-6):
        tokens, _, failures = sample(logits, [options(temperature=temperature, seed=3)] * 4, [0] * 4)
        assert not failures and tokens == logits.argmax(-1).tolist()
    tokens, _, failures = sample(logits, [options(temperature=1e-4, seed=3)] * 4, [0] * 4)
    assert not failures and tokens == logits.argmax(-1).tolist(), "1e-4 is above the greedy limit yet finite"


def test_logprobs_none_and_zero_are_distinct_and_independent_of_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    per_row = [options(logprobs=0), options(logprobs=None), options(logprobs=2)]
    tokens, logprobs, _ = sample(logits, per_row, [0, 0, 0])
    assert logprobs[1] is None
    assert logprobs[0].top_ids == [] and logprobs[0].logprob == pytest.approx(
        float(torch.log_softmax(logits[0], -1)[tokens[0]])
    )
    assert len(logprobs[2].top_ids) == 2
    alone_tokens, alone, _ = sample(logits[:1], per_row[:1], [0])
    assert alone_tokens[0] == tokens[0] and alone[0].logprob == pytest.approx(logprobs[0].logprob)
    assert sample(logits[1:2], per_row[1:2], [0])[1] is None, "nobody asked: no logprobs computed"


def test_seeded_sampling_of_a_row_does_not_depend_on_its_neighbours():
    torch.manual_seed(2)
    logits = torch.randn(4, 64)
    rows = [options(temperature=0.9, seed=s, top_k=k, top_p=p) for s, k, p in [(1, 0, 1.0), (2, 5, 0.9), (3, -1, 0.5)]]
    together, _, _ = sample(logits[:3], rows, [4, 5, 6])
    for i in range(3):
        assert sample(logits[i : i + 1], [rows[i]], [4 + i])[0] == [together[i]]

"""One request can never hurt another: bad input is refused, a request that breaks fails alone,
and a request whose caller gave up is aborted with its KV blocks freed."""

from __future__ import annotations

import _thread
import math
import threading
import time

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import InvalidRequestError, RequestFailed, RequestTimeout
from dataplane import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [1, 2]]

small_or_odd = st.one_of(
    st.integers(-2, 4),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-2, 4).map(np.int64),
    st.text(max_size=2),
)
param_fields = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": small_or_odd,
        "temperature": st.one_of(small_or_odd, st.floats(0, 2)),
        "top_k": small_or_odd,
        "top_p": st.one_of(small_or_odd, st.floats(0, 1)),
        "seed": st.one_of(small_or_odd, st.integers(0, 2**64)),
        "logprobs": st.one_of(small_or_odd, st.integers(0, 30)),
        "stop_token_ids": st.lists(small_or_odd, max_size=2),
        "ignore_eos": small_or_odd,
    },
)
prompt_values = st.one_of(
    st.lists(st.one_of(st.integers(-1, 300), st.floats(0, 5), st.booleans(), st.text(max_size=2)), max_size=4),
    st.text(max_size=8),
)


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, num_stages=2) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def expected(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def wait_all_free(llm, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while llm.num_free_kv_blocks() != llm.num_kv_blocks and time.monotonic() < deadline:
        time.sleep(0.02)
    return llm.num_free_kv_blocks()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=param_fields, prompt=prompt_values)
def test_every_generated_request_is_refused_or_served_and_greedy_is_served_after(llm, expected, fields, prompt):
    try:
        params = SamplingParams(**fields)
        out = llm.generate([prompt], params, timeout_s=60)[0]
        assert out.finish_reason in ("stop", "length") and 1 <= len(out.token_ids) <= params.max_tokens
        assert (out.outputs[0].logprobs is None) == (params.logprobs is None)
    except InvalidRequestError:
        pass
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected


BREAKAGES = {
    "nan temperature breaks the sampler": dict(temperature=math.nan),
    "a bool top_k that a stage cannot decode": dict(top_k=True),
    "a seed beyond 64 bits that cannot be encoded": dict(seed=2**64),
}


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_a_request_that_breaks_fails_alone_beside_greedy_requests(llm, expected, breakage):
    """Requests built past the API's validation, so that the engine, a stage and the sampler each meet one."""
    done = threading.Semaphore(0)
    good = [llm.requests.new_sequence(p, GREEDY, lambda _s: done.release()) for p in PROMPTS]
    bad = llm.requests.new_sequence(
        [3, 4, 5], SamplingParams(max_tokens=6, temperature=0.8, ignore_eos=True), lambda _s: done.release()
    )
    bad.sampling = msgspec.structs.replace(bad.sampling, **breakage)
    llm.engine.submit([good[0], bad, good[1], good[2]])
    for _ in range(4):
        assert done.acquire(timeout=60), "every request ends"
    assert isinstance(bad.error, RequestFailed) and bad.finish_reason == "error"
    assert [s.error for s in good] == [None] * 3
    assert [s.output_token_ids for s in good] == expected, "the greedy neighbours' tokens are unchanged"
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    assert wait_all_free(llm) == llm.num_kv_blocks


def test_odd_arguments_are_refused_naming_what_is_wrong(llm, expected):
    cases = [
        ((["h\ud800"], GREEDY), "Unicode"),
        (([[1, 2], None], GREEDY), "prompt 1"),
        (([[1, 2]], [None]), "SamplingParams"),
        (([[1, 2]], {"max_tokens": 2, "bogus": 1}), "bogus"),
    ]
    for (prompts, params), message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            llm.generate(prompts, params)
    for timeout in ("5", math.nan, -1, 0, True):
        with pytest.raises(InvalidRequestError, match="timeout_s"):
            llm.generate([[1, 2]], GREEDY, timeout_s=timeout)
    assert (
        llm.generate([[5, 6, 7]], {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True})[0].token_ids
        == (expected[0])
    )
    assert wait_all_free(llm) == llm.num_kv_blocks


def test_a_vanishing_temperature_gives_the_greedy_tokens(llm, expected):
    params = SamplingParams(max_tokens=6, temperature=1e-12, ignore_eos=True, seed=5)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == expected


def test_logprobs_zero_gives_the_sampled_tokens_logprob_alone_or_batched(llm):
    zero = SamplingParams(max_tokens=3, temperature=0.0, logprobs=0, ignore_eos=True)
    two = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True)
    none = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    alone = llm.generate([[1, 2, 3]], zero)[0].outputs[0].logprobs
    batched = llm.generate([[1, 2, 3], [4, 5, 6], [7, 8]], [zero, two, none])
    assert len(alone) == 3 and all(entry["top"] == {} for entry in alone)
    assert [e["logprob"] for e in batched[0].outputs[0].logprobs] == pytest.approx([e["logprob"] for e in alone])
    assert batched[2].outputs[0].logprobs is None


def test_a_timed_out_generate_aborts_its_request_and_frees_every_block(llm, expected):
    aborted = llm.engine.num_aborted
    with pytest.raises(RequestTimeout):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=900, ignore_eos=True), timeout_s=0.3)
    assert wait_all_free(llm) == llm.num_kv_blocks
    assert llm.engine.num_aborted == aborted + 1
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected


def test_an_interrupted_generate_aborts_its_requests(llm):
    aborted = llm.engine.num_aborted
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=900, ignore_eos=True))
    finally:
        timer.cancel()
    assert wait_all_free(llm) == llm.num_kv_blocks
    assert llm.engine.num_aborted == aborted + 2


def test_engine_abort_ends_running_and_waiting_requests_with_reason_abort(llm):
    done = threading.Semaphore(0)
    long = SamplingParams(max_tokens=900, ignore_eos=True)
    seqs = [llm.requests.new_sequence([i + 1, i + 2], long, lambda _s: done.release()) for i in range(3)]
    llm.engine.submit(seqs)
    llm.engine.abort([seqs[2].seq_id])
    deadline = time.monotonic() + 30
    while not seqs[0].token_times:  # running: it has generated something
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    llm.engine.abort([s.seq_id for s in seqs[:2]] + [10**9])
    for _ in seqs:
        assert done.acquire(timeout=10)
    assert [s.finish_reason for s in seqs] == ["abort"] * 3 and all(s.error is None for s in seqs)
    assert len(seqs[0].output_token_ids) > 0 and len(seqs[0].output_token_ids) < 900
    assert wait_all_free(llm) == llm.num_kv_blocks

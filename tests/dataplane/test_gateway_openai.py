"""The official ``openai`` client against ``fpctl up --port 0 --stages 2`` serving the embedded default
model (SmolLM2-135M-Instruct): completions and chat, streamed and not, usage, stop strings, seeds,
logprobs, n, the typed errors, and greedy text equal to the offline ``LLM``'s."""

from __future__ import annotations

import json

import openai
import pytest
from cluster_support import fpctl, gateway_url, local_cluster_env
from transformers import AutoTokenizer

from dataplane import LLM, SamplingParams

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, default_model):
    """A cluster serving the default model on 2 stages (``fpctl up`` finds it in the model cache)."""
    cache = str(default_model.parent.parent)
    with local_cluster_env(tmp_path_factory.mktemp("openai"), FLEXPIPE_CACHE_DIR=cache) as env:
        fpctl(env, "up", "--workers", "2", "--port", "0", "--stages", "2", timeout=600)
        yield env


@pytest.fixture(scope="module")
def served(cluster):
    return openai.OpenAI(base_url=f"{gateway_url(cluster)}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(str(default_model))


def streamed_text(stream) -> tuple[str, str | None, object]:
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(piece or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def test_the_model_is_listed(served):
    assert [m.id for m in served.models.list().data] == [MODEL]


def test_a_chat_answer_knows_the_capital_of_france(served):
    reply = served.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    streamed = served.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = streamed_text(streamed)
    assert text == reply.choices[0].message.content and finish == "stop"
    assert usage.model_dump() == reply.usage.model_dump()


def test_streamed_and_whole_completions_agree_with_the_offline_llm(served, default_model, tokenizer):
    whole = [served.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=16) for p in PROMPTS]
    for prompt, completion in zip(PROMPTS, whole):
        stream = served.completions.create(
            model=MODEL,
            prompt=prompt,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = streamed_text(stream)
        assert (text, finish) == (completion.choices[0].text, completion.choices[0].finish_reason)
        assert usage.prompt_tokens == completion.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert usage.completion_tokens == completion.usage.completion_tokens
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    with LLM(default_model, num_stages=2) as llm:
        offline = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
    assert [c.choices[0].text for c in whole] == [o.text for o in offline]
    assert [c.usage.completion_tokens for c in whole] == [len(o.token_ids) for o in offline]
    assert [c.choices[0].finish_reason for c in whole] == [o.finish_reason for o in offline]


def test_a_stop_string_ends_the_text_before_it(served):
    full = served.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=24)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), text
    cut = served.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    streamed = served.completions.create(
        model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=24, stop=stop, stream=True
    )
    assert streamed_text(streamed)[:2] == (cut.choices[0].text, "stop")


def test_a_seed_reproduces_a_sampled_answer(served):
    def sample(seed: int) -> str:
        return (
            served.completions.create(
                model=MODEL, prompt=PROMPTS[2], temperature=1.0, top_p=0.95, max_tokens=16, seed=seed
            )
            .choices[0]
            .text
        )

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3)), "other seeds sample other text"


def test_n_choices_and_logprobs(served):
    completion = served.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6, n=2, logprobs=2)
    first, second = completion.choices
    assert (first.index, second.index) == (0, 1) and first.text == second.text
    assert completion.usage.completion_tokens == 12
    assert len(first.logprobs.tokens) == len(first.logprobs.token_logprobs) == 6
    assert "".join(first.logprobs.tokens) == first.text
    for top, chosen in zip(first.logprobs.top_logprobs, first.logprobs.token_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0.0 and max(top.values()) >= chosen - 1e-6
    chat = served.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_completion_tokens=5, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert chat.usage.completion_tokens == len(content) == 5 and chat.choices[0].finish_reason == "length"
    assert all(len(entry.top_logprobs) >= 3 for entry in content)


def test_bad_requests_raise_the_clients_typed_errors(served):
    with pytest.raises(openai.BadRequestError) as bad:
        served.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        served.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    assert "context" in too_long.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        served.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert missing.value.code == "model_not_found" and MODEL in missing.value.message
    with pytest.raises(openai.BadRequestError):
        served.completions.create(model=MODEL, prompt="hi", extra_body={"frequency_penalty": 0.5})
    with pytest.raises(openai.BadRequestError):
        served.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"no_such_field": 1})


def test_fpctl_chat_and_generate_go_through_the_gateway(cluster, served):
    answer = fpctl(cluster, "chat", "--message", "What is the capital of France?", "--max-tokens", "32").stdout
    assert "Paris" in answer
    completion = served.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=8)
    generated = json.loads(fpctl(cluster, "generate", "--prompt", PROMPTS[0], "--max-tokens", "8", "--json").stdout)
    assert generated["text"] == completion.choices[0].text and generated["model"] == MODEL
    assert generated["usage"] == completion.usage.model_dump(exclude_none=True)

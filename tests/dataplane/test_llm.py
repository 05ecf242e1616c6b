"""The offline LLM as a user drives it: processes, concurrency, bad input, failures."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from common.errors import CheckpointError, InvalidRequestError, PipelineError, TransportError, UnsupportedModelError
from dataplane import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    with LLM(tiny_model, num_stages=3) as pipeline:
        yield pipeline


def test_text_prompts_round_trip_through_the_tokenizer(llm):
    out = llm.generate(["hello pipeline"], GREEDY)[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.usage == {
        "prompt_tokens": len("hello pipeline"),
        "completion_tokens": 12,
        "total_tokens": len("hello pipeline") + 12,
    }


def test_partitioner_layout_reads_only_stage_tensors(llm):
    assert llm.layout.num_stages == 3
    read = [set(stage.tensors_read) for stage in llm.stages]
    for i, a in enumerate(read):
        for b in read[i + 1 :]:
            assert not a & b, "two stages read the same tensor of an untied model"
    assert set().union(*read) == set(
        json.loads(
            (llm.model_dir / "model.safetensors").read_bytes()[
                8 : 8 + int.from_bytes((llm.model_dir / "model.safetensors").read_bytes()[:8], "little")
            ]
        )
    ) - {"__metadata__"}


def test_concurrent_generate_calls_share_the_batch(llm):
    prompts = [[i, i + 1, i + 2] for i in range(12)]
    alone = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    results: dict[int, list] = {}

    def worker(i):
        results[i] = llm.generate([prompts[i]], GREEDY)[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(12)] == alone


def test_seeded_sampling_is_reproducible_and_differs_by_seed(llm):
    prompts = ["abc", "defgh"]
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    first = [o.token_ids for o in llm.generate(prompts, params)]
    again = [o.token_ids for o in llm.generate(prompts[::-1], params)][::-1]
    other = [
        o.token_ids
        for o in llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.9, seed=8, ignore_eos=True))
    ]
    assert first == again
    assert first != other


def test_stop_token_ids_and_logprobs(llm):
    greedy = llm.generate(["xyz"], GREEDY)[0].token_ids
    stop_at = greedy[3]
    out = llm.generate(["xyz"], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_at], logprobs=3))[0]
    assert out.token_ids == greedy[: greedy.index(stop_at) + 1] and out.finish_reason == "stop"
    for token, entry in zip(out.token_ids, out.outputs[0].logprobs):
        assert max(entry["top"], key=entry["top"].get) == token
        assert entry["logprob"] == pytest.approx(max(entry["top"].values()))


@pytest.mark.parametrize("params", [dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-1.0), dict(top_p=0.0)])
def test_bad_sampling_params_are_refused(params):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**params)


def test_bad_requests_are_refused_and_the_pipeline_keeps_serving(llm):
    before = llm.generate([[5, 6, 7]], GREEDY)[0].token_ids
    with pytest.raises(InvalidRequestError, match="context"):
        llm.generate([[1] * llm.max_model_len], GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[10**6]], GREEDY)
    with pytest.raises(InvalidRequestError):
        llm.generate([[]], GREEDY)
    assert llm.generate([[5, 6, 7]], GREEDY)[0].token_ids == before


def test_generation_stops_at_the_models_context(tiny_model):
    with LLM(tiny_model, max_model_len=40) as small:
        out = small.generate([[1] * 30], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_preemption_under_kv_pressure_gives_identical_tokens(tiny_model):
    prompts = [[(7 * i + j) % 256 for j in range(20)] for i in range(10)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    with LLM(tiny_model, num_stages=2, num_kv_blocks=64) as roomy:
        expected = [o.token_ids for o in roomy.generate(prompts, params)]
    with LLM(tiny_model, num_stages=2, num_kv_blocks=12, block_size=8) as tight:
        got = [o.token_ids for o in tight.generate(prompts, params)]
        assert tight.engine.scheduler.num_preemptions > 0
        assert tight.engine.scheduler.allocator.num_free == 12
    assert got == expected


def test_close_and_context_manager_leave_no_children(tiny_model):
    llm = LLM(tiny_model, num_stages=2)
    pids = llm.worker_pids
    assert all(psutil.pid_exists(p) for p in pids)
    llm.close()
    llm.close()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    with pytest.raises(PipelineError):
        llm.generate(["after close"], GREEDY)
    with LLM(tiny_model, num_stages=2) as llm:
        pids = llm.worker_pids
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_a_dead_stage_makes_generate_fail_instead_of_hanging(tiny_model):
    with LLM(tiny_model, num_stages=3) as llm:
        llm.generate([[1, 2, 3]], GREEDY)
        errors = []

        def long_request():
            try:
                llm.generate([[1, 2, 3]], SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True))
            except PipelineError as exc:
                errors.append(exc)

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(0.5)
        os.kill(llm.worker_pids[1], signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
        assert errors and "exited" in str(errors[0])
        started = time.monotonic()
        with pytest.raises(PipelineError):
            llm.generate([[4, 5]], GREEDY, timeout_s=30)
        assert time.monotonic() - started < 30


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        LLM(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        LLM(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        LLM(broken)


def test_unsupported_architecture_and_transport_are_clear_errors(tmp_path, tiny_model):
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FalconForCausalLM"], "falcon"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="falcon.*LlamaForCausalLM"):
        LLM(odd)
    with pytest.raises(TransportError, match="shm"):
        LLM(tiny_model, transport="carrier-pigeon")


def test_checkpoint_missing_a_stage_tensor_is_refused(tmp_path, checkpoint):
    from safetensors.torch import load_file, save_file

    source = checkpoint("llama")
    target = tmp_path / "partial"
    target.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(CheckpointError, match="L1.mlp"):
        LLM(target)

"""Checkpoints served the way transformers reads them, end to end through ``LLM``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoints import hf_greedy_tokens
from transformers import AutoModelForCausalLM

from common.errors import InvalidRequestError
from dataplane import LLM, SamplingParams
from dataplane.models.tiny import EOS_ID

PROMPT = [3, 1, 4, 1, 5]


def test_a_stop_id_only_generation_config_lists_ends_generation_as_in_transformers(checkpoint, tmp_path):
    source = checkpoint("llama")
    unstopped = hf_greedy_tokens(source, [PROMPT], 8)[0]
    stop = next(t for t in unstopped[1:] if t != unstopped[0])
    path = tmp_path / "with-generation-config"
    shutil.copytree(source, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID, stop]}))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers' generate reads the stop ids from generation_config.json itself
        reference = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)[0, len(PROMPT) :]
    assert reference.tolist() == unstopped[: unstopped.index(stop) + 1]
    with LLM(path) as llm:
        out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.token_ids == reference.tolist() and out.finish_reason == "stop"


def test_an_explicit_max_model_len_is_honoured_where_rope_scaling_allows_it_and_refused_beyond(checkpoint):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    path = checkpoint("llama", max_position_embeddings=32, rope_parameters=yarn)
    with LLM(path, max_model_len=128) as llm:
        assert llm.max_model_len == 128
        out = llm.generate([[1] * 100], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
        assert len(out.token_ids) == 28 and out.finish_reason == "length", "the context ends at 128, not 32"
    with pytest.raises(InvalidRequestError, match="max_model_len 129 exceeds the 128 tokens"):
        LLM(path, max_model_len=129)
